"""Evaluation: the report equals the policy's own val/* means, splits by language, and the CLI writes it."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_grpo.data import PromptDataModule
from lightning_grpo.evaluate import ValidationReport, compare, main, markdown_table, summarize
from lightning_grpo.llasa import LlasaVocab, codes_to_ids
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import Completions, HFSampler


def two_language_data(tmp_path):
    path = tmp_path / "val.jsonl"
    rows = [{"text": f"Text number {i}.", "language": "ko" if i % 3 == 0 else "en"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def validate(callbacks, val_data, val_prompts_per_step=4):
    L.seed_everything(0)
    policy = GRPOPolicy()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    dm = PromptDataModule(train_data=val_data, val_data=val_data, val_split="test", val_prompts_per_step=val_prompts_per_step)
    trainer.validate(policy, datamodule=dm)
    return trainer


def test_report_equals_policy_val_metrics_and_splits_languages(tmp_path):
    report = ValidationReport(out_dir=str(tmp_path / "report"))
    rollout = GRPORollout(HFSampler(max_new_tokens=12), RuleReward(codes_per_char=0.3, band=(0, 16)),
                          group_size=2, val_group_size=2)
    trainer = validate([rollout, report], two_language_data(tmp_path))
    m = trainer.callback_metrics
    assert len(report.records) == 12  # 6 prompts x val_group_size 2
    overall, langs = report.summary["overall"], report.summary["per_language"]
    # the same samples the policy's validation_step logged as val/*
    assert overall["reward"] == pytest.approx(float(m["val/reward_mean"]), abs=1e-5)
    assert overall["length_score"] == pytest.approx(float(m["val/length_score_mean"]), abs=1e-5)
    assert overall["truncation_rate"] == pytest.approx(float(m["val/truncation_rate"]), abs=1e-6)
    ko = [r["reward"] for r in report.records if r["language"] == "ko"]
    assert langs["ko"]["n"] == 4 and langs["en"]["n"] == 8
    assert langs["ko"]["reward"] == pytest.approx(sum(ko) / 4)
    assert float(m["val/lang_ko/reward_mean"]) == pytest.approx(sum(ko) / 4, abs=1e-5)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["per_language"]["en"]["reward"] == pytest.approx(langs["en"]["reward"])
    table = (tmp_path / "report" / "metrics.md").read_text().splitlines()
    assert table[0].startswith("| language | n | reward |") and [r.split("|")[1].strip() for r in table[2:]] == ["all", "en", "ko"]
    assert len((tmp_path / "report" / "samples.jsonl").read_text().splitlines()) == 12


def test_summary_skips_unmeasured_values_and_compare_reports_change(tmp_path):
    recs = [{"text": "a", "language": "en", "reward": 0.5, "cer": 0.1, "nll": None, "reason": "ok", "truncated": False},
            {"text": "b", "language": "en", "reward": 0.0, "cer": 1.0, "nll": None, "reason": "silent", "truncated": True},
            {"text": "c", "language": None, "reward": 1.0, "cer": 0.0, "nll": 2.0, "reason": "ok", "truncated": False}]
    s = summarize(recs)
    assert s["overall"]["nll"] == 2.0 and s["overall"]["cer"] == pytest.approx(1.1 / 3)
    assert s["per_language"]["en"]["nll"] is None and s["per_language"]["unknown"]["n"] == 1
    assert s["overall"]["reasons"] == {"ok": pytest.approx(2 / 3), "silent": pytest.approx(1 / 3)}
    assert "| en | 2 | 0.2500 | 0.5500 | - |" in markdown_table(s)
    for name, cer in (("before", 0.0266), ("after", 0.0204)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"overall": {"n": 1, "cer": cer}, "per_language": {"ko": {"n": 1, "cer": cer}}}))
    table = compare(tmp_path / "before", tmp_path / "after")
    assert "| ko | cer | 0.0266 | 0.0204 | -23.3% |" in table


def test_evaluate_command_on_the_tiny_config(tmp_path, capsys):
    data = two_language_data(tmp_path)
    summary = main(["--config", "configs/tiny_cpu.yaml", "--out_dir", str(tmp_path / "ev"), f"--data.val_data={data}",
                    "--data.val_split=test"])
    assert summary["overall"]["n"] == 6 * 2  # the tiny config's val_group_size is 2
    assert set(summary["per_language"]) == {"en", "ko"}
    meta = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert meta["model"] == "builtin:tiny-llasa" and meta["val_data"] == data
    assert "| all | 12 |" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="--ckpt_path=nowhere.ckpt"):
        main(["--config", "configs/tiny_cpu.yaml", "--ckpt_path", "nowhere.ckpt"])
    # the tiny config's rule reward transcribes nothing: --seed_tts says so instead of reporting no column
    with pytest.raises(ValueError, match="--seed_tts scores transcripts"):
        main(["--config", "configs/tiny_cpu.yaml", "--out_dir", str(tmp_path / "st"), f"--data.val_data={data}",
              "--data.val_split=test", "--seed_tts"])



def test_evaluate_takes_config_files_and_names_a_bad_flag(tmp_path, capsys):
    """`python -m lightning_grpo evaluate --config fit.yaml --config eval.yaml`: the second file holds evaluate's
    own keys (out_dir) beside fit-config keys (data), as a user keeps an evaluation's settings."""
    from lightning_grpo.cli import main as cli_main

    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({"out_dir": str(tmp_path / "from_file"),
                                  "data": {"val_data": two_language_data(tmp_path), "val_split": "test"}}))
    cli_main(["evaluate", "--config", "configs/tiny_cpu.yaml", "--config", str(config)])
    assert json.loads((tmp_path / "from_file" / "metrics.json").read_text())["overall"]["n"] == 12
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "--config", "configs/tiny_cpu.yaml", "--out-dir", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "--out-dir" in capsys.readouterr().err


