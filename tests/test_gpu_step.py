"""The training step's GPU paths: what a CPU can show (CUDA calls faked where needed), and `gpu`-marked
tests for what only a GPU can (bf16-mixed on CUDA, fused AdamW, TF32, fp32 log-probs under TF32)."""

from __future__ import annotations

import types
import warnings

import lightning as L
import pytest
import torch

from lightning_grpo import grpo
from lightning_grpo.data import PromptDataModule
from lightning_grpo.llasa import codes_to_ids
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout, _rng_state, _set_rng_state


class Scripted:
    """Fixed completions, as tests/test_training.py's ScriptedSampler."""

    temperature, top_p, top_k, max_new_tokens = 1.0, 1.0, 0, 8

    def __init__(self, rows):
        self.rows = rows

    def setup(self, pl_module):
        pass

    def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
        from lightning_grpo.sampling import Completions

        k = len(prompts) * n
        return Completions(ids=[list(self.rows[i % len(self.rows)]) for i in range(k)], truncated=[False] * k)


def rollout(vocab):
    rows = [codes_to_ids([1, 2, 3], vocab), codes_to_ids([9] * 6, vocab), codes_to_ids([4] * 2, vocab)]
    return GRPORollout(Scripted(rows), RuleReward(codes_per_char=0.3, band=(0, 4)), group_size=2)


def fake_trainer(device: str, scaler=None):
    return types.SimpleNamespace(
        strategy=types.SimpleNamespace(root_device=torch.device(device)), precision_plugin=types.SimpleNamespace(scaler=scaler),
        precision="bf16-mixed", max_steps=10,
    )


@pytest.mark.parametrize("saved, visible, restored", [(2, 1, 1), (1, 4, 1), (2, 0, 0), (2, 2, 2)])
def test_cuda_rng_states_restore_what_the_visible_gpus_can(monkeypatch, saved, visible, restored):
    """A checkpoint saved with 2 GPUs visible resumed with 1 (or 4, or none) restores the GPUs both have and
    warns, instead of indexing past the last GPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((int(state[0]), device)))
    state = {**_rng_state(), "cuda_rng": [torch.full((8,), i, dtype=torch.uint8) for i in range(saved)]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _set_rng_state(state)
    assert calls == [(i, i) for i in range(restored)]
    messages = [str(w.message) for w in caught if "CUDA RNG" in str(w.message)]
    if saved == visible:
        assert not messages
    else:
        assert messages == [f"the checkpoint holds the CUDA RNG states of {saved} GPU(s), this process sees {visible}: "
                            f"restored {restored}; sampling on the others does not continue the uninterrupted run's random stream"]


@pytest.mark.parametrize("tf32, expected", [(True, "high"), (False, "highest")])
def test_tf32_switch_sets_fp32_matmul_precision_on_cuda_only(tf32, expected):
    before = torch.get_float32_matmul_precision()
    try:
        policy = GRPOPolicy(tf32=tf32)
        torch.set_float32_matmul_precision("medium")
        policy._trainer = fake_trainer("cpu")
        policy.setup("fit")
        assert torch.get_float32_matmul_precision() == "medium"  # CPU runs leave the process setting alone
        policy._trainer = fake_trainer("cuda")
        policy.setup("fit")
        assert torch.get_float32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("device, scaler, fused", [("cuda", None, True), ("cuda", object(), None), ("cpu", None, None)])
def test_adamw_is_fused_on_cuda_unless_an_fp16_grad_scaler_needs_unscaling_first(device, scaler, fused):
    policy = GRPOPolicy()
    policy._trainer = fake_trainer(device, scaler)
    [opt], _ = policy.configure_optimizers()  # parameters on the CPU, which has a fused AdamW too
    assert opt.defaults["fused"] is fused


def test_gradients_are_released_right_after_each_update(vocab):
    """Each update sees the accumulated gradients; right after it they are gone (set to None without DDP),
    so they do not sit in memory through the next rollout."""
    seen = []

    class Watch(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(("update", all(p.grad is not None for p in pl_module.policy.parameters())))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(("rollout", all(p.grad is None for p in pl_module.policy.parameters())))

    L.seed_everything(0)
    policy = GRPOPolicy(learning_rate=1e-3, num_iterations=2, micro_batch_size=2)
    L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[rollout(vocab), Watch()]).fit(policy, PromptDataModule(prompts_per_step=2, val_data=None))
    assert seen == [("rollout", True), ("update", True), ("update", True)] * 2
    assert all(p.grad is None for p in policy.policy.parameters())


def test_second_update_under_bf16_autocast_sees_the_weights_of_the_first(vocab):
    """With num_iterations=2 under bf16-mixed, the second update's forward uses the weights after the first.
    (Autocast with its weight cache on would reuse the bf16 copies made before the first update for the whole
    training_step; Lightning's bf16-mixed turns the cache off, and this guards that.)"""
    seen = {"logp": [], "weights": []}

    class Recording(GRPOPolicy):
        def completion_logprobs(self, model, r, rows, entropy=False):
            out = super().completion_logprobs(model, r, rows, entropy)
            if torch.is_grad_enabled():  # the updates' forwards, not the no-grad old log-probs
                seen["logp"].append((out[0] if entropy else out).detach().clone())  # the first also has the entropy
                seen["rollout"] = r
            return out

    class Snapshot(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["weights"].append({k: v.clone() for k, v in pl_module.policy.state_dict().items()})

    L.seed_everything(0)
    policy = Recording(learning_rate=1e-2, num_iterations=2, micro_batch_size=8)
    L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[rollout(vocab), Snapshot()]
              ).fit(policy, PromptDataModule(prompts_per_step=2, val_data=None))
    assert len(seen["logp"]) == 2 and len(seen["weights"]) == 2
    fresh = GRPOPolicy()
    fresh.policy.load_state_dict(seen["weights"][1])  # after the first update, before the second
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = fresh.completion_logprobs(fresh.policy, seen["rollout"], slice(0, 4))
    mask = seen["rollout"].completion_mask.bool()
    assert torch.allclose(seen["logp"][1][mask], expected[mask], atol=1e-5)
    assert (seen["logp"][1] - seen["logp"][0])[mask].abs().max() > 1e-2  # the first update moved them


# -- what only a GPU shows ----------------------------------------------------------------------
@pytest.mark.gpu
def test_bf16_mixed_step_on_cuda(vocab):
    """The original layout's precision on one GPU: fp32 weights, bf16 matmuls, fused AdamW, TF32 on,
    gradients released after the update, weights moved, losses finite."""
    before_precision = torch.get_float32_matmul_precision()
    try:
        L.seed_everything(0)
        policy = GRPOPolicy(learning_rate=1e-6, num_iterations=2, micro_batch_size=2, beta=0.05, reference_dtype="bfloat16")
        start = {k: v.clone() for k, v in policy.policy.state_dict().items()}
        trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[rollout(vocab)])
        trainer.fit(policy, PromptDataModule(prompts_per_step=2, val_data=None))
        assert trainer.optimizers[0].defaults["fused"] is True
        assert torch.get_float32_matmul_precision() == "high"
        assert trainer.global_step == 2 and torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
        assert all(p.grad is None for p in policy.policy.parameters())
        now = policy.policy.state_dict()
        assert all(v.dtype == torch.float32 for v in now.values())
        layers = [k for k in now if ".layers." in k]
        moved = sum(int((now[k].cpu() != start[k]).sum()) for k in layers) / sum(start[k].numel() for k in layers)
        assert moved > 0.99, moved
    finally:
        torch.set_float32_matmul_precision(before_precision)


