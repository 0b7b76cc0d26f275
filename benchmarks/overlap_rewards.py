"""Rewards of `bench_overlap.py`, in a module of their own so that a reward owner process can import them
(the owner unpickles the reward's factory; a class defined in the benchmark's `__main__` would not import).

`SleepReward`: the rule reward with a GPU-like cost, a fixed latency per call plus a cost per sample, spent
sleeping (in the owner's own process it takes no CPU from generation, as a reward on its own GPU does not).
`ModuloUnitCodec`: the small world's unit codec (code k = a recorded word) for the 64 speech tokens of the
builtin tiny LLaSA (code k -> unit k mod 30), so the real Whisper tiny.en reward hears real speech.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from lightning_grpo.reward.base import RewardResult, SpeechSample
from lightning_grpo.reward.rule import RuleReward

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # small_world


class SleepReward(RuleReward):
    def __init__(self, fixed_s: float = 0.0, per_sample_s: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fixed_s, self.per_sample_s = fixed_s, per_sample_s

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        time.sleep(self.fixed_s + self.per_sample_s * len(samples))
        return super().score(samples)


class ModuloUnitCodec:
    sample_rate = 16_000

    def __init__(self) -> None:
        from small_world.unit_codec import UnitCodec

        self.codec = UnitCodec()

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        n = len(self.codec.units)
        return self.codec.decode([[c % n for c in row] for row in codes])
