"""CompositeReward (weighted sum, normalise-then-sum, logging names, reasons, errors, one decode) and DurationReward."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grpo.reward.base import OK, RewardResult, SpeechSample
from lightning_grpo.reward.composite import CallCache, CompositeReward, standardize_within_groups
from lightning_grpo.reward.duration import DurationReward, duration_score, text_units


class Fixed:
    """Gives the listed rewards (and metrics / reasons) in order, whatever the samples."""

    def __init__(self, values, metrics=None, reasons=None, transcripts=None):
        self.values, self.metrics, self.reasons, self.transcripts = values, metrics or {}, reasons, transcripts
        self.calls = 0

    def score(self, samples):
        self.calls += 1
        n = len(samples)
        return RewardResult(
            rewards=torch.tensor(self.values[:n], dtype=torch.float32),
            metrics={k: torch.tensor(v[:n], dtype=torch.float32) for k, v in self.metrics.items()},
            reasons=list(self.reasons[:n]) if self.reasons else [],
            transcripts=list(self.transcripts[:n]) if self.transcripts else [],
        )


class Broken:
    def score(self, samples):
        raise ValueError("model weights missing")


def samples(groups: list[int]) -> list[SpeechSample]:
    return [SpeechSample(text="hello there", codes=[1] * 50, group=g) for g in groups]


A = [0.1, 0.5, 0.9, 0.2, 0.2, 0.2]
B = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
GROUPS = [0, 0, 0, 1, 1, 1]


def test_weighted_sum_equals_hand_computed_values():
    reward = CompositeReward({"a": Fixed(A), "b": Fixed(B)}, weights={"a": 1.0, "b": 0.5})
    out = reward.score(samples(GROUPS))
    assert torch.allclose(out.rewards, torch.tensor([0.6, 0.5, 1.4, 0.2, 0.7, 0.2]), atol=1e-6)
    assert torch.equal(out.metrics["reward/a"], torch.tensor(A)) and torch.equal(out.metrics["reward/b"], torch.tensor(B))
    assert "reward/weighted_sum" not in out.metrics  # under sum the reward is the weighted sum


def test_normalize_then_sum_equals_hand_computed_values():
    """Group 0: a = [0.1, 0.5, 0.9] -> mean 0.5, unbiased std 0.4 -> z = [-1, 0, 1]; b = [1, 0, 1] -> mean 2/3,
    std sqrt(1/3) -> z = [1/sqrt(3), -2/sqrt(3), 1/sqrt(3)]. Group 1: a is constant -> 0; b = [0, 1, 0] -> the
    negated z of group 0's b. reward = 1 * z_a + 0.5 * z_b."""
    reward = CompositeReward({"a": Fixed(A), "b": Fixed(B)}, weights={"a": 1.0, "b": 0.5}, aggregation="normalize_then_sum")
    out = reward.score(samples(GROUPS))
    r3 = 1 / math.sqrt(3)
    expected = [-1 + 0.5 * r3, 0 - 0.5 * 2 * r3, 1 + 0.5 * r3, -0.5 * r3, 0.5 * 2 * r3, -0.5 * r3]
    assert torch.allclose(out.rewards, torch.tensor(expected), atol=1e-6)
    # the level of the raw components stays visible
    assert torch.allclose(out.metrics["reward/weighted_sum"], torch.tensor([0.6, 0.5, 1.4, 0.2, 0.7, 0.2]), atol=1e-6)


