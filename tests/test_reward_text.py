"""CER normalisation per language: same words in another form score 0, real substitutions keep their cost."""

import random
import unicodedata

import cn2an
import jiwer
import pytest

from lightning_grpo.reward.text import (
    KO_MAX_CHOICES,
    best_reading_cer,
    cer,
    korean_reading,
    korean_readings,
    native_korean,
    normalize,
    seed_tts_error,
    sino_korean,
)

# (reference, hypothesis) pairs that say the same words: CER must be 0.
SAME_WORDS = {
    "zh": [
        ("今天早上火车晚了二十分钟。", "今天早上火車晚了20分鐘"),  # the issue's example: script + digits + punctuation
        ("我们一起去图书馆看书", "我們一起去圖書館看書"),  # script
        ("晚了20分钟", "晚了二十分钟"),  # numerals, the other way
        ("两千零二十四年", "2024年"),
        ("二零二四年", "2024年"),
        ("他有十万块钱", "他有10万块钱"),  # digits with a written-out unit
        ("百分之五十的人", "50%的人"),
        ("三点五公斤", "3.5公斤"),
        ("你好，世界。", "你好 世界"),  # punctuation and spacing
        ("你好世界", "你好\u3000世界"),  # the ideographic space
        ("价格是１２０元", "价格是一百二十元"),  # full-width digits
    ],
    "ko": [
        ("이십 분 늦었어요.", "20분 늦었어요"),  # the issue's example
        ("20분 늦었어요", "이십 분 늦었어요."),  # the other way
        ("스무 살이에요", "20살이에요"),  # native counting word
        ("오후 세 시 삼십 분", "오후 3시 30분"),
        ("학생 두 명", "학생 2명"),
        ("첫 번째 질문", "1번째 질문"),
        ("만 원이에요", "1만 원이에요"),  # 만, not 일만
        ("천 원", "1,000원"),
        ("이천이십사 년 유월 십 일", "2024년 6월 10일"),  # Sino-Korean, and the irregular 유월
        ("삼 개월", "3개월"),  # Sino-Korean although 개 alone is native
        ("오십 퍼센트", "50%"),
        ("안녕하세요, 세계!", "안녕 하세요 세계"),  # punctuation and spacing
        ("안녕하세요", unicodedata.normalize("NFD", "안녕하세요")),  # decomposed jamo (macOS text)
    ],
    "en": [
        ("I have twenty-one apples.", "I have 21 apples"),  # numerals
        ("I have 21 apples", "i have twenty one apples"),  # the other way
        ("It costs five dollars", "It costs $5."),
        ("Hello, World!", "hello   world"),  # punctuation, case, spacing
        ("The colour of the sea", "the color of the sea"),  # spelling variant
        ("ＨＥＬＬＯ world", "hello world"),  # full-width letters
    ],
}

# (reference, hypothesis, expected CER): real substitutions keep their cost after normalisation.
REAL_ERRORS = {
    "zh": [
        ("你好世界", "你好世间", 1 / 4),
        ("晚了二十分钟", "晚了30分钟", 1 / 6),  # 晚了20分钟: one digit wrong
        ("我們一起去", "我们一起来", 1 / 5),  # script is forgiven, the verb is not
    ],
    "ko": [
        ("이십 분", "30분", 1 / 3),  # 이십분 vs 삼십분
        ("20살", "이십 살", 2 / 3),  # a wrong reading: 스무살 vs 이십살
        ("안녕하세요", "안녕하십시오", 3 / 5),
    ],
    "en": [
        ("the cat sat", "the hat sat", 1 / 11),
        ("I have 21 apples", "I have 22 apples", 1 / 16),
    ],
}


@pytest.mark.parametrize("language,reference,hypothesis", [(lang, r, h) for lang, pairs in SAME_WORDS.items() for r, h in pairs])
def test_same_words_in_another_form_score_zero(language, reference, hypothesis):
    assert cer(reference, hypothesis, language) == 0.0, (normalize(reference, language), normalize(hypothesis, language))


