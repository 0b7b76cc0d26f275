"""The small world's prosody variant (examples/small_world/prosody_world.py): its codec's pitch levels on real
espeak-ng speech, the warm start's contours, the diversity measures, and its configs run through the CLI."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from small_world import prosody_world as pw  # noqa: E402
from small_world.unit_codec import JUNK_UNITS, WORDS, UNITS, text_to_codes  # noqa: E402
from small_world.warm_start import WarmStartConfig, cache_key, target_codes, warm_config, warm_start  # noqa: E402
from lightning_grpo.reward.pitch import track_pitch  # noqa: E402

from reward_fixtures import espeak_ng  # noqa: E402

SOME_WORDS = ("cat", "horse", "happy", "pulls", "this", "tree")


@pytest.fixture(scope="module")
def codec():
    return pw.ProsodyUnitCodec()


def median_st(wav: torch.Tensor) -> float:
    """Median voiced F0 of `wav`, in semitones re 100 Hz (Praat, as the prosody statistics track it)."""
    track = track_pitch([wav])[0]
    f0 = np.asarray(track.f0)[np.asarray(track.voiced)]
    assert len(f0) >= 5, "too few voiced frames"
    return float(np.median(12 * np.log2(f0 / 100.0)))


def test_codes_are_word_times_variant_then_junk():
    assert pw.NUM_PROSODY_UNITS == 27 * 6 + 3 == len(pw.PROSODY_UNITS)
    cat = WORDS.index("cat")
    assert pw.code_of(cat, pw.HIGH, pw.SLOW) == cat * 6 + 2 * 2 + 1
    assert pw.split_code(pw.code_of(cat, pw.LOW, pw.SLOW)) == (cat, pw.LOW, pw.SLOW)
    assert pw.PROSODY_UNITS[pw.code_of(cat, pw.MID, pw.NORMAL)] == "cat/mid/normal"
    junk = [pw.NUM_WORD_CODES + j for j in range(3)]
    assert [pw.split_code(c) for c in junk] == [None] * 3
    assert pw.word_units([pw.code_of(cat, pw.HIGH, pw.NORMAL), *junk]) == [UNITS.index("cat")] + [UNITS.index(u) for u in JUNK_UNITS]
    with pytest.raises(ValueError, match="pitch 3"):
        pw.code_of(cat, 3, 0)


def test_pitch_levels_differ_in_measured_f0_and_slow_is_longer(codec):
    for word in SOME_WORDS:
        w = WORDS.index(word)
        for rate in (pw.NORMAL, pw.SLOW):
            low, mid, high = (median_st(codec.units[pw.code_of(w, p, rate)]) for p in (pw.LOW, pw.MID, pw.HIGH))
            # measured over all 27 words: low -> mid 4.8 st (at least 4.4), mid -> high 6.0 st (at least 5.7)
            assert mid - low > 3.5 and high - mid > 4.5, (word, rate, low, mid, high)
        normal, slow = (len(codec.units[pw.code_of(w, pw.MID, r)]) for r in (pw.NORMAL, pw.SLOW))
        assert slow > 1.2 * normal, word


def test_shipped_units_are_what_espeak_ng_says(codec):
    """The shipped recordings are espeak-ng at the documented settings: a fresh reading measures the same F0."""
    for pitch in ("low", "high"):
        fresh = espeak_ng("horse", speed=pw.RATES["normal"], extra=("-p", str(pw.PITCHES[pitch])))
        shipped = codec.units[pw.code_of(WORDS.index("horse"), list(pw.PITCHES).index(pitch), pw.NORMAL)]
        assert abs(median_st(fresh) - median_st(shipped)) < 0.5


def test_a_codec_file_of_the_other_world_is_refused_with_the_command_to_remake_it():
    with pytest.raises(ValueError, match="make_unit_codec.py --world prosody"):
        pw.ProsodyUnitCodec(str(ROOT / "examples" / "small_world" / "units_en.npz"))


def test_prompts_are_the_grammar_a_third_as_questions():
    train, test = pw.make_prompt_sets()
    shipped = [json.loads(line)["text"] for line in pw.TEST_PROMPTS.read_text().splitlines()]
    assert shipped == test and len(pw.TRAIN_PROMPTS.read_text().splitlines()) == len(train) == 256
    questions = sum(t.endswith("?") for t in train + test) / len(train + test)
    assert 0.25 < questions < 0.42
    assert all(len(text_to_codes(t)) == 6 for t in train + test)


def test_warm_start_targets_have_the_contours_claimed():
    rng = random.Random(0)
    statements, emphasised = 0, 0
    for text in pw.make_prompt_sets()[0][:120]:
        codes = target_codes(text, 0.0, rng, "prosody")
        assert pw.word_units(codes) == text_to_codes(text)  # the words are unchanged without label noise
        pitch = [pw.split_code(c)[1] for c in codes]
        rate = [pw.split_code(c)[2] for c in codes]
        assert rate[-1] == pw.SLOW  # phrase-final lengthening
        assert len(set(pitch)) > 1  # never monotone
        if text.endswith("?"):
            assert pitch == [pw.MID] * 4 + [pw.HIGH] * 2 and rate[:-1] == [pw.NORMAL] * 5  # the final rise
            continue
        statements += 1
        slow_early = [i for i in range(5) if rate[i] == pw.SLOW]
        base = [pw.HIGH, pw.HIGH, pw.MID, pw.MID, pw.LOW, pw.LOW]  # declination
        if slow_early:  # emphasis: one word before the last said high and slow, the rest declines
            (k,) = slow_early
            emphasised += 1
            assert pitch[k] == pw.HIGH and pitch[:k] + pitch[k + 1 :] == base[:k] + base[k + 1 :]
        else:
            assert pitch == base
    assert 0.35 < emphasised / statements < 0.65


def test_words_world_warm_start_keeps_its_cache_key():
    """The shipped words-world warm start stays valid: its key has no `world`; the prosody world's has one."""
    stamp = json.loads((ROOT / "examples" / "small_world" / "warm_seed0" / "warm_start.json").read_text())
    assert stamp["config"] == cache_key(WarmStartConfig())
    assert cache_key(warm_config("prosody"))["world"] == "prosody"
    assert warm_config("words") == WarmStartConfig()
    with pytest.raises(ValueError, match="--world='tones'"):
        warm_config("tones")


