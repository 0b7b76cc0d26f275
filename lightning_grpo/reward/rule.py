"""A cheap, deterministic rule reward for tests, the CPU default and benchmarks.

It scores two things a tiny random policy can learn in a few dozen steps: saying a length that
fits the text (`codes_per_char` codes per character) and using codes from a target band
(`band` = [low, high) of the codebook). It stands in for intelligibility; it is not speech quality.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import OK, RewardBase, RewardResult, SpeechSample


class RuleReward(RewardBase):
    def __init__(
        self,
        codes_per_char: float = 1.0,
        length_tolerance: float = 0.5,
        band: tuple[int, int] = (0, 32),
        length_weight: float = 0.5,
    ) -> None:
        """
        Args:
            codes_per_char: target number of codes per text character (real speech: about 3).
            length_tolerance: relative length error at which the length score falls to 1/e.
            band: [low, high) codes that count as "good" for the band score.
            length_weight: weight of the length score; the band score gets the rest.
        """
        if codes_per_char <= 0 or length_tolerance <= 0:
            raise ValueError("--codes_per_char and --length_tolerance must be > 0")
        if not 0 <= length_weight <= 1:
            raise ValueError(f"--length_weight={length_weight} must be in [0, 1]")
        if band[0] >= band[1]:
            raise ValueError(f"--band={band} must be [low, high) with low < high")
        self.codes_per_char = codes_per_char
        self.length_tolerance = length_tolerance
        self.band = band
        self.length_weight = length_weight

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        rewards, length_scores, band_scores, reasons = [], [], [], []
        for s in samples:
            if s.num_invalid:
                rewards.append(0.0), length_scores.append(math.nan), band_scores.append(math.nan)
                reasons.append("invalid_token")
                continue
            if not s.codes:
                rewards.append(0.0), length_scores.append(0.0), band_scores.append(0.0)
                reasons.append("empty_speech")
                continue
            target = self.codes_per_char * max(len(s.text), 1)
            length = math.exp(-abs(len(s.codes) - target) / (target * self.length_tolerance))
            lo, hi = self.band
            band = sum(lo <= c < hi for c in s.codes) / len(s.codes)
            rewards.append(self.length_weight * length + (1 - self.length_weight) * band)
            length_scores.append(length)
            band_scores.append(band)
            reasons.append(OK)
        return RewardResult(
            rewards=torch.tensor(rewards, dtype=torch.float32),
            metrics={
                "length_score": torch.tensor(length_scores, dtype=torch.float32),
                "band_score": torch.tensor(band_scores, dtype=torch.float32),
            },
            reasons=reasons,
        )
