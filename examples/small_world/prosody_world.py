"""The prosody world: the small world's 27 words, each recorded at 3 pitches x 2 rates, so a policy chooses a contour.

A code is `word * 6 + variant`, variant = `pitch * 2 + rate` (pitch 0 low, 1 mid, 2 high: espeak-ng `-p` of
`PITCHES`; rate 0 normal, 1 slow: `-s` of `RATES`), then the 3 junk units of the words world: 165 codes. The
same sentence can be said with any contour; Whisper reads every variant, so a CER+NLL reward is free to prefer
some of them, which is how a GRPO run can flatten prosody while its CER falls (Shin et al., arXiv 2509.18531).

The warm start's targets (`contour`) follow a distribution of natural contours over the 6 words of a sentence:
    declination   high, high, mid, mid, low, low (statements)
    emphasis      declination with one word (not the last) said high and slow (half of the statements)
    question      mid ... mid, high, high: a final rise (prompts that end with '?', a third of them)
    lengthening   the last word is always slow (phrase-final lengthening)
None is monotone (one pitch level throughout). `diversity` measures a set of code sequences the same way:
entropy of the chosen variants, distinct pitch patterns per sample, the share of monotone samples; `f0_spread`
adds the Praat voiced-F0 std in semitones of the decoded audio (reward/prosody.py, as training logs it).

The recordings ship as `units_prosody.npz` (2.4 MB); `make_unit_codec.py --world prosody` records them again
(espeak-ng and sox; the file names the espeak-ng version), and the codec does so itself if the file is missing.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from small_world.unit_codec import JUNK_UNITS, WORDS, UnitCodec, text_to_codes
from small_world.unit_codec import make_prompt_sets as words_prompt_sets

HERE_DIR = Path(__file__).resolve().parent

PITCHES = {"low": 40, "mid": 65, "high": 95}  # espeak-ng -p: ~89 / 114 / 162 Hz; at -p 20 Praat made octave errors
RATES = {"normal": 150, "slow": 105}  # espeak-ng -s, words per minute
NUM_VARIANTS = len(PITCHES) * len(RATES)  # 6
NUM_WORD_CODES = len(WORDS) * NUM_VARIANTS  # 162
PROSODY_UNITS = tuple(f"{w}/{p}/{r}" for w in WORDS for p in PITCHES for r in RATES) + JUNK_UNITS
NUM_PROSODY_UNITS = len(PROSODY_UNITS)  # 165: the policy's num_speech_tokens
LOW, MID, HIGH = 0, 1, 2
NORMAL, SLOW = 0, 1
QUESTION_SHARE = 1 / 3
EMPHASIS_SHARE = 0.5  # of statements
TRAIN_PROMPTS = HERE_DIR / "prompts_prosody_train.jsonl"
TEST_PROMPTS = HERE_DIR / "prompts_prosody_test.jsonl"
CONFIG = HERE_DIR / "prosody.yaml"


def config_args(config: Path = CONFIG) -> list[str]:
    """`--config` (prosody.yaml by default) and the prosody world's prompt files, as absolute paths."""
    return ["--config", str(config), f"--data.train_data={TRAIN_PROMPTS}", f"--data.val_data={TEST_PROMPTS}"]


def code_of(word: int, pitch: int, rate: int) -> int:
    """Code of word `word` (index into WORDS) at pitch level `pitch` and rate `rate`."""
    if not (0 <= word < len(WORDS) and 0 <= pitch < len(PITCHES) and 0 <= rate < len(RATES)):
        raise ValueError(f"word {word}, pitch {pitch}, rate {rate} outside 0..{len(WORDS) - 1}, 0..2, 0..1")
    return word * NUM_VARIANTS + pitch * len(RATES) + rate


def split_code(code: int) -> tuple[int, int, int] | None:
    """(word, pitch, rate) of a word code; None for a junk unit or a code outside the vocabulary."""
    if not 0 <= code < NUM_WORD_CODES:
        return None
    word, variant = divmod(code, NUM_VARIANTS)
    return word, *divmod(variant, len(RATES))


def word_units(codes: Sequence[int]) -> list[int]:
    """The words world's codes of `codes` (prosody dropped; junk j -> 27 + j), for unit error rates."""
    out = []
    for c in codes:
        split = split_code(int(c))
        out.append(split[0] if split else len(WORDS) + int(c) - NUM_WORD_CODES)
    return out


def recordings() -> list[tuple[str, str, int, int]]:
    """(name, word, espeak speed, espeak pitch) of every word code, in code order."""
    return [(f"{w}/{p}/{r}", w, speed, pitch) for w in WORDS for p, pitch in PITCHES.items() for r, speed in RATES.items()]


def default_units_path() -> Path:
    """The shipped recordings of the prosody world."""
    return HERE_DIR / "units_prosody.npz"


