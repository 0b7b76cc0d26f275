"""Text normalisation per language and the character error rate (CER) the reward uses.

The original scored raw strings, so case, punctuation and spacing counted as errors; here both sides
are normalised first:
  - English ("en"): Whisper's EnglishTextNormalizer (case, punctuation, spelled-out numbers,
    British/American spellings), so "Twenty-one." and "21" agree;
  - Chinese, Japanese, Korean, Thai ("zh", "ja", "ko", "th", ...): Whisper's BasicTextNormalizer
    (case, punctuation, symbols), then all whitespace removed, because word spacing in these
    scripts is absent or inconsistent and CER is the standard metric on characters;
  - any other language: BasicTextNormalizer, whitespace collapsed to single spaces.
CER is jiwer's character error rate on the normalised strings: (S + D + I) / len(reference), >= 0
and possibly > 1. An empty hypothesis scores CER 1.0, never 0 (the original replaced an empty
transcript with the ground truth, so silence scored perfectly).
"""

from __future__ import annotations

import re
from functools import lru_cache

import jiwer
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

# Languages written without (reliable) spaces between words: CER on characters, spaces removed.
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "ko", "th", "lo", "my", "km", "yue", "bo"})


@lru_cache(maxsize=None)
def _english() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


@lru_cache(maxsize=None)
def _basic() -> BasicTextNormalizer:
    return BasicTextNormalizer()


def normalize(text: str, language: str | None) -> str:
    """Normalise `text` for CER in `language` (ISO 639-1 code, e.g. "en", "ko"; None = basic)."""
    language = (language or "").lower()
    if language == "en" or language.startswith("en-"):
        return re.sub(r"\s+", " ", _english()(text)).strip()
    text = _basic()(text)
    if language in NO_SPACE_LANGUAGES:
        return re.sub(r"\s+", "", text)
    return re.sub(r"\s+", " ", text).strip()


def cer(reference: str, hypothesis: str, language: str | None) -> float:
    """Character error rate of `hypothesis` against `reference` after normalisation.

    Raises ValueError when the reference is empty after normalisation: a data error, not a sample's.
    """
    ref = normalize(reference, language)
    if not ref:
        raise ValueError(
            f"reference text {reference!r} is empty after {language or 'basic'} normalisation; "
            "fix the data set row (a ground-truth text must contain speakable characters)"
        )
    hyp = normalize(hypothesis, language)
    if not hyp:
        return 1.0
    return float(jiwer.cer(ref, hyp))
