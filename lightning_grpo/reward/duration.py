"""Duration reward: is the speech about as long as the text takes to say?

TTS-RL runs drift in length: outputs get shorter and shorter (a length bias of the loss), speech slows down
to please an ASR reward, or the model stops early or never (Tongyi, arXiv 2509.18569, adds a duration reward
to stop slow speech; arXiv 2511.21270 rewards a length window). This reward needs no model:

    duration  = len(codes) / tokens_per_second               (X-codec2: 50 codes per second)
    expected  = units(text) / rate                           units = letters and digits (str.isalnum)
    excess    = max(0, |ln(duration / expected)| - ln(1 + tolerance))
    reward    = exp(-(excess / softness) ** 2)

so the reward is 1 (flat) while the speech is within a factor of 1 + tolerance of the expected length, either
way, and falls smoothly and monotonically outside the window (its slope is 0 at the edge). A letter or digit
is a character of the text: about a syllable in Chinese (汉字) and Korean (한글 blocks), a fraction of one in
English, so the rates are per language. With a voice-cloning prompt (prompt_text + prompt_codes) the rate is
the reference speaker's own (units of the reference text per second of its codes), kept within
[rate / max_rate_factor, rate * max_rate_factor] of the language's rate, so a reference clip padded with
silence cannot ask for absurd lengths.

Default rates, letters/digits per second of read speech: en 12 (about 2.6 words a second), zh 4.5, ko 6.5.
They are typical figures, not measured on your data: set `rates` from your corpus (total alnum characters
over total seconds) for tighter windows.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..llasa import TOKENS_PER_SECOND, XCODEC2_CODEBOOK_SIZE
from .base import OK, RewardBase, RewardResult, SpeechSample, code_reason
from .text import base_language

DEFAULT_RATES = {"en": 12.0, "zh": 4.5, "ko": 6.5}


def text_units(text: str) -> int:
    """Letters and digits of a text (spaces and punctuation are not spoken)."""
    return sum(ch.isalnum() for ch in text)


def duration_score(ratio: torch.Tensor, tolerance: float, softness: float) -> torch.Tensor:
    """(N,) actual / expected duration -> (N,) reward in (0, 1]: 1 inside [1/(1+tol), 1+tol],
    exp(-(excess / softness)^2) outside."""
    excess = (ratio.log().abs() - math.log1p(tolerance)).clamp(min=0.0)
    return torch.exp(-(excess / softness).square())


class DurationReward(RewardBase):
    """Reward 1 inside a window around the expected duration of the text, a smooth penalty outside (module doc)."""

    def __init__(
        self,
        rates: dict[str, float] | None = None,
        language: str = "en",
        tolerance: float = 0.25,
        softness: float = 0.3,
        tokens_per_second: float = TOKENS_PER_SECOND,
        reference_rate: bool = True,
        max_rate_factor: float = 2.0,
        codebook_size: int = XCODEC2_CODEBOOK_SIZE,
    ) -> None:
        """
        Args:
            rates: letters/digits per second per language, e.g. {en: 12.0, zh: 4.5, ko: 6.5} (the defaults);
                given keys replace the defaults of those languages, the others stay.
            language: the language of samples that carry none.
            tolerance: half-width of the flat window as a factor: 0.25 accepts 0.8x..1.25x the expected length.
            softness: how fast the reward falls outside the window, in log-duration: at `softness` beyond the edge
                (0.3: about 1.35x further) it is 1/e.
            tokens_per_second: codec frame rate (X-codec2: 50).
            reference_rate: with a voice-cloning prompt, expect the reference speaker's rate (units of prompt_text
                per second of prompt_codes) instead of the language's.
            max_rate_factor: the reference's rate is kept within rate / factor .. rate * factor of the language's.
            codebook_size: codes outside [0, codebook_size) are invalid (X-codec2: 65,536).
        """
        self.rates = {**DEFAULT_RATES, **(rates or {})}
        bad = {k: v for k, v in self.rates.items() if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"--rates {bad}: every rate must be a positive number of letters/digits per second")
        if base_language(language) not in self.rates:
            raise ValueError(f"--language={language!r} has no rate; add it to --rates (known: {sorted(self.rates)})")
        if tolerance < 0 or softness <= 0 or tokens_per_second <= 0 or max_rate_factor < 1:
            raise ValueError(
                f"--tolerance={tolerance} must be >= 0, --softness={softness} and --tokens_per_second="
                f"{tokens_per_second} > 0, --max_rate_factor={max_rate_factor} >= 1"
            )
        self.language = language
        self.tolerance, self.softness = tolerance, softness
        self.tokens_per_second = tokens_per_second
        self.reference_rate, self.max_rate_factor = reference_rate, max_rate_factor
        self.codebook_size = codebook_size

    def rate(self, s: SpeechSample) -> float:
        """Expected letters/digits per second for this sample (the reference's own when it has one)."""
        language = base_language(s.language or self.language)
        if language not in self.rates:
            raise ValueError(
                f"DurationReward has no speaking rate for language {s.language!r} (text {s.text[:40]!r}); "
                f"add it: --rates '{{{language}: <letters per second>}}' (known: {sorted(self.rates)})"
            )
        rate = self.rates[language]
        if self.reference_rate and s.prompt_text and s.prompt_codes:
            own = text_units(s.prompt_text) / (len(s.prompt_codes) / self.tokens_per_second)
            if own > 0:
                rate = min(max(own, rate / self.max_rate_factor), rate * self.max_rate_factor)
        return rate

    def expected_seconds(self, s: SpeechSample) -> float:
        return max(text_units(s.text), 1) / self.rate(s)

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        n = len(samples)
        reasons = [code_reason(s, self.codebook_size) for s in samples]
        seconds, expected = torch.full((n,), math.nan), torch.full((n,), math.nan)
        for i, s in enumerate(samples):
            if reasons[i] == OK:
                seconds[i] = len(s.codes) / self.tokens_per_second
                expected[i] = self.expected_seconds(s)
        ratio = seconds / expected  # (N,) NaN where not measured
        scored = ~ratio.isnan()
        rewards = torch.where(scored, duration_score(ratio, self.tolerance, self.softness), torch.zeros(n))
        return RewardResult(
            rewards=rewards.float(),
            metrics={"duration_s": seconds.float(), "duration_ratio": ratio.float()},
            reasons=reasons,
        )