def test_diversity_of_monotone_and_varied_code_sets():
    cat, dog = WORDS.index("cat"), WORDS.index("dog")
    monotone = [[pw.code_of(cat, pw.MID, pw.NORMAL), pw.code_of(dog, pw.MID, pw.NORMAL)] for _ in range(4)]
    d = pw.diversity(monotone)
    assert d == {"variant_entropy_bits": 0.0, "contour_variety": 0.25, "monotone_share": 1.0}
    # every variant once over 3 two-word samples, 3 distinct pitch patterns, none monotone; junk is ignored
    variants = [(p, r) for p in range(3) for r in range(2)]
    varied = [[pw.code_of(cat, *variants[2 * i]), pw.code_of(dog, *variants[(2 * i + 3) % 6]), pw.NUM_WORD_CODES]
              for i in range(3)]
    d = pw.diversity(varied)
    assert d["variant_entropy_bits"] == pytest.approx(math.log2(6))
    assert d["contour_variety"] == 1.0 and d["monotone_share"] == 0.0
    half = pw.diversity(monotone[:2] + varied[:2])
    assert half["monotone_share"] == 0.5 and half["contour_variety"] == 0.75
    assert math.isnan(pw.diversity([[pw.NUM_WORD_CODES]])["contour_variety"])


def test_f0_spread_of_a_declining_sentence_exceeds_a_monotone_one(codec):
    """At every level a monotone sentence measures under 2 st (no octave errors: at espeak-ng -p 20 Praat found
    some and measured a monotone sentence at 8.5 st), a contour of the warm start over 3."""
    text = "My red cat likes your ball."
    words = text_to_codes(text)
    for pitch in (pw.LOW, pw.MID, pw.HIGH):
        flat = pw.f0_spread(codec, [pw.speak_codes(words, [(pitch, pw.SLOW)] * 6)], [text])["f0_std_st"]
        assert flat < 2.0, (pitch, flat)
    monotone = pw.speak_codes(words, [(pw.MID, pw.NORMAL)] * 6)
    declining = pw.speak_codes(words, pw.contour(text, random.Random(1)))
    out = pw.f0_spread(codec, [monotone, declining], [text, text])
    assert out["f0_measured_share"] == 1.0
    one = pw.f0_spread(codec, [monotone], [text])["f0_std_st"]
    two = pw.f0_spread(codec, [declining], [text])["f0_std_st"]
    assert two > 3.0 and two > one + 1.5 and out["f0_std_st"] == pytest.approx((one + two) / 2, rel=1e-5)


@pytest.mark.parametrize("config", ["prosody.yaml", "prosody_floor.yaml"])
def test_prosody_config_fits_through_the_cli(config, tmp_path):
    """Both arms' configs parse and train 1 step with the real Whisper tiny.en (a 5-step warm start, 2 samples)."""
    from lightning_grpo.cli import build_cli

    policy = warm_start(tmp_path / "warm", warm_config("prosody", steps=5, num_layers=1, hidden_size=32))
    args = [
        "fit", *pw.config_args(pw.HERE_DIR / config), "--model.model_name_or_path", str(policy),
        "--trainer.max_steps=1", "--trainer.val_check_interval=1", "--data.prompts_per_step=1",
        "--rollout.group_size=4", "--model.num_iterations=1", "--data.max_val_samples=2",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    cli = build_cli(args)
    assert cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert "val/cer_capped_mean" in metrics
    logged = (tmp_path / "grpo" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/prosody/f0_std_st_mean" in logged
    if config == "prosody_floor.yaml":
        assert "train/reward/prosody_mean" in logged and "train/prosody_floor/floor_st_mean" in logged
    reward = yaml.safe_load((pw.HERE_DIR / config).read_text())["rollout"]["reward"]
    assert reward["class_path"].endswith("CompositeReward" if config == "prosody_floor.yaml" else "ShortWindowWhisperReward")
