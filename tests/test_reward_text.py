import pytest

from lightning_grpo.reward.text import cer, normalize


def test_english_normaliser_ignores_case_punctuation_and_number_style():
    assert normalize("Twenty-one dogs, Mr. Smith!", "en") == "21 dogs mister smith"
    assert cer("Hello, World!", "hello world", "en") == 0.0
    assert cer("I have 21 apples.", "I have twenty-one apples", "en") == 0.0


def test_korean_and_chinese_ignore_spacing_and_punctuation():
    assert normalize("안녕하세요, 세계!", "ko") == "안녕하세요세계"
    assert cer("안녕하세요, 세계!", "안녕 하세요 세계", "ko") == 0.0
    assert cer("你好，世界。", "你好 世界", "zh") == 0.0
    # one wrong character out of four
    assert cer("你好世界", "你好世间", "zh") == pytest.approx(0.25)


def test_cer_counts_real_errors_and_can_exceed_one():
    assert cer("abcd", "abcx", "en") == pytest.approx(0.25)
    assert cer("abc", "abc abc abc", "de") == pytest.approx(8 / 3)


def test_empty_transcript_is_cer_one_never_zero():
    assert cer("The cat sat.", "", "en") == 1.0
    assert cer("The cat sat.", "  ...  ", "en") == 1.0


def test_empty_reference_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'!!!'"):
        cer("!!!", "hello", "en")