def test_zero_variance_component_contributes_nothing_and_never_nan():
    constant_in_groups = [0.3, 0.3, 0.3, 0.9, 0.9, 0.9]
    base = CompositeReward({"a": Fixed(A), "b": Fixed(B)}, aggregation="normalize_then_sum").score(samples(GROUPS))
    with_c = CompositeReward({"a": Fixed(A), "b": Fixed(B), "c": Fixed(constant_in_groups)},
                             weights={"a": 1.0, "b": 1.0, "c": 5.0}, aggregation="normalize_then_sum").score(samples(GROUPS))
    assert torch.equal(base.rewards, with_c.rewards)
    # every component constant, and groups of one completion (validation with val_group_size 1): exactly 0
    flat = CompositeReward({"c": Fixed(constant_in_groups)}, aggregation="normalize_then_sum").score(samples(GROUPS))
    single = CompositeReward({"a": Fixed(A)}, aggregation="normalize_then_sum").score(samples([0, 1, 2, 3, 4, 5]))
    for out in (flat, single):
        assert torch.isfinite(out.rewards).all() and torch.equal(out.rewards, torch.zeros(6))
    # float noise below eps does not become a unit-size signal
    noisy = standardize_within_groups(torch.tensor([0.1, 0.1 + 1e-9, 0.1]), torch.tensor([0, 0, 0]))
    assert torch.equal(noisy, torch.zeros(3))


def test_normalize_then_sum_groups_by_id_not_position():
    order = [3, 0, 4, 1, 5, 2]  # the same samples shuffled: each keeps its group id
    shuffled = CompositeReward({"a": Fixed([A[i] for i in order])}, aggregation="normalize_then_sum").score(
        samples([GROUPS[i] for i in order]))
    straight = CompositeReward({"a": Fixed(A)}, aggregation="normalize_then_sum").score(samples(GROUPS))
    assert torch.allclose(shuffled.rewards, straight.rewards[order])
    with pytest.raises(ValueError, match="carry no group"):
        CompositeReward({"a": Fixed(A)}, aggregation="normalize_then_sum").score([SpeechSample("x", [1])])