class ProsodyUnitCodec(UnitCodec):
    """SpeechDecoder of the prosody world (module docstring): UnitCodec over 165 units, recorded on first use."""

    expected_units = PROSODY_UNITS
    make_command = "python examples/small_world/make_unit_codec.py --world prosody --out {path}"

    def __init__(self, units_path: str | None = None, gap_s: float = 0.06, gain: float = 1.0) -> None:
        """
        Args:
            units_path: a file written by `make_unit_codec.py --world prosody`; None: the shipped
                units_prosody.npz, recorded with espeak-ng and sox if missing (about 10 s).
            gap_s: silence between units and at both ends, in seconds.
            gain: amplitude multiplier applied to every unit.
        """
        path = Path(units_path) if units_path else default_units_path()
        if units_path is None and not path.exists():
            script = Path(__file__).with_name("make_unit_codec.py")
            subprocess.run([sys.executable, str(script), "--world", "prosody", "--out", str(path)], check=True,
                           stdout=subprocess.DEVNULL)
        super().__init__(str(path), gap_s, gain)


def make_prompt_sets(num_train: int = 256, num_test: int = 48, seed: int = 0) -> tuple[list[str], list[str]]:
    """The words world's sentences (`unit_codec.make_prompt_sets`), a third of them (fixed by `seed`) as questions."""
    rng = random.Random(seed + 1)
    return tuple(  # type: ignore[return-value]
        [t[:-1] + "?" if rng.random() < QUESTION_SHARE else t for t in texts]
        for texts in words_prompt_sets(num_train, num_test, seed)
    )


def contour(text: str, rng: random.Random) -> list[tuple[int, int]]:
    """(pitch, rate) of each word of `text`, drawn from the warm start's contours (module docstring)."""
    n = len(text_to_codes(text.rstrip("?")))
    if text.rstrip().endswith("?"):
        pitches = [MID] * max(0, n - 2) + [HIGH] * min(2, n)
        rates = [NORMAL] * n
    else:
        pitches = [HIGH if i < n / 3 else MID if i < 2 * n / 3 else LOW for i in range(n)]
        rates = [NORMAL] * n
        if n > 1 and rng.random() < EMPHASIS_SHARE:
            k = rng.randrange(n - 1)
            pitches[k], rates[k] = HIGH, SLOW
    rates[-1] = SLOW
    return list(zip(pitches, rates))


def speak_codes(words: Sequence[int], prosody: Sequence[tuple[int, int]]) -> list[int]:
    """Codes of `words` (words-world codes, junk allowed) said with `prosody` ((pitch, rate) per word)."""
    return [code_of(w, p, r) if w < len(WORDS) else NUM_WORD_CODES + w - len(WORDS) for w, (p, r) in zip(words, prosody)]


def pitch_pattern(codes: Sequence[int]) -> tuple[int, ...]:
    """Pitch level of each word code of `codes` (junk skipped)."""
    return tuple(s[1] for s in map(split_code, map(int, codes)) if s)


def diversity(samples: Sequence[Sequence[int]]) -> dict[str, float]:
    """Prosody diversity of code sequences, from the codes alone.

    variant_entropy_bits  entropy of the variant (pitch x rate) of every word code of every sample; 0 when one
                          variant is always chosen, log2(6) = 2.58 when all are equally likely
    contour_variety       distinct pitch patterns / samples with a word code
    monotone_share        share of samples with 2+ word codes all at one pitch level
    """
    variants = Counter(split_code(int(c))[1] * len(RATES) + split_code(int(c))[2]
                       for codes in samples for c in codes if split_code(int(c)))
    total = sum(variants.values())
    entropy = -sum(k / total * math.log2(k / total) for k in variants.values()) if total else math.nan
    patterns = [pitch_pattern(codes) for codes in samples]
    spoken = [p for p in patterns if p]
    long = [p for p in spoken if len(p) >= 2]
    return {
        "variant_entropy_bits": entropy,
        "contour_variety": len(set(spoken)) / len(spoken) if spoken else math.nan,
        "monotone_share": sum(len(set(p)) == 1 for p in long) / len(long) if long else math.nan,
    }


def f0_spread(codec: UnitCodec, samples: Sequence[Sequence[int]], texts: Sequence[str]) -> dict[str, float]:
    """Mean per-sample voiced-F0 std in semitones of the decoded samples (Praat, reward/prosody.py's f0_std_st,
    the statistic training logs as prosody/f0_std_st) and the share of samples it could measure."""
    from lightning_grpo.reward.prosody import prosody_stats

    audios = [codec.decode_one(codes) for codes in samples]
    values = prosody_stats(audios, list(texts), codec.sample_rate).values["f0_std_st"]
    measured = values[~values.isnan()]
    return {"f0_std_st": float(measured.mean()) if len(measured) else math.nan,
            "f0_measured_share": len(measured) / max(1, len(values))}

