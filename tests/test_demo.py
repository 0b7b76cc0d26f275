"""The small world's parts (examples/small_world/): the unit codec, its prompt sets, the warm start, and the
reusable parts it uses from the package (the short-window Whisper reward, capped CER)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from small_world import TEST_PROMPTS, TRAIN_PROMPTS  # noqa: E402
from small_world.unit_codec import (  # noqa: E402
    JUNK_UNITS,
    NUM_UNITS,
    UNITS,
    WORDS,
    UnitCodec,
    codes_to_text,
    make_prompt_sets,
    text_to_codes,
)
from small_world.warm_start import (  # noqa: E402
    WarmStartConfig,
    edit_distance,
    teacher_forcing_batch,
    unit_error_rate,
    warm_start,
)
from lightning_grpo.llasa import LlasaVocab  # noqa: E402
from lightning_grpo.reward.base import SpeechSample  # noqa: E402
from lightning_grpo.reward.codec import SpeechDecoder  # noqa: E402


@pytest.fixture(scope="module")
def codec():
    return UnitCodec()


def test_codec_decodes_units_with_gaps(codec):
    assert isinstance(codec, SpeechDecoder) and codec.sample_rate == 16_000
    assert codec.num_codes == NUM_UNITS == len(WORDS) + len(JUNK_UNITS) == 30
    gap = codec.gap.numel()
    a, b = text_to_codes("my red cat")[:2]
    wave = codec.decode([[a, b]])[0]
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert wave.numel() == codec.units[a].numel() + codec.units[b].numel() + 3 * gap
    assert torch.equal(wave[gap : gap + codec.units[a].numel()], codec.units[a])
    assert wave[:gap].abs().max() == 0
    # every word is real, audible speech of plausible length; the silence unit is silent
    for name, unit in zip(codec.names, codec.units):
        if name in WORDS:
            assert 0.15 < unit.numel() / 16_000 < 0.9, name
            assert unit.square().mean().sqrt() > 0.02, name
    assert codec.units[UNITS.index("<sil>")].abs().max() == 0
    assert codec.decode([[]])[0].numel() == gap


def test_codec_rejects_codes_outside_the_vocabulary(codec):
    with pytest.raises(ValueError, match="unit code 30 is outside 0..29"):
        codec.decode([[0, 30]])


def test_text_codes_round_trip_and_unknown_words():
    codes = text_to_codes("Your tall horse eats my cup.")
    assert codes == [UNITS.index(w) for w in ("your", "tall", "horse", "eats", "my", "cup")]
    assert codes_to_text(codes) == "your tall horse eats my cup"
    with pytest.raises(ValueError, match="outside the unit vocabulary"):
        text_to_codes("the zebra")


def test_prompt_sets_are_disjoint_deterministic_and_shipped():
    train, test = make_prompt_sets(256, 48, 0)
    assert len(set(train)) == 256 and len(set(test)) == 48 and not set(train) & set(test)
    assert (train, test) == make_prompt_sets(256, 48, 0)
    assert make_prompt_sets(256, 48, 1) != (train, test)
    for path, texts in ((TRAIN_PROMPTS, train), (TEST_PROMPTS, test)):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["text"] for r in rows] == texts and {r["language"] for r in rows} == {"en"}


def test_teacher_forcing_labels_only_the_completion(tiny_units):
    model, tokenizer = tiny_units
    vocab = LlasaVocab.from_tokenizer(tokenizer)
    ids, mask, labels = teacher_forcing_batch(tokenizer, vocab, ["My red cat likes your ball.", "This big dog eats my cup."])
    for row in range(2):
        target = labels[row][labels[row] != -100].tolist()
        codes = [t - vocab.speech_start_id for t in target[:-1]]
        assert target[-1] == vocab.speech_gen_end_id
        assert codes == text_to_codes(["My red cat likes your ball.", "This big dog eats my cup."][row])
        # the labelled tokens are the last real tokens of the row
        n = int(mask[row].sum())
        assert ids[row, n - len(target) : n].tolist() == target
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2


@pytest.fixture(scope="module")
def tiny_units():
    from lightning_grpo.tiny import build_tiny_llasa

    return build_tiny_llasa(NUM_UNITS, 32, 1, seed=0)


def test_warm_start_learns_is_cached_and_deterministic(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = WarmStartConfig(seed=3, steps=80, hidden_size=48, num_layers=2, num_train=64, num_test=16, label_noise=0.0)
    out = warm_start(tmp_path / "a", cfg)
    stamp = json.loads((out / "warm_start.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert LlasaVocab.from_tokenizer(tokenizer).num_speech_tokens == NUM_UNITS
    _, test = make_prompt_sets(64, 16, 0)
    from lightning_grpo.tiny import build_tiny_llasa

    untrained, _ = build_tiny_llasa(NUM_UNITS, 48, 2, seed=3)
    before = unit_error_rate(untrained, tokenizer, test, seed=3)
    after = unit_error_rate(model, tokenizer, test, seed=3)
    assert after["uer"] == pytest.approx(stamp["held_out"]["uer"])
    # 80 teacher-forced steps: from random codes (~1.0) to mostly right lengths and fewer wrong units
    assert before["uer"] > 0.9 and after["uer"] < 0.85 and after["stop_rate"] > 0.9
    mtime = (out / "warm_start.json").stat().st_mtime_ns
    assert warm_start(tmp_path / "a", cfg) == out and (out / "warm_start.json").stat().st_mtime_ns == mtime
    again = AutoModelForCausalLM.from_pretrained(warm_start(tmp_path / "b", cfg))
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)


@pytest.fixture(scope="module")
def short_reward(codec):
    from lightning_grpo.reward.short_window import ShortWindowWhisperReward

    torch.set_num_threads(1)
    return ShortWindowWhisperReward(whisper_model="tiny.en-ct2", codec=codec, codebook_size=NUM_UNITS, batch_size=8, window_s=8.0)


def test_real_whisper_reads_the_unit_codec(short_reward):
    text = "Your tall horse eats this cup."
    right = text_to_codes(text)
    wrong = list(right)
    wrong[2] = UNITS.index("dog")
    samples = [
        SpeechSample(text=text, codes=right),
        SpeechSample(text=text, codes=wrong),
        SpeechSample(text=text, codes=text_to_codes("This red car likes my tree.")),
        SpeechSample(text=text, codes=[UNITS.index("<sil>")] * 6),
        SpeechSample(text=text, codes=right * 4),  # ~11 s: beyond the 8 s window
    ]
    res = short_reward.score(samples)
    cer, rewards = res.metrics["cer"], res.rewards
    # measured (tiny.en, 8 s window): CER 0.0 / ~0.15 / ~0.9; reward 0.96 / ~0.5 / ~0.02
    assert cer[0] < 0.1 and rewards[0] > 0.75
    assert rewards[0] > rewards[1] + 0.15 > rewards[2] + 0.15
    assert res.reasons[3] == "silent" and rewards[3] == 0 and cer[3] == 1
    assert res.reasons[4] == "too_long" and rewards[4] == 0


def test_cropped_encoder_at_full_window_equals_whisper(short_reward):
    from lightning_grpo.reward.short_window import CroppedEncoder

    inner = short_reward.whisper.encoder.inner
    mel = torch.randn(1, 80, 3000)
    with torch.inference_mode():
        assert torch.allclose(CroppedEncoder(inner, 1500)(mel), inner(mel), atol=1e-5)
        assert CroppedEncoder(inner, 400)(mel).shape == (1, 400, inner.positional_embedding.shape[1])


def test_capped_cer_logs_robust_statistics():
    from types import SimpleNamespace

    from lightning_grpo.reward.capped_cer import CappedCER
    from lightning_grpo.reward.base import RewardResult

    logged = {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.__setitem__(name, value))
    result = RewardResult(rewards=torch.zeros(4), metrics={"cer": torch.tensor([0.0, 0.2, 0.4, 31.0])})
    CappedCER().on_validation_batch_end(None, module, None, {"rollout": SimpleNamespace(reward_result=result)}, 0)
    # one repetition loop (CER 31) would make the raw mean 7.9; capped it counts as 1
    assert logged["val/cer_capped_mean"] == pytest.approx((0.0 + 0.2 + 0.4 + 1.0) / 4)
    assert logged["val/cer_above_1"] == pytest.approx(0.25) and logged["val/exact_rate"] == pytest.approx(0.25)
    # a reward that caps `cer` itself (WhisperReward) still gives the share above 1 through `cer_raw`
    logged.clear()
    capped = RewardResult(rewards=torch.zeros(2), metrics={"cer": torch.tensor([1.0, 0.5]), "cer_raw": torch.tensor([9.0, 0.5])})
    CappedCER().on_validation_batch_end(None, module, None, {"rollout": SimpleNamespace(reward_result=capped)}, 0)
    assert logged["val/cer_above_1"] == pytest.approx(0.5) and logged["val/cer_capped_mean"] == pytest.approx(0.75)


def test_demo_config_builds_the_whisper_unit_codec_loop():
    from lightning_grpo.cli import build_cli
    from lightning_grpo.reward.short_window import ShortWindowWhisperReward
    from lightning_grpo.rollout import GRPORollout
    from small_world import config_args

    cli = build_cli([*config_args(), "--model.model_name_or_path", "builtin:tiny-llasa", "--rollout.reward.lambda_n", "0"], run=False)
    rollout = next(c for c in cli.trainer.callbacks if isinstance(c, GRPORollout))
    reward = rollout.reward
    assert isinstance(reward, ShortWindowWhisperReward) and isinstance(reward.codec, UnitCodec)
    assert reward.codebook_size == NUM_UNITS and reward.window_s == 5.0
    assert (reward.lambda_c, reward.lambda_n) == (0.6, 0)  # the ablation override reached the reward
    # the longest possible completion (max_new_tokens - 1 units) fits the encoder window
    longest = max(u.numel() for u in reward.codec.units) + reward.codec.gap.numel()
    assert (rollout.sampler.max_new_tokens - 1) * longest + reward.codec.gap.numel() <= reward.window_s * 16_000


def test_label_noise_swaps_words_for_their_fixed_partner(tiny_units):
    import random

    from small_world.warm_start import confusion_partner

    _, tokenizer = tiny_units
    vocab = LlasaVocab.from_tokenizer(tokenizer)
    assert UNITS[confusion_partner(UNITS.index("cat"))] == "dog"
    assert UNITS[confusion_partner(UNITS.index("pulls"))] == "likes"  # wraps within its class
    text = "My red cat likes your ball."
    _, _, labels = teacher_forcing_batch(tokenizer, vocab, [text] * 200, label_noise=0.3, rng=random.Random(0))
    right = text_to_codes(text)
    codes = (labels[labels != -100].view(200, 7)[:, :6] - vocab.speech_start_id).tolist()
    swapped = sum(c != r for row in codes for c, r in zip(row, right)) / (200 * 6)
    assert all(c in (r, confusion_partner(r)) for row in codes for c, r in zip(row, right))
    assert 0.25 < swapped < 0.35


def test_measure_report_states_the_relative_drop_and_unit_errors(tmp_path):
    from small_world.measure import report

    metrics = lambda cer, nll, reward: {  # noqa: E731
        "val/cer_capped_mean": cer, "val/cer_mean": cer, "val/nll_mean": nll, "val/reward_mean": reward}
    hacking = {"exact_rate": 0.5, "junk_rate": 0.0, "repeat_rate": 0.0, "short_rate": 0.02, "long_rate": 0.0, "unstopped_rate": 0.0}
    summary = {
        "name": "seed0", "seed": 0, "lambda_c": 0.6, "lambda_n": 0.4, "rollouts": 60, "curve_steps": "rollouts", "extra": [],
        "before": metrics(0.4, 4.0, 0.26), "after": metrics(0.1, 1.5, 0.67),
        "curve": [{"step": 0, "val/cer_capped_mean": 0.4}, {"step": 60, "val/cer_capped_mean": 0.1}],
        "before_samples": hacking, "after_samples": hacking,
        "before_units": {"sampled": 0.37, "greedy": 0.15}, "after_units": {"sampled": 0.08, "greedy": 0.02},
    }
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "summary.json").write_text(json.dumps(summary))
    old = {k: v for k, v in summary.items() if not k.endswith("_units")}  # written before unit errors existed
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "summary.json").write_text(json.dumps({**old, "name": "seed1", "seed": 1}))
    table = report([tmp_path], tmp_path / "r.md", tmp_path / "cer.png")
    row0, row1 = table.splitlines()[2:4]
    assert "| 0.400 | 0.100 | -75% |" in row0 and "| 0.37 / 0.08 | 0.15 / 0.02 |" in row0
    assert "| - | - |" in row1  # unmeasured unit errors are shown as missing, not as zero
    assert (tmp_path / "r.md").read_text().strip() == table and (tmp_path / "cer.png").stat().st_size > 0


def test_measure_compare_puts_arms_side_by_side(tmp_path):
    """One row per arm directory: each seed's before -> after, the mean relative change, and the samples generated
    (counted by the run, or steps x prompts_per_step x group_size for summaries written before counting)."""
    from small_world.measure import compare

    metrics = lambda cer: {"val/cer_capped_mean": cer, "val/cer_mean": cer}  # noqa: E731
    for arm, afters, extra in (("token", (0.2, 0.3), {}), ("dyn", (0.1, 0.3), {"samples_generated": 1450, "steps_trained": 58})):
        for seed, after in enumerate(afters):
            d = tmp_path / arm / f"seed{seed}"
            d.mkdir(parents=True)
            d.joinpath("summary.json").write_text(json.dumps({
                "name": f"seed{seed}", "seed": seed, "rollouts": 60, "curve_steps": "rollouts", "curve": [],
                "before": metrics(0.4), "after": metrics(after), "after_units": {"sampled": after / 2}, **extra}))
            # the fit's log (version_1; validate's is version_0): dyn's runs were one-step-off, importance-corrected
            for version, steps in ((0, []), (1, [(0.0, 0.1), (1.0, 0.3)] if arm == "dyn" else [])):
                log = d / "grpo" / f"version_{version}"
                log.mkdir(parents=True)
                with open(log / "metrics.csv", "w") as f:
                    f.write("step,rollout/staleness,train/clip_fraction,train/is_weight_mean,train/is_weight_capped_frac\n")
                    f.writelines(f"{i},{st},{clip},1.0,0.0\n" for i, (st, clip) in enumerate(steps))
    rows = compare([tmp_path / "token", tmp_path / "dyn"]).splitlines()[2:]
    assert rows[0] == "| token | 0 1 | 0.400 -> 0.200, 0.400 -> 0.300 | -50% / -25% | -37.5% | 0.125 | 1440 | 60 | - / - / - / - |"
    assert rows[1] == "| dyn | 0 1 | 0.400 -> 0.100, 0.400 -> 0.300 | -75% / -25% | -50.0% | 0.100 | 1450 | 58 | 0.5 / 0.2 / 1 / 0 |"
