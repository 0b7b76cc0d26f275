"""Checkpoints: a killed run resumed from last.ckpt equals the uninterrupted run; export loads as plain HF."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_grpo.checkpointing import StepCheckpoint
from lightning_grpo.data import PromptDataModule
from lightning_grpo.export import export
from lightning_grpo.llasa import LlasaVocab, encode_prompt
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler


class Killed(RuntimeError):
    pass


class KillAt(L.Callback):
    """Dies at the start of global step `at` (before sampling), as a crash or a pre-emption would."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.at is not None and trainer.global_step == self.at:
            raise Killed(f"killed at step {self.at}")


class Record(L.Callback):
    def __init__(self):
        self.prompts, self.rewards, self.samples = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.prompts.append(tuple(batch["text"]))
        self.rewards.append(batch["rollout"].rewards.tolist())
        self.samples.append(batch["rollout"].completion_ids)


def run(root, max_steps, every, kill_at=None, ckpt_path=None, max_train_samples=None, val_every=None, ckpt_dir=None,
        save_top_k=-1):
    L.seed_everything(0)
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=CSVLogger(str(root), name="run"), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1 if val_every else 0,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1, num_sanity_val_steps=0,
        callbacks=[KillAt(kill_at), GRPORollout(HFSampler(max_new_tokens=8), RuleReward(codes_per_char=0.3, band=(0, 16)),
                                                group_size=2, truncation="keep"), record,
                   StepCheckpoint(dirpath=str(ckpt_dir or root / "ckpt"), every_n_train_steps=every,
                                  save_top_k=save_top_k)],
    )
    policy = GRPOPolicy(learning_rate=1e-2, micro_batch_size=8)
    dm = PromptDataModule(prompts_per_step=2, val_data="builtin:en" if val_every else None, val_prompts_per_step=2,
                          max_train_samples=max_train_samples)
    try:
        trainer.fit(policy, dm, ckpt_path=ckpt_path)
    except Killed:
        pass
    return trainer, policy, record


def test_save_top_k_keeps_the_newest_step_checkpoints(tmp_path):
    """save_top_k: 3 with no monitor keeps the 3 newest step checkpoints (ModelCheckpoint alone refuses to start)."""
    run(tmp_path, max_steps=5, every=1, save_top_k=3)
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt") if p.name != "last.ckpt")
    assert [int(n.split("step=")[1].split(".")[0].split("-")[0]) for n in kept] == [3, 4, 5], kept


def logged_steps(root):
    steps = []
    for path in sorted((root / "run").glob("version_*/metrics.csv")):
        with path.open() as f:
            steps += [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return steps


@pytest.mark.parametrize(
    "max_train_samples, every, kill_at, val_every",
    # mid-epoch 0; mid-epoch 1 of 2-step epochs; checkpoint at the end of epoch 0; validation right after the
    # checkpointed step (it samples too, and must not shift the training stream)
    [(None, 2, 2, None), (4, 1, 3, None), (4, 2, 2, None), (None, 2, 2, 2)],
    ids=["mid_epoch", "second_epoch", "epoch_end", "validation"],
)
def test_killed_run_resumed_from_last_equals_the_uninterrupted_run(tmp_path, max_train_samples, every, kill_at, val_every):
    steps = 5
    kw = dict(max_train_samples=max_train_samples, val_every=val_every)
    _, full, full_rec = run(tmp_path / "full", steps, every, **kw)
    killed, _, first = run(tmp_path / "part", steps, every, kill_at=kill_at, **kw)
    assert killed.global_step == kill_at and (tmp_path / "part" / "ckpt" / "last.ckpt").exists()
    resumed, policy, second = run(tmp_path / "part", steps, every, ckpt_path="last", **kw)
    assert resumed.global_step == steps
    # every step logged exactly once across the killed and the resumed run: none lost, none repeated
    assert logged_steps(tmp_path / "part") == list(range(steps))
    # same prompts, same samples (sampler RNG restored), same weights and optimizer state
    assert first.prompts + second.prompts == full_rec.prompts
    assert first.samples + second.samples == full_rec.samples
    assert first.rewards + second.rewards == full_rec.rewards
    assert len({r for step in full_rec.rewards for r in step}) > 4  # the rewards vary: updates are not no-ops
    L.seed_everything(0)
    init = GRPOPolicy().state_dict()
    assert not torch.equal(init["policy.lm_head.weight"], full.state_dict()["policy.lm_head.weight"])
    for (k, a), b in zip(full.state_dict().items(), policy.state_dict().values()):
        assert torch.equal(a, b), k
    opt_full = full.trainer.optimizers[0].state_dict()["state"]
    opt_res = policy.trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(opt_full[i]["exp_avg_sq"], opt_res[i]["exp_avg_sq"]) for i in opt_full)
    ckpt = torch.load(tmp_path / "part" / "ckpt" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("reference") for k in ckpt["state_dict"])
    assert ckpt["global_step"] == steps  # the final step is saved although 5 is no multiple of `every`
    assert ckpt["callbacks"]["GRPORollout"]["train_rollouts"] == steps