@pytest.mark.parametrize("language,reference,hypothesis,expected", [(lang, *x) for lang, xs in REAL_ERRORS.items() for x in xs])
def test_real_substitutions_keep_their_cer(language, reference, hypothesis, expected):
    assert cer(reference, hypothesis, language) == pytest.approx(expected)


def test_issue_example_before_and_after_and_the_plain_switches():
    ref, hyp = "今天早上火车晚了二十分钟。", "今天早上火車晚了20分鐘"
    assert cer(ref, hyp, "zh") == 0.0
    # Seed-TTS-eval's processing converts the script but not numerals: 二十 vs 20 is two of 12 characters
    assert cer(ref, hyp, "zh", "seed_tts") == pytest.approx(2 / 12)
    # raw: the original recipe's jiwer CER on unprocessed strings (script, digits and the full stop count)
    assert cer(ref, hyp, "zh", "raw") == pytest.approx(jiwer.cer(ref, hyp)) == pytest.approx(5 / 13)  # 車 二 十 鐘 。
    with pytest.raises(ValueError, match="normalization='plain'"):
        cer(ref, hyp, "zh", "plain")


def test_every_chinese_numeral_meets_its_digits():
    """cn2an's own an2cn spelling of random numbers normalises to the digits (numbers to 10^9)."""
    rng = random.Random(0)
    for _ in range(300):
        n = rng.choice([rng.randrange(100), rng.randrange(10**4), rng.randrange(10**9)])
        assert cer(f"我有{n}个苹果", f"我有{cn2an.an2cn(n)}个苹果", "zh") == 0.0, n


def test_korean_number_reader_by_hand():
    assert [sino_korean(n) for n in (0, 1, 10, 11, 20, 101, 1000, 1100, 2024, 10_000, 10_001, 120_000, 10**8)] == [
        "영", "일", "십", "십일", "이십", "백일", "천", "천백", "이천이십사", "만", "만일", "십이만", "일억"]
    assert [native_korean(n) for n in (1, 2, 3, 4, 10, 11, 20, 21, 99)] == [
        "한", "두", "세", "네", "열", "열한", "스무", "스물한", "아흔아홉"]
    assert korean_reading("13시 24시간 100명 3.5만 20대 차 2대 010-1234") == "십삼시 스물네시간 백명 삼점오만 이십대 차 두대 공일공-일이삼사"
    with pytest.raises(ValueError, match="1..99"):
        native_korean(100)


def test_normalisation_never_raises_and_a_text_always_matches_itself():
    rng = random.Random(1)
    alphabet = list("0123456789.,-%:/ 만억천백원분시살개번째월대") + list("一二三四五六七八九十百千万亿零两点之个年负") + list("abXY!?。，")
    for language in ("ko", "zh", "en", "ja", None):
        for _ in range(300):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 16)))
            for mode in ("full", "seed_tts", "raw"):
                if normalize(s, language, mode).strip():
                    assert cer(s, s, language, mode) == 0.0, (s, language, mode)


def test_seed_tts_error_is_wer_for_english_and_cer_for_chinese():
    assert seed_tts_error("Hello, World!", "hello world", "en") == 0.0
    assert seed_tts_error("the cat sat down", "the hat sat down", "en") == pytest.approx(1 / 4)  # words, not characters
    assert seed_tts_error("don't stop", "dont stop", "en") == pytest.approx(1 / 2)  # the apostrophe is kept
    assert seed_tts_error("今天早上火车晚了二十分钟。", "今天早上火車晚了二十分鐘", "zh") == 0.0  # zhconv on the hypothesis
    assert seed_tts_error("今天早上火车晚了二十分钟。", "今天早上火车晚了20分钟", "zh") == pytest.approx(2 / 12)  # no numerals
    assert seed_tts_error("你好 世界", "你好世界", "zh") == 0.0  # spaces are not characters
    assert seed_tts_error("你好世界", "", "zh") == 1.0
    with pytest.raises(ValueError, match="'ko'"):
        seed_tts_error("안녕", "안녕", "ko")


def test_cer_counts_real_errors_and_can_exceed_one():
    assert cer("abcd", "abcx", "en") == pytest.approx(0.25)
    assert cer("abc", "abc abc abc", "de") == pytest.approx(8 / 3)


