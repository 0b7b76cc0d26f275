"""Audio sample tables: W&B offline run files hold the table and audio; CSV runs get wav files and an index."""

from __future__ import annotations

import csv
import json
import time

import lightning as L
import soundfile as sf
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sample_logging import AudioSampleLogger, pick_rows
from lightning_grpo.sampling import HFSampler

SR = 16_000


class ToneCodec:
    """A SpeechDecoder: each code is 320 samples of a tone whose pitch is the code (deterministic)."""

    sample_rate = SR

    def decode(self, codes):
        out = []
        for seq in codes:
            t = torch.arange(320) / SR
            out.append(torch.cat([0.3 * torch.sin(2 * torch.pi * (200 + 20 * c) * t) for c in seq]))
        return out


class RuleRewardWithCodec(RuleReward):
    """The rule reward plus a codec attribute, as WhisperReward has."""

    def __init__(self):
        super().__init__(codes_per_char=0.3, band=(0, 16))
        self.codec = ToneCodec()


def fit(logger, reward, tmp_path, steps=3, **sample_kw):
    L.seed_everything(0)
    samples = AudioSampleLogger(**{"every_n_steps": 2, "max_samples": 3, **sample_kw})
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, val_check_interval=steps, check_val_every_n_epoch=None, limit_val_batches=1,
        num_sanity_val_steps=0, default_root_dir=str(tmp_path), log_every_n_steps=1,
        callbacks=[GRPORollout(HFSampler(max_new_tokens=10), reward, group_size=3, val_group_size=2), samples],
    )
    trainer.fit(GRPOPolicy(learning_rate=1e-3), PromptDataModule(prompts_per_step=2, val_prompts_per_step=2))
    return trainer, samples


def test_pick_rows_takes_best_and_worst_of_each_group():
    r = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, 0.0, 1.0, 0.2])
    assert pick_rows(r, 3, 10) == [1, 0, 3, 7, 6]  # a flat group gives one row
    assert pick_rows(r, 3, 3) == [1, 0, 3]


def test_csv_run_writes_wavs_and_index(tmp_path):
    trainer, cb = fit(CSVLogger(str(tmp_path)), RuleRewardWithCodec(), tmp_path)
    root = tmp_path / "lightning_logs" / "version_0" / "samples"
    with (root / "train" / "index.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = [r["step"] for r in rows]  # every 2nd of 3 steps, up to 3 samples each (a flat group gives 1)
    assert sorted(set(steps)) == ["0", "2"] and all(2 <= steps.count(s) <= 3 for s in ("0", "2"))
    assert {"text", "transcript", "reward", "length_score", "band_score", "reason", "audio"} <= set(rows[0])
    wav, sr = sf.read(root / "train" / rows[0]["audio"])
    assert sr == SR and len(wav) % 320 == 0 and len(wav) > 0
    pairs = [(a, b) for a, b in zip(rows, rows[1:]) if (a["step"], a["text"]) == (b["step"], b["text"])]
    assert pairs and all(float(a["reward"]) > float(b["reward"]) for a, b in pairs)  # best, then worst
    assert (root / "val" / "step_000003" / "index.md").read_text().startswith("| step | sample | text |")
    assert cb.state_dict() == {"batches_seen": 3}


def test_rule_reward_without_codec_logs_text_only(tmp_path):
    fit(CSVLogger(str(tmp_path)), RuleReward(), tmp_path, steps=1, log_validation=False)
    step = tmp_path / "lightning_logs" / "version_0" / "samples" / "train" / "step_000000"
    assert not list(step.glob("*.wav"))
    lines = (step / "index.md").read_text().strip().splitlines()
    assert lines[0].endswith("| audio |") and 2 + 2 <= len(lines) <= 2 + 3
    assert all(line.endswith("|  |") for line in lines[2:])  # the audio cell is empty


def test_wandb_offline_run_files_hold_the_audio_table(tmp_path, monkeypatch):
    """W&B stores a table with media as a `run_table` artifact: the run file records it with its wavs."""
    import re

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # artifact staging, not ~/.local
    import wandb

    logger = WandbLogger(save_dir=str(tmp_path), project="lightning_grpo_test", offline=True)
    try:
        fit(logger, RuleRewardWithCodec(), tmp_path, steps=1)
    finally:
        wandb.finish()
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    tables = sorted((run_dirs[0] / "files" / "media" / "table" / "samples").glob("*.table.json"))
    assert [t.name.split("_")[0] for t in tables] == ["train", "val"]
    table = json.loads(tables[0].read_text())
    assert table["columns"][:5] == ["step", "sample", "text", "transcript", "reward"] and table["columns"][-1] == "audio"
    assert 2 <= len(table["data"]) <= 3 and table["data"][0][2] in {r["text"] for r in PromptDataModule()._load("builtin:en", "train", None)}
    for _ in range(50):  # the wandb-core process may still be flushing the run file after finish()
        record = next(run_dirs[0].glob("run-*.wandb")).read_bytes()
        if b"run_table" in record:
            break
        time.sleep(0.2)
    assert b"run_table" in record and len(set(re.findall(rb"media/audio/\w+\.wav", record))) >= 4  # train + val
    staged = [p for p in (tmp_path / "wandb_data").rglob("*") if p.is_file()]
    waves = [p for p in staged if p.read_bytes()[:4] == b"RIFF"]
    assert len(waves) >= 4 and sf.info(str(waves[0])).samplerate == SR
    assert not (tmp_path / "samples").exists() and not list(tmp_path.rglob("index.csv"))  # W&B only by default


def test_tensorboard_gets_audio_and_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(TensorBoardLogger(str(tmp_path)), RuleRewardWithCodec(), tmp_path, steps=1, log_validation=False)
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"audio": 0, "tensors": 0})
    events.Reload()
    assert 2 <= len(events.Tags()["audio"]) <= 3
    assert any(t.startswith("samples/train") for t in events.Tags()["tensors"])


