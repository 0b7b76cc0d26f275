"""Rewards for the reward-owner tests; importable by the owner process (the trainer's sys.path goes with it).

`CountingRuleReward` is the rule reward, plus a record of where it was built and what each call scored:
`<record_dir>/loads.txt` gets this process's pid per construction (one line = one model load), and
`calls.jsonl` one line per `score` call (pid, texts, sample count), so a test can see which ranks' samples
shared a call. `FailingReward` cannot be built (a model that fails to load). `SlowRuleReward` sleeps per call.
`ScoreOnlyReward` is a user's reward in its plainest form: a class with `score` and nothing else.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from lightning_grpo.reward.base import RewardResult, SpeechSample
from lightning_grpo.reward.rule import RuleReward


class CountingRuleReward(RuleReward):
    def __init__(self, record_dir: str, delay_s: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record_dir = Path(record_dir)
        self.delay_s = delay_s
        with open(self.record_dir / "loads.txt", "a") as f:
            f.write(f"{os.getpid()}\n")

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        time.sleep(self.delay_s)
        with open(self.record_dir / "calls.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "texts": [s.text for s in samples]}) + "\n")
        return super().score(samples)


class FailingReward:
    def __init__(self, message: str = "CUDA out of memory while loading Whisper") -> None:
        raise RuntimeError(message)

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:  # pragma: no cover - never built
        raise AssertionError


class SlowRuleReward(RuleReward):
    """The rule reward with a GPU-like cost: `fixed_s` per call plus `per_sample_s` per sample, slept."""

    def __init__(self, fixed_s: float = 0.0, per_sample_s: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fixed_s, self.per_sample_s = fixed_s, per_sample_s

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        time.sleep(self.fixed_s + self.per_sample_s * len(samples))
        return super().score(samples)


class EnvRecordingReward(RuleReward):
    """The rule reward, recording at construction the GPUs its process sees and the device it was given."""

    def __init__(self, record_dir: str, device: str = "cpu", **kwargs) -> None:
        super().__init__(**kwargs)
        import torch

        record = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": device, "pid": os.getpid(),
                  "cuda_devices": torch.cuda.device_count()}
        (Path(record_dir) / "env.json").write_text(json.dumps(record))


class ScoreOnlyReward:
    """Rewards longer speech (up to 16 codes); counts its calls in `ScoreOnlyReward.calls` (one process)."""

    calls = 0

    def score(self, samples):  # unannotated, as a user may write it
        ScoreOnlyReward.calls += 1
        return RewardResult(rewards=torch.tensor([min(len(s.codes), 16) / 16 for s in samples]))
