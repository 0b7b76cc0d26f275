"""Text normalisation per language, the character error rate (CER) the reward uses, and Seed-TTS-eval scoring.

A transcript that says the same words as the reference should score CER 0 whatever its script, number
style, punctuation or spacing; a wrong word must keep its cost. `normalize(text, language)` brings both
sides to one canonical form first. The rules, one function per language, all in this file:

  en          Whisper's EnglishTextNormalizer: case, punctuation, spelled-out numbers both ways
              ("twenty-one" and "21" -> "21", "fifty percent" -> "50%"), British/American spellings.
  zh, yue     NFKC (full-width digits and letters), traditional -> simplified script (`zhconv`,
              "zh-hans": script only, no regional vocabulary swaps), Chinese numerals -> digits
              (`cn2an`: "二十" / "两千零二十四" / "二零二四" -> "20" / "2024" / "2024", "百分之五十" -> "50%"),
              digits with a 万/亿/千/百 unit written out ("10万" -> "100000"), then punctuation removed
              and all whitespace removed. Words -> digits is many-to-one, so every reading of a number
              meets its digits; idioms such as 一样 become "1样" on both sides alike.
  ko          NFKC (composes decomposed NFD jamo), digits -> their Hangul reading (`korean_reading`):
              Sino-Korean by default ("20분" -> "이십분", "2024년" -> "이천이십사년", "1만" -> "만",
              "6월" -> "유월"), native before counting words ("20살" -> "스무살", "3시" -> "세시",
              "2개" -> "두개", "1번째" -> "첫번째"), "%" -> "퍼센트"; then punctuation and all whitespace
              removed. Digits -> Hangul (not the reverse) because Hangul numeral syllables (이, 사, 오,
              일, 만, ...) are also ordinary syllables and particles. `normalize` gives the usual reading;
              `cer` also accepts the others where a number has several: 번/대/장/권 native or Sino
              (5번 했다 -> 다섯 번, 5번 출구 -> 오 번; a following word settles 번 where it can), codes of
              3+ digits digit by digit (305호 -> 삼백오 or 삼공오 호), 0 in codes as 공 or 영.
  ja, th, ... Whisper's BasicTextNormalizer (case, punctuation, symbols), whitespace removed: word
              spacing in these scripts is absent or inconsistent.
  others      BasicTextNormalizer, whitespace collapsed to single spaces.

`normalization` switches the whole rule set, for comparison with published numbers:
  "full"      the rules above (default; the reward's CER);
  "seed_tts"  Seed-TTS-eval's text processing (the convention of LLaSA's and most TTS papers' tables):
              its punctuation list (zhon + ASCII, apostrophe kept) removed, lower case, the hypothesis
              converted with zhconv "zh-cn" for Chinese; no numeral normalisation; spaces dropped
              where CER is on characters;
  "raw"       no normalisation at all: the original recipe's jiwer CER on raw strings.
In every mode an empty hypothesis scores CER 1.0, never 0 (the original replaced an empty transcript with
the ground truth, so silence scored perfectly). `seed_tts_error` reproduces Seed-TTS-eval's per-utterance
score exactly: WER for English, CER for Chinese.
"""

from __future__ import annotations

import re
import string
import unicodedata
import warnings
from functools import lru_cache
from typing import Callable, Literal, Sequence

import cn2an
import jiwer
import zhconv
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer
from zhon.hanzi import punctuation as _ZHON_PUNCTUATION

Normalization = Literal["full", "seed_tts", "raw"]
NORMALIZATIONS: tuple[str, ...] = ("full", "seed_tts", "raw")

# Languages written without (reliable) spaces between words: CER on characters, spaces removed.
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "ko", "th", "lo", "my", "km", "yue", "bo"})
CHINESE = frozenset({"zh", "yue"})


@lru_cache(maxsize=None)
def _english() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


@lru_cache(maxsize=None)
def _basic() -> BasicTextNormalizer:
    return BasicTextNormalizer()


def base_language(language: str | None) -> str:
    """"en-US" -> "en", "ZH" -> "zh", None -> ""."""
    return (language or "").lower().replace("_", "-").split("-")[0]


# ----------------------------------------------------------------------------------------------- Chinese