def test_a_cli_fit_with_an_owner_process_reward_writes_audio_from_the_loggers_own_decoder(tmp_path):
    """The reward scores in an owner process (no codec in the trainer): the logger builds its own decoder (X-codec2's
    decoder half at tiny size, random weights) on the logging rank and writes wav files."""
    from lightning_grpo.cli import build_cli

    cfg = tmp_path / "owner_audio.yaml"
    cfg.write_text("""
rollout:
  reward:
    class_path: lightning_grpo.reward.owner.SharedReward
    init_args:
      mode: process
      reward: {class_path: lightning_grpo.reward.rule.RuleReward, init_args: {codes_per_char: 0.5, band: [0, 16]}}
trainer:
  callbacks:
    - class_path: lightning_grpo.sample_logging.AudioSampleLogger
      init_args:
        every_n_steps: 1
        max_samples: 2
        log_validation: false
        codec:
          class_path: lightning_grpo.reward.codec.XCodec2Decoder
          init_args: {checkpoint: null, hidden_dim: 64, depth: 2, heads: 4}
""")
    cli = build_cli(["fit", "--config", "configs/tiny_cpu.yaml", "--config", str(cfg), "--trainer.max_steps", "1",
                     "--trainer.enable_progress_bar", "false", "--rollout.sampler.max_new_tokens", "16",
                     f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert cli.trainer.global_step == 1
    wavs = list(tmp_path.rglob("samples/train/step_000000/*.wav"))
    assert wavs and all(sf.info(str(w)).samplerate == SR and sf.info(str(w)).frames % 320 == 0 for w in wavs)


def test_a_reward_without_a_codec_here_says_once_that_the_table_has_no_audio():
    import warnings

    from lightning_grpo.reward.owner import SharedReward

    logger = AudioSampleLogger()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert logger.decoder(SharedReward(RuleReward)) is None and logger.decoder(SharedReward(RuleReward)) is None
    said = [str(w.message) for w in seen if "AudioSampleLogger" in str(w.message)]
    assert len(said) == 1 and "SharedReward" in said[0] and "codec" in said[0]
    assert AudioSampleLogger(codec=ToneCodec()).decoder(SharedReward(RuleReward)).sample_rate == SR
    assert isinstance(AudioSampleLogger().decoder(RuleRewardWithCodec()), ToneCodec)  # a reward scoring here lends its own
