"""The reward owner process sees only its reward's GPU(s): CUDA_VISIBLE_DEVICES in its environment, and the reward's
`cuda:N` read as the owner's own `cuda:0`, ... (reward/owner.py, one_device_view). On CPU: the environment and the
device the owner's reward is built with."""

from __future__ import annotations

import functools
import json
import os
import textwrap
import types
from pathlib import Path

import pytest

from lightning_grpo.reward.owner import SharedReward, one_device_view
from lightning_grpo.reward.spec import RewardSpec, describe
from owner_rewards import EnvRecordingReward

ROOT = Path(__file__).resolve().parents[1]


def owner_sees(root: Path, device: str) -> dict:
    """What EnvRecordingReward(device=device) recorded when an owner process (mode=process) built it."""
    reward = SharedReward(functools.partial(EnvRecordingReward, str(root), device=device), mode="process")
    trainer = types.SimpleNamespace(num_devices=1, node_rank=0, local_rank=0, default_root_dir=str(root))
    try:
        reward.start(trainer)
        return json.loads((root / "env.json").read_text())
    finally:
        reward.close()


def test_one_device_view_maps_the_rewards_gpus():
    spec = describe(functools.partial(EnvRecordingReward, "/x", device="cuda:2"))
    view, visible = one_device_view(spec, None)
    assert visible == "2" and view.config["init_args"] == {"record_dir": "/x", "device": "cuda:0"}
    assert spec.config["init_args"]["device"] == "cuda:2"  # the trainer's description is left as it is
    assert one_device_view(spec, "4,5,6,7")[1] == "6"  # index 2 of the trainer's own view
    part = lambda device: {"class_path": "owner_rewards.EnvRecordingReward", "init_args": {"device": device}}
    nested = RewardSpec({"class_path": "lightning_grpo.reward.composite.CompositeReward",
                         "init_args": {"rewards": {"asr": part("cuda:3"), "speaker": part("cuda:1"),
                                                   "duration": part("cpu")}}})
    view, visible = one_device_view(nested, None)
    assert visible == "1,3"
    assert [view.config["init_args"]["rewards"][k]["init_args"]["device"] for k in ("asr", "speaker", "duration")] == \
        ["cuda:1", "cuda:0", "cpu"]
    for unrestricted in ("cpu", "cuda"):  # no GPU, or the trainer's current one: nothing to map
        f = describe(functools.partial(EnvRecordingReward, "/x", device=unrestricted))
        assert one_device_view(f, None) == (f, None)
    with pytest.raises(ValueError, match=r"device cuda:2 is not one of the 2 GPUs .*CUDA_VISIBLE_DEVICES=0,1.*"
                                         r"--rollout.reward.reward.device"):
        one_device_view(spec, "0,1")


def test_the_owner_process_sees_only_the_reward_gpu(tmp_path, monkeypatch):
    """A reward on cuda:2 of a trainer that sees GPUs 4,5,6: the owner is started with CUDA_VISIBLE_DEVICES=6 and
    builds the reward on cuda:0 (on this CPU machine only the environment and the argument can be seen)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    seen = owner_sees(tmp_path, "cuda:2")
    assert seen["pid"] != os.getpid()
    assert seen["CUDA_VISIBLE_DEVICES"] == "6" and seen["device"] == "cuda:0"


def test_one_device_view_of_a_reward_configured_in_yaml(tmp_path):
    """The factory LightningCLI builds from class_path + init_args (a partial of jsonargparse's instantiator)."""
    from lightning_grpo.cli import build_cli

    cfg = tmp_path / "shared.yaml"
    cfg.write_text(textwrap.dedent(f"""
        rollout:
          reward:
            class_path: lightning_grpo.reward.owner.SharedReward
            init_args:
              mode: process
              reward:
                class_path: owner_rewards.EnvRecordingReward
                init_args: {{record_dir: {tmp_path}, device: "cuda:1"}}
    """))
    cli = build_cli(["--config", str(ROOT / "configs/tiny_cpu.yaml"), "--config", str(cfg),
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False)
    shared = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GRPORollout").reward
    view, visible = one_device_view(shared.reward, None)
    assert visible == "1"
    view()
    assert json.loads((tmp_path / "env.json").read_text())["device"] == "cuda:0"


@pytest.mark.gpu
def test_on_gpus_the_owner_sees_one_gpu(tmp_path):
    """On CUDA: a reward on the last visible GPU is built in an owner that sees exactly one GPU, as its cuda:0."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    seen = owner_sees(tmp_path, f"cuda:{torch.cuda.device_count() - 1}")
    assert seen["cuda_devices"] == 1 and seen["device"] == "cuda:0"
