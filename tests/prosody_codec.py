"""A codec whose every code is a short voiced tone, for CLI runs that need audio with pitch from a tiny policy.

Code k (of 64, tiny-llasa's speech vocabulary) decodes to `tone_s` of a harmonic tone at 90 * 2^(k / 24) Hz, so
any code sequence is voiced speech-like audio whose F0 moves with the codes; Whisper reads nonsense from it, the
prosody statistics read a real contour. Importable as `prosody_codec.ToneCodec` with tests/ on PYTHONPATH.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

SAMPLE_RATE = 16_000


class ToneCodec:
    sample_rate = SAMPLE_RATE

    def __init__(self, num_codes: int = 64, tone_s: float = 0.06) -> None:
        t = torch.arange(round(tone_s * SAMPLE_RATE)) / SAMPLE_RATE
        self.tones = []
        for k in range(num_codes):
            f0 = 90.0 * 2 ** (k / 24)
            wave = sum(math.exp(-0.3 * h) * torch.sin(2 * math.pi * h * f0 * t) for h in range(1, 8))
            self.tones.append((0.2 * wave / wave.abs().max()).float())

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        gap = torch.zeros(SAMPLE_RATE // 10)
        return [torch.cat([gap, *(self.tones[int(c)] for c in seq), gap]) for seq in codes]