_ZH_UNITS = {"百": 100, "千": 1_000, "万": 10_000, "亿": 100_000_000}
_ZH_DIGIT_UNIT = re.compile(r"(\d+(?:\.\d+)?)(千|百)?(万|亿)?(?![\d万亿])")


def _zh_digit_unit(m: re.Match) -> str:
    """"10万" -> "100000", "2.5亿" -> "250000000"; left alone when the product is not a whole number."""
    number, small, big = m.groups()
    if small is None and big is None:
        return m.group(0)
    scale = _ZH_UNITS.get(small, 1) * _ZH_UNITS.get(big, 1)
    whole, _, frac = number.partition(".")
    value = int(whole + frac) * scale
    if value % 10 ** len(frac):
        return m.group(0)
    return str(value // 10 ** len(frac))


def _normalize_chinese(text: str) -> str:
    text = zhconv.convert(unicodedata.normalize("NFKC", text), "zh-hans")
    with warnings.catch_warnings():  # cn2an warns on every numeral-like run it leaves alone, e.g. 万一
        warnings.simplefilter("ignore")
        text = cn2an.transform(text, "cn2an")
    text = _ZH_DIGIT_UNIT.sub(_zh_digit_unit, text)
    return re.sub(r"\s+", "", _basic()(text))


# ------------------------------------------------------------------------------------------------ Korean

_KO_DIGITS = "영일이삼사오육칠팔구"
_KO_NATIVE_ONES = ("", "한", "두", "세", "네", "다섯", "여섯", "일곱", "여덟", "아홉")  # forms before a counter
_KO_NATIVE_TENS = ("", "열", "스물", "서른", "마흔", "쉰", "예순", "일흔", "여든", "아흔")
# Counting words read with native numbers from 1 to 99 (세 시, 스무 살, 두 명); "시" (o'clock) only to 12.
_KO_NATIVE_COUNTERS = (
    "번째", "시간", "시", "살", "개", "명", "마리", "번", "권", "잔", "병", "장", "대", "채", "벌", "켤레",
    "그루", "송이", "가지", "군데", "사람", "달", "척", "통", "곳", "쌍", "알", "줄",
)
# Sino-Korean counters with an irregular reading (유월, 시월), and Sino-Korean words that begin like a
# native counter, listed so that the longest match wins (3개월 is 삼 개월, not 세 개월).
_KO_SINO_COUNTERS = ("월", "개월", "개국", "개년", "번지", "번호", "대대", "시즌", "장관")
# Counters whose number is read either way by meaning; `cer` accepts both readings (usual one first):
# 번 times / a number (다섯 번 했다, 오 번 출구), 대 vehicles / decades and ratios (두 대, 이십 대, 이 대 일),
# 장 sheets / chapters, 권 books / volumes.
_KO_EITHER_COUNTERS = ("번", "대", "장", "권")
# Words after 번 that settle its reading: a numbered thing (Sino) or a counting particle (native).
_KO_NAMED_BY_NUMBER = ("출구", "버스", "게이트", "좌석", "자리", "선수", "타자", "트랙", "채널", "문제", "승강장", "국도", "레인")
_KO_COUNTING_AFTER = ("씩", "이나", "정도", "쯤", "만에", "이상", "이하", "밖에", "마다", "더", "연속")
_KO_COUNTER = "|".join(sorted(_KO_NATIVE_COUNTERS + _KO_SINO_COUNTERS, key=len, reverse=True))
# `cer` tries the readings of at most this many numbers per text (the rest keep the usual reading): each costs
# one CER evaluation per extra reading, so a text full of numbers stays cheap.
KO_MAX_CHOICES = 16
_KO_SLOT = "\ue000"  # slot i of `korean_readings` is chr(0xE000 + i), a private-use character
_KO_SLOTS = re.compile(f"[\ue000-{chr(0xE000 + KO_MAX_CHOICES - 1)}]")
_KO_NUMBER = re.compile(r"(\d+(?:\.\d+)?)(천|백)?(만|억|조)?(\s*)(" + _KO_COUNTER + ")?")
_KO_SMALL_UNITS = {"천": 1_000, "백": 100}
_KO_BIG_UNITS = {"만": 10**4, "억": 10**8, "조": 10**12}
_KO_GROUPS = ("", "만", "억", "조", "경")


def _ko_four(n: int) -> str:
    """1..9999 in Sino-Korean: 1 -> 일, 10 -> 십 (not 일십), 1100 -> 천백."""
    out = ""
    for power, unit in ((3, "천"), (2, "백"), (1, "십"), (0, "")):
        d = n // 10**power % 10
        if d:
            out += ("" if d == 1 and unit else _KO_DIGITS[d]) + unit
    return out


def sino_korean(n: int) -> str:
    """A whole number in Sino-Korean: 20 -> 이십, 2024 -> 이천이십사, 10000 -> 만, 10**8 -> 일억.

    Numbers of 10**20 and more are read digit by digit.
    """
    if n < 0:
        raise ValueError(f"sino_korean reads whole numbers >= 0, got {n}")
    if n == 0:
        return "영"
    if n >= 10**20:
        return "".join(_KO_DIGITS[int(d)] for d in str(n))
    parts = []
    for i, suffix in enumerate(_KO_GROUPS):
        n, group = divmod(n, 10_000)
        if group:  # 만 alone, not 일만; 억 and above keep 일 (일억)
            parts.append(("" if group == 1 and i == 1 else _ko_four(group)) + suffix)
        if not n:
            break
    return "".join(reversed(parts))


def native_korean(n: int) -> str:
    """1..99 in native Korean as said before a counter: 1 -> 한, 20 -> 스무, 21 -> 스물한, 99 -> 아흔아홉."""
    if not 1 <= n <= 99:
        raise ValueError(f"native Korean numbers here are 1..99, got {n}")
    if n == 20:
        return "스무"
    return _KO_NATIVE_TENS[n // 10] + _KO_NATIVE_ONES[n % 10]


def _ko_integer(n: int, counter: str) -> str:
    """The Hangul reading of the whole number `n` before `counter` ("" = none)."""
    if counter == "번째":
        return "첫" if n == 1 else (native_korean(n) if n <= 99 else sino_korean(n))
    if counter in _KO_NATIVE_COUNTERS and 1 <= n <= 99:
        if counter == "시" and n > 12:  # 24-hour clock: 십삼 시
            return sino_korean(n)
        if counter == "대" and n % 10 == 0:  # decades of age: 이십 대
            return sino_korean(n)
        return native_korean(n)
    if counter == "월" and n in (6, 10):  # 유월, 시월
        return "유" if n == 6 else "시"
    return sino_korean(n)


def _ko_digit_by_digit(digits: str, zero: str = "공") -> str:
    return "".join(zero if d == "0" else _KO_DIGITS[int(d)] for d in digits)


def _ko_code_readings(digits: str) -> tuple[str, ...]:
    """A code read digit by digit: 0 is 공 or 영 (공일공, 영일영)."""
    return _ko_digit_by_digit(digits), _ko_digit_by_digit(digits, "영")


def _ko_integer_readings(n: int, digits: str, counter: str, after: str) -> tuple[str, ...]:
    """The readings of the whole number `n` (written `digits`) before `counter`, the usual one first; `after` is
    the text that follows the counter (or the number)."""
    readings = [_ko_integer(n, counter)]
    if counter in _KO_EITHER_COUNTERS and 1 <= n <= 99:
        native, sino = native_korean(n), sino_korean(n)
        if counter == "번" and after.startswith(_KO_NAMED_BY_NUMBER):
            return (sino,)
        if counter == "번" and after.startswith(_KO_COUNTING_AFTER):
            return (native,)
        readings.append(sino if readings[0] == native else native)
    # room, bus and phone numbers: 305호 is 삼백오 호 or 삼공오 호
    if len(digits) >= 3 and counter in ("", "번") and (counter or not re.match(r"[가-힣]", after) or after[:1] == "호"):
        readings += _ko_code_readings(digits)
    return tuple(readings)


def _ko_number(m: re.Match, place: Callable[[tuple[str, ...]], str]) -> str:
    number, small, big, space, counter = m.groups()
    units, counter = (small or "") + (big or ""), counter or ""
    if len(number) > 1 and number.startswith("0") and "." not in number:  # 010, 007
        return place(_ko_code_readings(number)) + units + space + counter
    whole, _, frac = number.partition(".")
    if frac:  # read as written: 3.5 -> 삼점오, 3.5만 -> 삼점오만
        return sino_korean(int(whole)) + "점" + _ko_digit_by_digit(frac, "영") + units + space + counter
    value = int(whole) * _KO_SMALL_UNITS.get(small, 1) * _KO_BIG_UNITS.get(big, 1)  # 5천만 -> 오천만
    digits = whole if not units else ""
    return place(_ko_integer_readings(value, digits, counter, m.string[m.end() :].lstrip())) + space + counter


def korean_readings(text: str) -> tuple[str, list[tuple[str, ...]]]:
    """Korean `text` with its numbers in Hangul, where a number with several readings is one slot character
    (U+E000 + i) and `choices[i]` lists its readings, the usual one first. Only the first `KO_MAX_CHOICES` such
    numbers get a slot (the rest keep their usual reading), which bounds the cost of `cer`."""
    text = _KO_SLOTS.sub("", text)  # slot characters are ours
    choices: list[tuple[str, ...]] = []

    def place(readings: tuple[str, ...]) -> str:
        readings = tuple(dict.fromkeys(readings))
        if len(readings) == 1 or len(choices) >= KO_MAX_CHOICES:
            return readings[0]
        choices.append(readings)
        return chr(ord(_KO_SLOT) + len(choices) - 1)

    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # thousands separators
    text = re.sub(r"(\d)\s*%", r"\1퍼센트", text)
    # digit groups joined by hyphens (phone numbers) are read digit by digit
    text = re.sub(r"\d+(?:-\d+)+", lambda m: "-".join(place(_ko_code_readings(g)) for g in m.group(0).split("-")), text)
    return _KO_NUMBER.sub(lambda m: _ko_number(m, place), text), choices


def fill_readings(template: str, choices: list[tuple[str, ...]], picked: Sequence[int] | None = None) -> str:
    """`template` with slot i replaced by `choices[i][picked[i]]` (the usual readings when `picked` is None)."""
    if not choices:
        return template
    picked = picked or [0] * len(choices)
    return template.translate({ord(_KO_SLOT) + i: c[p] for i, (c, p) in enumerate(zip(choices, picked))})


def korean_reading(text: str) -> str:
    """Replace the numbers written in digits in Korean `text` by their usual Hangul reading.

    "오후 3시 20분" -> "오후 세시 이십분"; "1,000원" -> "천원"; "50%" -> "오십퍼센트"; "010-1234" -> "공일공-일이삼사".
    """
    return fill_readings(*korean_readings(text))


def _korean_template(text: str) -> tuple[str, list[tuple[str, ...]]]:
    """Normalised Korean with its slots (see `korean_readings`); the slot characters survive the normaliser."""
    template, choices = korean_readings(unicodedata.normalize("NFKC", text))
    return re.sub(r"\s+", "", _basic()(template)), choices


def _normalize_korean(text: str) -> str:
    return fill_readings(*_korean_template(text))


# --------------------------------------------------------------------------------------------- Seed-TTS

# Seed-TTS-eval's list: zhon's Chinese punctuation plus ASCII punctuation; the apostrophe is kept ("don't").
SEED_TTS_PUNCTUATION = "".join(c for c in _ZHON_PUNCTUATION + string.punctuation if c != "'")


def seed_tts_text(text: str, language: str | None, hypothesis: bool) -> str:
    """Seed-TTS-eval's text processing before scoring (the hypothesis of Chinese is also zhconv "zh-cn")."""
    lang = base_language(language)
    if lang in CHINESE and hypothesis:
        text = zhconv.convert(text, "zh-cn")
    for c in SEED_TTS_PUNCTUATION:
        text = text.replace(c, "")
    text = text.replace("  ", " ")  # once, as Seed-TTS-eval does; jiwer then collapses the rest
    return text if lang in NO_SPACE_LANGUAGES else text.lower()


def seed_tts_error(reference: str, hypothesis: str, language: str | None) -> float:
    """Seed-TTS-eval's score of one utterance: WER for English, CER (over non-space characters) for Chinese.

    Same text processing and jiwer word alignment as its run_wer.py; its reported figure is the plain
    mean of this over utterances. Other languages raise: Seed-TTS-eval defines only these two.
    """
    lang = base_language(language)
    if lang not in ("en", *CHINESE):
        raise ValueError(f"Seed-TTS-eval scores only 'en' (WER) and 'zh' (CER), not language {language!r}")
    ref = seed_tts_text(reference, lang, hypothesis=False)
    hyp = seed_tts_text(hypothesis, lang, hypothesis=True)
    if lang in CHINESE:  # one "word" per character; spaces vanish in jiwer's word split
        ref, hyp = " ".join(ref), " ".join(hyp)
    if not ref.split():
        raise ValueError(f"reference text {reference!r} is empty after Seed-TTS-eval processing; fix the data set row")
    if not hyp.split():
        return 1.0
    return float(jiwer.wer(ref, hyp))


# ----------------------------------------------------------------------------------------------- public


def normalize(text: str, language: str | None, normalization: Normalization = "full", hypothesis: bool = False) -> str:
    """Normalise `text` for CER in `language` (ISO 639-1 code, e.g. "en", "ko"; None = basic rules).

    hypothesis: True for a transcript; only "seed_tts" treats the two sides differently.
    """
    if normalization == "raw":
        return text
    lang = base_language(language)
    if normalization == "seed_tts":
        text = seed_tts_text(text, lang, hypothesis)
        return re.sub(r"\s+", "" if lang in NO_SPACE_LANGUAGES else " ", text).strip()
    if normalization != "full":
        raise ValueError(f"normalization={normalization!r} must be one of {NORMALIZATIONS}")
    if lang == "en":
        return re.sub(r"\s+", " ", _english()(text)).strip()
    if lang in CHINESE:
        return _normalize_chinese(text)
    if lang == "ko":
        return _normalize_korean(text)
    text = _basic()(text)
    if lang in NO_SPACE_LANGUAGES:
        return re.sub(r"\s+", "", text)
    return re.sub(r"\s+", " ", text).strip()


def _readings(
    text: str, language: str | None, normalization: Normalization, hypothesis: bool
) -> tuple[str, list[tuple[str, ...]]]:
    """`text` normalised, with a slot for each number that has several readings, and those readings (Korean's
    "full" rules; elsewhere no slots)."""
    if normalization == "full" and base_language(language) == "ko":
        return _korean_template(text)
    return normalize(text, language, normalization, hypothesis), []


def best_reading_cer(
    ref: str, ref_choices: list[tuple[str, ...]], hyp: str, hyp_choices: list[tuple[str, ...]]
) -> float:
    """CER of `hyp` against `ref`, each slot filled with the reading that lowers it most.

    Greedy, one slot at a time in text order (the reference's, then the hypothesis's), each kept at its best
    reading given the slots before it: 1 + sum(readings - 1) CER evaluations instead of the product of the
    readings. Exact when the numbers are apart in the text (their alignments do not interact), the usual case;
    without slots it is jiwer's CER.
    """
    n = len(ref_choices)
    picked = [0] * (n + len(hyp_choices))

    def error(p: list[int]) -> float:
        return float(jiwer.cer(fill_readings(ref, ref_choices, p[:n]), fill_readings(hyp, hyp_choices, p[n:])))

    best = error(picked)
    for i, readings in enumerate(ref_choices + hyp_choices):
        for j in range(1, len(readings)):
            if best == 0.0:
                return best
            trial = picked[:i] + [j] + picked[i + 1 :]
            e = error(trial)
            if e < best:
                best, picked = e, trial
    return best


def cer(reference: str, hypothesis: str, language: str | None, normalization: Normalization = "full") -> float:
    """Character error rate of `hypothesis` against `reference` after normalisation: (S + D + I) / len(ref).

    Where a Korean number has several readings (`korean_readings`), the reading of either side that matches
    the other best counts, so no correct reading is charged (`best_reading_cer`).
    >= 0 and unbounded above (a looping transcript can score 9); callers that log a mean cap it at 1.
    Raises ValueError when the reference is empty after normalisation: a data error, not a sample's.
    """
    ref, ref_choices = _readings(reference, language, normalization, hypothesis=False)
    if not ref.strip():
        raise ValueError(
            f"reference text {reference!r} is empty after {language or 'basic'} normalisation; "
            "fix the data set row (a ground-truth text must contain speakable characters)"
        )
    hyp, hyp_choices = _readings(hypothesis, language, normalization, hypothesis=True)
    if not hyp.strip():
        return 1.0
    return best_reading_cer(ref, ref_choices, hyp, hyp_choices)