class PerPromptSampler:
    """Completion j of every batch is `rows[j]` (validation batches are not shuffled)."""

    temperature, top_p, top_k, max_new_tokens = 1.0, 1.0, 0, 2048

    def __init__(self, rows):
        self.rows = rows

    def setup(self, pl_module):
        pass

    def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
        ids = [list(self.rows[j]) for j in range(len(prompts)) for _ in range(n)]
        return Completions(ids=ids, truncated=[False] * len(ids))


@pytest.mark.slow
def test_whisper_reward_gives_cer_and_nll_per_language(tmp_path):
    """Real tiny.en Whisper on espeak-ng speech behind a fake codec: right audio, low CER; wrong, high.

    Also checks the audio sample table of that validation. Measured: 20-55 s on 2 shared cores, hence slow."""
    from reward_fixtures import SENTENCES, StoredAudioDecoder, espeak

    from lightning_grpo.reward.whisper import WhisperReward

    torch.set_num_threads(2)
    decoder = StoredAudioDecoder()
    texts = [SENTENCES[0], SENTENCES[3]]
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "language": "en"}) for t in texts))
    vocab = LlasaVocab.from_tokenizer(GRPOPolicy().tokenizer)
    # prompt 0 gets its own sentence spoken, prompt 1 an unrelated one
    rows = [codes_to_ids(decoder.add(espeak(SENTENCES[0])), vocab), codes_to_ids(decoder.add(espeak(SENTENCES[1])), vocab)]
    reward = WhisperReward(whisper_model="tiny.en-ct2", codec=decoder, batch_size=4)
    report = ValidationReport(out_dir=str(tmp_path / "ev"))
    from lightning_grpo.sample_logging import AudioSampleLogger

    samples = AudioSampleLogger(write_files=True, out_dir=str(tmp_path / "samples"))
    trainer = validate([GRPORollout(PerPromptSampler(rows), reward, restrict_to_speech=False), report, samples], str(path))
    right, wrong = report.records
    assert right["cer"] < 0.1 < 0.5 < wrong["cer"]
    assert right["nll"] < wrong["nll"] and right["reward"] > 0.5 > wrong["reward"]
    assert "quick brown fox" in right["transcript"].lower()
    assert report.summary["overall"]["cer"] == pytest.approx((right["cer"] + wrong["cer"]) / 2)
    assert float(trainer.callback_metrics["val/cer_mean"]) == pytest.approx(report.summary["overall"]["cer"], abs=1e-5)
    assert "| all | 2 | " in (tmp_path / "ev" / "metrics.md").read_text()
    # the audio sample table of the same validation: the codec's audio, Whisper's transcript and CER
    import csv

    import soundfile as sf

    with (tmp_path / "samples" / "val" / "index.csv").open() as f:
        logged = {r["text"]: r for r in csv.DictReader(f)}
    row = logged[SENTENCES[0]]
    assert "quick brown fox" in row["transcript"].lower() and float(row["cer"]) == pytest.approx(right["cer"], abs=1e-4)
    wav, sr = sf.read(tmp_path / "samples" / "val" / row["audio"], dtype="float32")
    assert sr == 16_000 and len(wav) == len(espeak(SENTENCES[0]))


def test_validation_during_fit_uses_the_same_report(tmp_path):
    """Added to a fit config's callbacks, the report logs per-language val metrics and writes step_<N>/."""
    L.seed_everything(0)
    data = two_language_data(tmp_path)
    report = ValidationReport(out_dir=str(tmp_path / "val"))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[report, GRPORollout(HFSampler(max_new_tokens=8), RuleReward(), group_size=2)])
    trainer.fit(GRPOPolicy(), PromptDataModule(train_data=data, val_data=data, train_split="x", val_split="y",
                                               prompts_per_step=2, val_prompts_per_step=6))
    saved = json.loads((tmp_path / "val" / "step_2" / "metrics.json").read_text())
    assert saved["global_step"] == 2 and saved["overall"]["n"] == 6  # val_group_size 1
    assert float(trainer.callback_metrics["val/lang_en/reward_mean"]) == pytest.approx(saved["per_language"]["en"]["reward"], abs=1e-5)


