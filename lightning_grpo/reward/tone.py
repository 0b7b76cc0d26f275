"""A tone world for preference rounds on the tiny model: codes decode to pitched frames, a rule scores "CER".

`ToneCodec` (a SpeechDecoder) turns each code into an 80 ms frame of a harmonic tone whose pitch rises with the code
(codes 0..55: 100 Hz to 400 Hz, two octaves, 28 codes an octave) and codes 56..63 into noise frames. The pitch
passes through each voiced code's pitch at its frame's centre and glides between them, linearly in semitones, as
speech F0 moves continuously. A step contour would not do: jumping up to two octaves every 80 ms is what a speech
pitch tracker's octave-jump cost reads as an octave error, and Praat (reward/prosody.py) then holds a subharmonic
through alternating 100 / 200 Hz frames and reads no movement at all. So a completion's pitch movement is audible
and measurable by the same statistics as speech's, and the samples can be played on the listening page. `ToneReward` stands in for Whisper's CER: cer = the fraction of noise frames
(sounds a listener cannot make out), reward = 1 - cer. It measures nothing about pitch, so a preference round that
raises pitch movement can be checked to hold this "CER". Deterministic, no weights: for tests and the simulated
round (benchmarks/bench_preference_rounds.py); not speech.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .base import OK, RewardResult, SpeechSample, code_reason
from .prosody import ProsodyStats, prosody_metrics, prosody_stats


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

    def contour(self, codes: Sequence[int]) -> torch.Tensor:
        """The pitch in Hz at every sample of `codes`' audio: (len(codes) * frame,), through each voiced code's f0 at
        its frame's centre, linear in semitones between them and held before the first and after the last; 0 in
        noise frames."""
        n = len(codes) * self.frame
        voiced = [i for i, c in enumerate(codes) if c < self.num_voiced]
        if not voiced:
            return torch.zeros(n)
        centres = (np.array(voiced) + 0.5) * self.frame
        log_f0 = np.log2([self.f0(codes[i]) for i in voiced])
        freq = torch.from_numpy(2 ** np.interp(np.arange(n), centres, log_f0)).float()  # (n,)
        noise = torch.tensor([c >= self.num_voiced for c in codes]).repeat_interleave(self.frame)
        return freq.masked_fill(noise, 0.0)

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        out = []
        for seq in codes:
            if any(not 0 <= c < self.num_codes for c in seq):
                raise ValueError(f"ToneCodec decodes codes 0..{self.num_codes - 1}, got {list(seq)[:8]}...")
            gen = torch.Generator().manual_seed(len(seq))  # the same codes always sound the same
            freq = self.contour(seq)
            phase = torch.cumsum(2 * math.pi * freq / self.sample_rate, 0)  # continuous across frames
            tone = 0.25 * torch.sin(phase) + 0.08 * torch.sin(2 * phase)
            noise = 0.1 * torch.randn(freq.shape, generator=gen)
            out.append(torch.where(freq > 0, tone, noise))
        return out


class ToneReward:
    """reward = 1 - cer, cer = the fraction of noise codes (>= num_voiced); metric `cer`. Carries a ToneCodec.

    Args:
        prosody: also decode every sample and report reward/prosody.py's statistics (`prosody/*` metrics, as
            WhisperReward's `prosody`), so a preference round's validation logs `val/prosody/f0_std_st_mean`.
    """

    def __init__(self, num_voiced: int = 56, num_codes: int = 64, prosody: bool = False) -> None:
        self.codec = ToneCodec(num_voiced, num_codes)
        self.num_voiced, self.num_codes, self.prosody = num_voiced, num_codes, prosody

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        rewards, cers, reasons = [], [], []
        for s in samples:
            reason = code_reason(s, self.num_codes)
            cer = sum(c >= self.num_voiced for c in s.codes) / len(s.codes) if reason == OK else 1.0
            rewards.append(1.0 - cer), cers.append(cer), reasons.append(reason)
        metrics = {"cer": torch.tensor(cers)}
        if self.prosody:
            stats = ProsodyStats.empty(len(samples))  # NaN for samples not decoded (empty, invalid)
            idx = [i for i, r in enumerate(reasons) if r == OK]
            if idx:
                waves = self.codec.decode([samples[i].codes for i in idx])
                stats.put(idx, prosody_stats(waves, [samples[i].text for i in idx], self.codec.sample_rate))
            metrics.update(prosody_metrics(stats))
        return RewardResult(rewards=torch.tensor(rewards), metrics=metrics, reasons=reasons)