@pytest.mark.parametrize("last", ["lags", "missing"])
def test_resume_last_takes_the_newest_checkpoint_when_last_ckpt_lags(tmp_path, last):
    """Lightning writes step=N.ckpt, then rewrites last.ckpt: a run killed in between has a last.ckpt of an
    older step ("lags") or, before its first one, none ("missing"). `last` must still resume at step 4."""
    import os
    import shutil

    run(tmp_path, 4, 2)
    ckpt = tmp_path / "ckpt"
    step2, step4 = next(ckpt.glob("*step=2.ckpt")), next(ckpt.glob("*step=4.ckpt"))
    if last == "lags":
        shutil.copy(step2, ckpt / "last.ckpt")
        past = step4.stat().st_mtime - 60
        os.utime(ckpt / "last.ckpt", (past, past))
    else:
        (ckpt / "last.ckpt").unlink()
    trainer, _, _ = run(tmp_path, 6, 2, ckpt_path="last")
    versions = sorted((tmp_path / "run").glob("version_*/metrics.csv"))
    with versions[-1].open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")] == [4, 5]
    assert trainer.global_step == 6


def test_export_loads_with_plain_transformers_and_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, policy, _ = run(tmp_path, 2, 2)
    out = export(str(tmp_path / "ckpt" / "last.ckpt"), str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "lightning_grpo_export.json").read_text())["global_step"] == 2
    ids = encode_prompt(tok, "Hello world.")
    assert ids == encode_prompt(policy.tokenizer, "Hello world.")  # chat template and added tokens survive
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, policy.policy.eval()(x).logits, atol=1e-5)
    # LLaSA inference: generate speech tokens until <|SPEECH_GENERATION_END|>
    vocab = LlasaVocab.from_tokenizer(tok)
    gen = model.generate(x, max_new_tokens=5, do_sample=True, eos_token_id=vocab.speech_gen_end_id,
                         pad_token_id=vocab.pad_id)
    assert gen.shape[1] > x.shape[1] and model.config.use_cache
    with pytest.raises(FileNotFoundError, match="--ckpt_path=missing.ckpt"):
        export("missing.ckpt", str(tmp_path / "x"))


def cli_fit(tmp_path, *extra):
    """The tiny CPU config with its StepCheckpoint saving every 2 steps."""
    import yaml

    from lightning_grpo.cli import build_cli

    cfg = yaml.safe_load(open("configs/tiny_cpu.yaml"))
    ckpt = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("StepCheckpoint")][0]
    ckpt["init_args"]["every_n_train_steps"] = 2
    ckpt["init_args"]["save_top_k"] = -1
    config = tmp_path / "tiny_ckpt.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return build_cli([
        "fit", "--config", str(config), "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--rollout.sampler.max_new_tokens=8", "--trainer.val_check_interval=100",
        "--trainer.limit_val_batches=0", *extra,
    ])