@pytest.mark.gpu
def test_head_logprobs_are_fp32_on_cuda_under_bf16_autocast_and_tf32():
    before_precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32, as GRPOPolicy(tf32=True) sets it
        torch.manual_seed(0)
        h = (2 * torch.randn(2, 512, 2048, device="cuda")).requires_grad_()
        w = (torch.randn(8192, 2048, device="cuda") / 2048**0.5).requires_grad_()
        t = torch.randint(0, 8192, (2, 512), device="cuda")
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = torch.log_softmax(h64 @ w64.T, -1).gather(-1, t[..., None]).squeeze(-1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = grpo.token_logprobs(h, w, t, chunk_size=256)
        assert got.dtype == torch.float32 and (got.double() - ref).abs().max() < 1e-4
        got.sum().backward()
        g_h, g_w = torch.autograd.grad(ref.sum(), (h64, w64))
        assert (h.grad.double() - g_h).abs().max() < 1e-4 and (w.grad.double() - g_w).abs().max() < 1e-4
    finally:
        torch.set_float32_matmul_precision(before_precision)


@pytest.mark.gpu
def test_cuda_rng_states_of_more_gpus_than_visible_restore_without_error():
    torch.cuda.init()
    state = _rng_state()
    state["cuda_rng"] = state["cuda_rng"] + [state["cuda_rng"][0].clone()]
    with pytest.warns(UserWarning, match="this process sees"):
        _set_rng_state(state)
    assert torch.equal(torch.cuda.get_rng_state(0), state["cuda_rng"][0])


@pytest.mark.gpu
def test_step_memory_budget_predicts_the_peak_allocated_on_cuda(tmp_path):
    """benchmarks/bench_step_memory.py's check on a GPU: the budget's terms against the step's peak allocated
    bytes (fused AdamW, bf16-mixed, the real 193,800-row vocabulary at a small width); BENCHMARKS.md, "Per-GPU memory budget"
    rests on these formulas."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_step_memory.py"), "--device", "cuda",
                           "--json", str(out)], capture_output=True, text=True, timeout=1200, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    raw = json.loads(out.read_text())
    for phase in ("backward", "step"):
        ratio = raw["measured"]["growth_mib"][phase] * 2**20 / raw["predicted"][phase]
        assert 0.85 < ratio < 1.2, (phase, ratio)