def test_empty_transcript_is_cer_one_never_zero():
    for mode in ("full", "seed_tts", "raw"):
        assert cer("The cat sat.", "", "en", mode) == 1.0
    assert cer("The cat sat.", "  ...  ", "en") == 1.0


def test_empty_reference_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'!!!'"):
        cer("!!!", "hello", "en")


# Korean numbers with several readings: (reference, transcript, expected CER). A correct reading of either kind
# scores 0; a reading that the context rules out, or another number, keeps its cost.
KOREAN_READINGS = [
    ("5번 출구로 나가세요", "오 번 출구로 나가세요", 0.0),  # a numbered exit: Sino
    ("5번 출구로 나가세요", "다섯 번 출구로 나가세요", 2 / 9),  # 오 -> 다섯: one substitution, one insertion
    ("그 영화를 5번 봤다", "그 영화를 다섯 번 봤다", 0.0),  # times: native
    ("그 영화를 5번 봤다", "그 영화를 오 번 봤다", 0.0),  # the verb does not settle it: both readings pass
    ("5번씩 했다", "다섯 번씩 했다", 0.0),  # a counting particle: native only
    ("5번씩 했다", "오 번씩 했다", 2 / 6),
    ("5번 했다", "여섯 번 했다", 1 / 5),  # another number is charged under the best reading (다섯번했다)
    ("차 2대", "차 이 대", 0.0),  # 대: native (vehicles) or Sino (ratios)
    ("305호로 오세요", "삼공오 호로 오세요", 0.0),  # a room number digit by digit
    ("305호로 오세요", "삼백오 호로 오세요", 0.0),  # or as a number
    ("010-1234-5678", "영일영 일이삼사 오육칠팔", 0.0),  # 0 as 영 in a phone number
    ("2024년", "이공이사 년", 2 / 6),  # a year is not a code
    ("20살", "이십 살", 2 / 3),  # 살 has one reading
]


@pytest.mark.parametrize("reference,hypothesis,expected", KOREAN_READINGS)
def test_korean_numbers_score_against_their_best_reading(reference, hypothesis, expected):
    assert cer(reference, hypothesis, "ko") == pytest.approx(expected)


@pytest.mark.parametrize("reference,hypothesis,expected", KOREAN_READINGS)
def test_korean_readings_work_both_ways(reference, hypothesis, expected):
    """A transcript in digits meets a reference in words: the digits' readings are tried too."""
    if expected == 0.0:
        assert cer(hypothesis, reference, "ko") == 0.0


def test_korean_readings_slots_and_the_cap():
    template, choices = korean_readings("그 영화를 5번 봤다")
    assert template == "그 영화를 \ue000번 봤다" and choices == [("다섯", "오")]
    assert korean_reading("그 영화를 5번 봤다") == "그 영화를 다섯번 봤다"  # `normalize` keeps the usual reading
    many = " ".join(f"{i}번" for i in range(1, 41))  # 40 numbers with two readings each
    template, choices = korean_readings(many)
    assert len(choices) == KO_MAX_CHOICES and template.count("번") == 40
    # past the cap a number keeps its usual reading: the 20th number read the other way is charged
    sino_20th = many.replace(" 20번 ", " 이십 번 ")
    assert cer(many, sino_20th, "ko") > 0
    assert cer(many, many.replace(" 3번 ", " 삼 번 "), "ko") == 0.0  # within the cap
    assert korean_readings("a\ue000b") == ("ab", [])  # slot characters in the input are dropped


def test_best_reading_search_is_greedy_per_slot():
    """One CER evaluation per extra reading, not the product of the readings."""
    calls = []
    original = jiwer.cer
    try:
        jiwer.cer = lambda r, h: calls.append((r, h)) or original(r, h)
        best = best_reading_cer("\ue000\ue001\ue002", [("a", "b")] * 3, "bbb", [])
    finally:
        jiwer.cer = original
    assert best == 0.0 and len(calls) == 4  # aaa, baa, bba, bbb


def test_korean_cer_benchmark_runs():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_korean_cer.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| other | 3 |" in proc.stdout and "| many | 1 |" in proc.stdout