def test_cli_checkpoints_resume_last_then_evaluate_and_export(tmp_path):
    """The README's commands: fit with checkpoints, resume with --ckpt_path last, evaluate the .ckpt and the export."""
    from lightning_grpo.evaluate import main as evaluate

    first = cli_fit(tmp_path, "--trainer.max_steps=3")
    ckpt_dir = tmp_path / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert len(names) == 3 and "step=2.ckpt" in names[0] and "step=3.ckpt" in names[1] and names[2] == "last.ckpt"
    assert first.trainer.global_step == 3
    second = cli_fit(tmp_path, "--trainer.max_steps=5", "--ckpt_path=last")
    assert second.trainer.global_step == 5
    steps = []
    for path in sorted((tmp_path / "lightning_logs").glob("version_*/metrics.csv")):
        with path.open() as f:
            steps += [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == [0, 1, 2, 3, 4]

    last = str(ckpt_dir / "last.ckpt")
    report = evaluate(["--config", "configs/tiny_cpu.yaml", "--ckpt_path", last, "--out_dir", str(tmp_path / "ev_ckpt"),
                       "--data.max_val_samples=2"])
    hf = export(last, str(tmp_path / "hf"))
    report_hf = evaluate(["--config", "configs/tiny_cpu.yaml", "--ckpt_path", str(hf), "--out_dir", str(tmp_path / "ev_hf"),
                          "--data.max_val_samples=2"])
    assert report["overall"]["n"] == report_hf["overall"]["n"] == 2 * 2
    meta = json.loads((tmp_path / "ev_hf" / "metrics.json").read_text())
    meta_ckpt = json.loads((tmp_path / "ev_ckpt" / "metrics.json").read_text())
    assert meta["model"] == str(hf) and meta_ckpt["ckpt_path"] == last
    assert meta["global_step"] == meta_ckpt["global_step"] == 5


def test_sigkilled_cli_run_resumes_without_losing_a_step(tmp_path):
    """A real `python -m lightning_grpo fit` killed with SIGKILL after its step-4 checkpoint, then resumed.

    Measured: ~12 s (two process starts)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "lightning_grpo", "fit", "--config", "configs/tiny_cpu.yaml",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.flush_logs_every_n_steps=1",
            "--rollout.sampler.max_new_tokens=8", "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=true", "--trainer.callbacks+=lightning_grpo.checkpointing.StepCheckpoint",
            "--trainer.callbacks.init_args.every_n_train_steps=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*args, "--trainer.max_steps=200"], cwd=Path(__file__).parents[1], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # killed once the step-4 checkpoint exists and the steps it holds are logged (the log row of step 3 may follow
    # the checkpoint by a moment: a kill between them loses a log row, not training)
    while (not (list((tmp_path / "checkpoints").glob("*step=4.ckpt")) and 3 in logged_cli_steps(tmp_path))
           and time.time() < deadline and proc.poll() is None):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "checkpoints").glob("*step=4.ckpt")), "the run never reached its step-4 checkpoint"
    killed_steps = logged_cli_steps(tmp_path)
    resumed = subprocess.run([*args, "--trainer.max_steps=10", "--ckpt_path=last"], cwd=Path(__file__).parents[1],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    versions = logged_cli_steps(tmp_path, by_version=True)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    assert versions[-1] == list(range(4, 10))  # resumed exactly after the checkpoint, to the end
    assert set(killed_steps) | set(versions[-1]) == set(range(10))  # nothing lost (steps past the checkpoint redone)


def logged_cli_steps(root, by_version=False):
    out = []
    for path in sorted((root / "lightning_logs").glob("version_*/metrics.csv")):
        with path.open() as f:
            out.append([int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")])
    return out if by_version else [s for v in out for s in v]
