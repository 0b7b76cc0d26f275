"""A tone world for preference rounds on the tiny model: codes decode to pitched frames, a rule scores "CER".

`ToneCodec` (a SpeechDecoder) turns each code into an 80 ms harmonic tone whose pitch rises with the code
(codes 0..55: 100 Hz to 400 Hz, two octaves, 28 codes an octave) and codes 56..63 into noise frames. So a
completion's pitch movement is audible and measurable (prosody.py), as prosody is in real speech, and the samples
can be played on the listening page. `ToneReward` stands in for Whisper's CER: cer = the fraction of noise frames
(sounds a listener cannot make out), reward = 1 - cer. It measures nothing about pitch, so a preference round that
raises pitch movement can be checked to hold this "CER". Deterministic, no weights: for tests and the simulated
round (benchmarks/bench_preference_rounds.py); not speech.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import OK, RewardResult, SpeechSample, code_reason


class ToneCodec:
    sample_rate = 16_000

    def __init__(self, num_voiced: int = 56, num_codes: int = 64, frame_s: float = 0.08, fmin: float = 100.0,
                 codes_per_octave: int = 28) -> None:
        if not 0 < num_voiced <= num_codes:
            raise ValueError(f"--num_voiced={num_voiced} must be in (0, num_codes={num_codes}]")
        self.num_voiced, self.num_codes = num_voiced, num_codes
        self.frame = int(frame_s * self.sample_rate)
        self.fmin, self.codes_per_octave = fmin, codes_per_octave

    def f0(self, code: int) -> float:
        """The pitch of a voiced code in Hz."""
        return self.fmin * 2 ** (code / self.codes_per_octave)

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        out = []
        for seq in codes:
            if any(not 0 <= c < self.num_codes for c in seq):
                raise ValueError(f"ToneCodec decodes codes 0..{self.num_codes - 1}, got {list(seq)[:8]}...")
            gen = torch.Generator().manual_seed(len(seq))  # the same codes always sound the same
            freq = torch.cat([torch.full((self.frame,), self.f0(c) if c < self.num_voiced else 0.0) for c in seq]) \
                if seq else torch.zeros(0)
            phase = torch.cumsum(2 * math.pi * freq / self.sample_rate, 0)  # continuous across frames
            tone = 0.25 * torch.sin(phase) + 0.08 * torch.sin(2 * phase)
            noise = 0.1 * torch.randn(freq.shape, generator=gen)
            out.append(torch.where(freq > 0, tone, noise))
        return out


class ToneReward:
    """reward = 1 - cer, cer = the fraction of noise codes (>= num_voiced); metric `cer`. Carries a ToneCodec."""

    def __init__(self, num_voiced: int = 56, num_codes: int = 64) -> None:
        self.codec = ToneCodec(num_voiced, num_codes)
        self.num_voiced, self.num_codes = num_voiced, num_codes

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        rewards, cers, reasons = [], [], []
        for s in samples:
            reason = code_reason(s, self.num_codes)
            cer = sum(c >= self.num_voiced for c in s.codes) / len(s.codes) if reason == OK else 1.0
            rewards.append(1.0 - cer), cers.append(cer), reasons.append(reason)
        return RewardResult(rewards=torch.tensor(rewards), metrics={"cer": torch.tensor(cers)}, reasons=reasons)
