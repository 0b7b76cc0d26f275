"""The reward contract: `score` is required; the optional members are declared once (RewardBase) with their
defaults, and the trainer reads them only through reward.base's functions, so a class with only `score` works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_grpo.reward.base import (RewardBase, RewardResult, aggregation_of, close_reward, codec_of,
                                        concurrent_calls, start_reward, takes_codec)

ROOT = Path(__file__).parents[1]


class ScoreOnly:
    def score(self, samples):
        return RewardResult(rewards=torch.zeros(len(samples)))


def test_the_optional_members_and_their_defaults():
    declared = {"start": None, "close": None, "max_concurrent_calls": 1, "aggregation": "sum"}
    base = RewardBase()
    assert base.start(object()) is None and base.start() is None and base.close() is None  # no-ops
    assert (base.max_concurrent_calls, base.aggregation) == (declared["max_concurrent_calls"], declared["aggregation"])
    # a torch module registers `codec` as a submodule: a class attribute would hide it, so it is read by codec_of only
    assert not hasattr(RewardBase, "codec")
    # a class with only `score` gets the same defaults through the functions the trainer uses
    for reward in (ScoreOnly(), base):
        start_reward(reward, trainer=None)
        close_reward(reward)
        assert concurrent_calls(reward) == 1 and aggregation_of(reward) == "sum" and codec_of(reward) is None
        assert not takes_codec(reward)


def test_the_functions_call_what_a_reward_declares():
    class Owned(RewardBase):
        max_concurrent_calls, aggregation, codec = 4, "normalize_then_sum", "a decoder"

        def __init__(self):
            self.events = []

        def start(self, trainer=None):
            self.events.append(("start", trainer))

        def close(self):
            self.events.append(("close",))

        def score(self, samples):  # pragma: no cover - not called here
            raise AssertionError

    reward = Owned()
    start_reward(reward, "the trainer")
    close_reward(reward)
    assert reward.events == [("start", "the trainer"), ("close",)]
    got = (concurrent_calls(reward), aggregation_of(reward), codec_of(reward))
    assert got == (4, "normalize_then_sum", "a decoder")
    reward.max_concurrent_calls = 0
    with pytest.raises(ValueError, match=r"Owned\.max_concurrent_calls=0 must be an int >= 1"):
        concurrent_calls(reward)


def test_the_package_rewards_inherit_the_declared_contract():
    from lightning_grpo.reward.client import RemoteReward
    from lightning_grpo.reward.composite import CompositeReward
    from lightning_grpo.reward.duration import DurationReward
    from lightning_grpo.reward.owner import SharedReward
    from lightning_grpo.reward.rule import RuleReward
    from lightning_grpo.reward.speaker import SpeakerSimilarityReward
    from lightning_grpo.reward.whisper import WhisperReward

    for cls in (RemoteReward, CompositeReward, DurationReward, SharedReward, RuleReward, SpeakerSimilarityReward,
                WhisperReward):
        assert issubclass(cls, RewardBase), cls


def test_only_reward_base_probes_a_reward_for_optional_members():
    probe = re.compile(r"(getattr|hasattr)\((self\.)?(reward|r|cb\.reward)\b\s*,\s*\"(start|close|max_concurrent_calls|"
                       r"aggregation|codec)\"")
    found = [f"{path.relative_to(ROOT)}:{i}" for path in (ROOT / "lightning_grpo").rglob("*.py")
             if path.name != "base.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if probe.search(line)]
    assert not found, found


def test_a_reward_with_only_score_trains_through_the_cli(tmp_path):
    from lightning_grpo.cli import build_cli
    from lightning_grpo.rollout import GRPORollout
    from owner_rewards import ScoreOnlyReward

    assert not hasattr(ScoreOnlyReward, "start") and not isinstance(ScoreOnlyReward(), RewardBase)
    before = ScoreOnlyReward.calls
    cli = build_cli(["fit", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
                     "--rollout.reward=owner_rewards.ScoreOnlyReward",
                     "--rollout.overlap_reward=true", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
                     f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    rollout = next(c for c in cli.trainer.callbacks if isinstance(c, GRPORollout))
    assert type(rollout.reward) is ScoreOnlyReward
    assert cli.trainer.global_step == 2 and ScoreOnlyReward.calls > before