def test_reasons_metrics_and_transcripts_merge():
    whisper = Fixed([0.5, 0.6, 0.7], metrics={"cer": [0.1, 0.2, 0.3], "shared": [1, 2, 3]},
                    reasons=[OK, "silent", OK], transcripts=["a", "", "c"])
    sim = Fixed([0.9, 0.8, 0.0], metrics={"sim": [0.9, 0.8, math.nan], "shared": [4, 5, 6]},
                reasons=["no_reference", "empty_speech", "silent"])
    out = CompositeReward({"whisper": whisper, "sim": sim}).score(samples([0, 0, 0]))
    assert out.reasons == ["no_reference", "silent", "silent"]  # the first non-ok reason, in the listed order
    assert out.transcripts == ["a", "", "c"]
    assert set(out.metrics) == {"reward/whisper", "reward/sim", "cer", "sim", "whisper/shared", "sim/shared"}
    assert torch.equal(out.metrics["cer"], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(out.metrics["sim/shared"], torch.tensor([4.0, 5.0, 6.0]))


def test_a_component_that_raises_stops_the_call_naming_it():
    reward = CompositeReward({"whisper": Fixed([1.0]), "sim": Broken()})
    with pytest.raises(RuntimeError, match=r"reward component 'sim' \(Broken\) failed.*model weights missing"):
        reward.score(samples([0]))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        CompositeReward({"a": Fixed(A), "b": Fixed(B)}, weights={"a": 1.0})
    with pytest.raises(ValueError, match="unknown \\['c'\\]"):
        CompositeReward({"a": Fixed(A)}, weights={"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="aggregation"):
        CompositeReward({"a": Fixed(A)}, aggregation="mean")
    with pytest.raises(ValueError, match="is empty"):
        CompositeReward({})


class Counting:
    """A SpeechDecoder that counts the sequences it decodes."""

    sample_rate = 16_000

    def __init__(self):
        self.decoded = 0

    def decode(self, codes):
        self.decoded += len(codes)
        return [torch.full((320 * len(c),), 0.1) for c in codes]


class UsesCodec:
    def __init__(self, codec=None):
        self.codec = codec

    def score(self, samples):
        audio = self.codec.decode([s.codes for s in samples])
        return RewardResult(rewards=torch.tensor([a.numel() / 16_000 for a in audio]))


def test_components_share_one_decode_per_call():
    codec = Counting()
    first, second = UsesCodec(codec), UsesCodec(None)
    reward = CompositeReward({"first": first, "second": second})
    batch = [SpeechSample("x", [1, 2, 3], group=0), SpeechSample("x", [4, 5], group=0), SpeechSample("x", [1, 2, 3], group=0)]
    out = reward.score(batch)
    assert codec.decoded == 2  # two distinct sequences, decoded once for both components
    assert isinstance(first.codec, CallCache) and second.codec is first.codec and reward.codec is first.codec
    assert torch.allclose(out.metrics["reward/second"], torch.tensor([0.06, 0.04, 0.06]))
    reward.score(batch)
    assert codec.decoded == 4  # nothing is kept between calls
    import pickle

    copy = pickle.loads(pickle.dumps(reward))  # DDP spawn pickles the rollout's reward
    assert copy.rewards["second"].codec is copy.codec and copy.score(batch).rewards.shape == (3,)


# ------------------------------------------------------------------------------------------------ duration


def speech(seconds: float, text: str = "abcdefghijkl", **kw) -> SpeechSample:
    return SpeechSample(text=text, codes=[7] * round(seconds * 50), **kw)


def test_duration_is_flat_inside_the_window_and_monotone_outside():
    reward = DurationReward(rates={"en": 12.0}, tolerance=0.25, softness=0.3)  # 12 letters -> 1.0 s expected
    inside = reward.score([speech(s) for s in (0.8, 0.9, 1.0, 1.1, 1.25)])
    assert torch.equal(inside.rewards, torch.ones(5))
    longer = reward.score([speech(s) for s in (1.3, 1.5, 2.0, 3.0, 6.0)]).rewards
    shorter = reward.score([speech(s) for s in (0.76, 0.6, 0.4, 0.2, 0.04)]).rewards
    for r in (longer, shorter):
        assert (r.diff() < 0).all() and (r > 0).all() and (r < 1).all()
    # smooth at the edge: just outside is still ~1, and the metrics say what was measured
    assert duration_score(torch.tensor([1.25 * 1.001]), 0.25, 0.3).item() > 0.9999
    out = reward.score([speech(2.0)])
    assert out.metrics["duration_s"].item() == pytest.approx(2.0) and out.metrics["duration_ratio"].item() == pytest.approx(2.0)


def test_duration_expected_length_per_language_and_reference():
    reward = DurationReward()
    assert text_units("Hello, world!") == 10 and text_units("今天天气很好。") == 6
    assert reward.expected_seconds(SpeechSample("今天天气很好", [], language="zh")) == pytest.approx(6 / 4.5)
    assert reward.expected_seconds(SpeechSample("Hello world", [], language="en-US")) == pytest.approx(10 / 12.0)
    # a reference speaking 10 letters in 2 s (100 codes) asks for its own, slower rate: 5 letters/s
    ref = dict(prompt_text="Hello world", prompt_codes=[1] * 100)
    assert reward.expected_seconds(SpeechSample("Hello world", [], **ref)) == pytest.approx(10 / 6.0)  # clamped at 12 / 2
    ref = dict(prompt_text="Hello world", prompt_codes=[1] * 60)  # 10 letters in 1.2 s: 8.33 letters/s
    assert reward.expected_seconds(SpeechSample("Hello world", [], **ref)) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="no speaking rate for language 'fr'.*--rates"):
        reward.score([SpeechSample("Bonjour", [1], language="fr")])
    bad = reward.score([SpeechSample("x", []), SpeechSample("x", [1], num_invalid=1)])
    assert bad.reasons == ["empty_speech", "invalid_token"] and torch.equal(bad.rewards, torch.zeros(2))
    assert bad.metrics["duration_s"].isnan().all()


def test_rollout_refuses_penalize_under_normalize_then_sum():
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.sampling import HFSampler

    reward = CompositeReward({"a": Fixed(A)}, aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match="truncation penalize.*normalize_then_sum.*mask"):
        GRPORollout(HFSampler(), reward, group_size=2, truncation="penalize")
    GRPORollout(HFSampler(), reward, group_size=2, truncation="mask")  # the recommended pairing


def test_shipped_multireward_config_builds_a_composite_that_shares_one_decode():
    """configs/llasa1b_multireward.yaml parses (weights and nested keys overridable on the command line); its model
    rewards score in one owner each (SharedReward), the weighting in the ranks. Its components, moved to the CPU
    (Whisper tiny.en, a stored-audio codec) into one process, build a composite whose SIM borrows Whisper's codec
    and scores every completion with every component."""
    from pathlib import Path

    from jsonargparse import ArgumentParser

    from lightning_grpo.reward.base import Reward
    from lightning_grpo.reward.whisper import WhisperReward
    from lightning_grpo.reward.speaker import SpeakerSimilarityReward
    from reward_fixtures import SENTENCES, espeak
    from test_configs import parse

    path = Path(__file__).parents[1] / "configs" / "llasa1b_multireward.yaml"
    cfg = parse(path, "--rollout.reward.weights", "{whisper: 1.0, sim: 1.0, duration: 0.1}",
                "--rollout.reward.rewards.sim.init_args.reward.init_args.batch_size", "8")
    assert cfg.rollout.reward.init_args.weights == {"whisper": 1.0, "sim": 1.0, "duration": 0.1}
    owned = cfg.rollout.reward.init_args.rewards
    assert owned["sim"].init_args.reward.init_args.batch_size == 8
    assert [owned[k].class_path.rsplit(".", 1)[1] for k in ("whisper", "sim")] == ["SharedReward", "SharedReward"]
    assert cfg.rollout.truncation == "keep" and cfg.rollout.reward.init_args.aggregation == "normalize_then_sum"

    parser = ArgumentParser()
    parser.add_argument("--reward", type=Reward)
    reward_cfg = parse(path).rollout.reward.as_dict()
    for name in ("whisper", "sim"):  # what each owner builds, here in this process
        reward_cfg["init_args"]["rewards"][name] = reward_cfg["init_args"]["rewards"][name]["init_args"]["reward"]
    reward_cfg["init_args"]["share_codec"] = True
    reward_cfg["init_args"]["rewards"]["sim"]["init_args"]["codec"] = None
    whisper = reward_cfg["init_args"]["rewards"]["whisper"]["init_args"]
    whisper.update(whisper_model="tiny.en-ct2", device="cpu", dtype="float32", batch_size=4,
                   codec={"class_path": "reward_fixtures.StoredAudioDecoder"})
    reward_cfg["init_args"]["rewards"]["sim"]["init_args"]["device"] = "cpu"
    reward = parser.instantiate(parser.parse_object({"reward": reward_cfg})).reward
    assert isinstance(reward, CompositeReward) and list(reward.rewards) == ["whisper", "sim", "duration"]
    whisper_reward, sim = reward.rewards["whisper"], reward.rewards["sim"]
    assert isinstance(whisper_reward, WhisperReward) and isinstance(sim, SpeakerSimilarityReward)
    assert sim.codec is whisper_reward.codec is reward.codec
    stored = reward.codec.inner
    ref = stored.add(espeak(SENTENCES[1]))
    batch = [SpeechSample(SENTENCES[0], stored.add(espeak(SENTENCES[0], v)), language="en", prompt_text=SENTENCES[1],
                          prompt_codes=ref, group=0) for v in ("en-us", "en-us+f3")]
    out = reward.score(batch)
    assert out.reasons == ["ok", "ok"] and reward.codec.decoded == 3  # two generated + one reference, once each
    assert out.metrics["sim"][0] > out.metrics["sim"][1]  # the reference's own voice scores higher
    assert {"reward/whisper", "reward/sim", "reward/duration", "reward/weighted_sum", "cer", "nll", "sim",
            "duration_s"} <= set(out.metrics)
    assert torch.allclose(out.rewards, -out.rewards.flip(0))  # two completions standardised: +/- the same value