def test_default_report_dirs_of_two_runs_last_checkpoints_differ():
    from lightning_grpo.evaluate import default_out_dir

    a, b = default_out_dir("runs/a/checkpoints/last.ckpt"), default_out_dir("runs/b/checkpoints/last.ckpt")
    assert a == "runs/eval/a-last" and b == "runs/eval/b-last"  # neither overwrites the other's report
    assert default_out_dir("runs/export_dir") == "runs/eval/runs-export_dir"
    assert default_out_dir(None) == "runs/eval/base"


class ScriptSwapReward:
    """Transcribes every sample as its own text in another form: Chinese in traditional script, English in
    lower case without punctuation, and the word "number" replaced by "numbers" (one wrong word of three)."""

    def score(self, samples):
        import zhconv

        from lightning_grpo.reward.base import RewardResult

        transcripts = [zhconv.convert(s.text, "zh-tw") if s.language == "zh" else
                       s.text.lower().replace(".", "").replace("number", "numbers") for s in samples]
        return RewardResult(rewards=torch.full((len(samples),), 0.5), metrics={"cer": torch.zeros(len(samples))},
                            transcripts=transcripts)


def test_seed_tts_mode_adds_wer_for_english_and_cer_for_chinese(tmp_path):
    from lightning_grpo.evaluate import add_seed_tts_scores

    path = tmp_path / "val.jsonl"
    rows = [{"text": "Text number one.", "language": "en"}, {"text": "我们一起去图书馆看书。", "language": "zh"},
            {"text": "안녕하세요.", "language": "ko"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    report = ValidationReport(out_dir=str(tmp_path / "report"), seed_tts=True)
    rollout = GRPORollout(HFSampler(max_new_tokens=4), ScriptSwapReward(), group_size=2, val_group_size=2)
    trainer = validate([rollout, report], str(path))
    langs = report.summary["per_language"]
    # English: "text numbers one" against "text number one" is one word of three
    assert langs["en"]["seed_tts_wer"] == pytest.approx(1 / 3) and langs["en"].get("seed_tts_cer") is None
    # Chinese: zhconv turns the traditional transcript back; punctuation is not a character
    assert langs["zh"]["seed_tts_cer"] == 0.0 and langs["zh"].get("seed_tts_wer") is None
    assert "seed_tts_wer" not in {k for r in report.records if r["language"] == "ko" for k in r}
    assert float(trainer.callback_metrics["val/lang_en/seed_tts_wer_mean"]) == pytest.approx(1 / 3, abs=1e-6)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["per_language"]["zh"]["seed_tts_cer"] == 0.0
    with pytest.raises(ValueError, match="--seed_tts scores transcripts"):
        add_seed_tts_scores([{"text": "a", "language": "en", "transcript": None}])


def test_sim_is_reported_beside_an_unchanged_reward(tmp_path):
    """`evaluate --sim`: rows with a reference get `sim` (real GE2E weights, espeak-ng voices), rows without get
    none, and the reward and its metrics equal the config reward's own."""
    from reward_fixtures import SENTENCES, StoredAudioDecoder, espeak

    from lightning_grpo.evaluate import add_sim

    decoder = StoredAudioDecoder()
    vocab = LlasaVocab.from_tokenizer(GRPOPolicy().tokenizer)
    own_voice = decoder.add(espeak(SENTENCES[0], "en-us+f3"))
    rows = [{"text": SENTENCES[0], "language": "en", "prompt_text": SENTENCES[1],
             "prompt_codes": decoder.add(espeak(SENTENCES[1], "en-us+f3"))},
            {"text": SENTENCES[2], "language": "en"}]
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))

    class RuleWithCodec(RuleReward):
        codec = decoder

    records = {}
    for sim in (False, True):
        rollout = GRPORollout(PerPromptSampler([codes_to_ids(own_voice, vocab)] * 2), RuleWithCodec(), group_size=2)
        if sim:
            add_sim(rollout)
        report = ValidationReport()
        validate([rollout, report], str(path), val_prompts_per_step=2)
        records[sim] = report.records
    with_ref, without = records[True]
    assert with_ref["sim"] > 0.8 and without["sim"] is None and without["reason"] == "no_reference"
    assert [r["reward"] for r in records[True]] == [r["reward"] for r in records[False]]
    assert all(r["length_score"] == r0["length_score"] for r, r0 in zip(records[True], records[False]))
    with pytest.raises(ValueError, match="--sim_codec"):
        add_sim(GRPORollout(HFSampler(), RuleReward(), group_size=2))
