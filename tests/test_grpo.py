"""GRPO math against hand-computed numbers and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grpo import grpo


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])  # two groups of 2
    a = grpo.group_advantages(r, 2, "group", eps=0.0 + 1e-12)
    std = math.sqrt(2.0)  # unbiased std of (1, 3)
    assert torch.allclose(a[:2], torch.tensor([-1 / std, 1 / std]))
    assert torch.equal(a[2:], torch.zeros(2))  # zero-variance group -> zero advantage
    assert torch.allclose(grpo.group_advantages(r, 2, "none"), torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    batch = grpo.group_advantages(r, 2, "batch", eps=0.0)
    assert torch.allclose(batch, torch.tensor([-1.0, 1.0, 0.0, 0.0]) / r.std())


def test_group_advantages_rejects_bad_groups():
    with pytest.raises(ValueError, match="at least 2"):
        grpo.group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        grpo.group_advantages(torch.zeros(4), 3)


def test_token_logprobs_matches_full_log_softmax_and_grads():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    t = torch.randint(0, 40, (3, 5))
    ref = torch.log_softmax((h @ w.T) / 0.7, -1).gather(-1, t[..., None]).squeeze(-1)
    got = grpo.token_logprobs(h, w, t, chunk_size=4, temperature=0.7)  # chunks do not divide 15
    assert torch.allclose(got, ref, atol=1e-5)
    gh_ref, gw_ref = torch.autograd.grad(ref.sum(), (h, w))
    gh, gw = torch.autograd.grad(got.sum(), (h, w))
    assert torch.allclose(gh, gh_ref, atol=1e-5) and torch.allclose(gw, gw_ref, atol=1e-5)


def test_token_logprobs_vocab_range_renormalises_over_allowed_rows():
    torch.manual_seed(1)
    h, w = torch.randn(2, 3, 4), torch.randn(10, 4)
    t = torch.tensor([[5, 7, 9], [9, 5, 5]])
    logits = h @ w.T
    allowed = [5, 7, 8, 9]  # row 6 disallowed inside [5, 10)
    masked = torch.full_like(logits, float("-inf"))
    masked[..., allowed] = logits[..., allowed]
    ref = torch.log_softmax(masked, -1).gather(-1, t[..., None]).squeeze(-1)
    got = grpo.token_logprobs(h, w, t, vocab_range=(5, 10), disallowed=(6,))
    assert torch.allclose(got, ref, atol=1e-5)
    with pytest.raises(ValueError, match="target id 2 is outside the scored vocabulary rows"):
        grpo.token_logprobs(h, w, torch.full((2, 3), 2), vocab_range=(5, 10))


def test_ratio_one_without_clip_gives_minus_mean_advantage():
    logp = torch.randn(4, 6)
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    loss, clipped = grpo.clipped_policy_loss(logp, logp.detach(), adv)
    mask = torch.ones(4, 6)
    assert torch.allclose(grpo.aggregate(loss, mask, "token-mean"), -adv.mean())
    assert not clipped.any()


def test_clip_and_dual_clip_hand_computed():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 5.0]]))  # ratios 1.5, 0.5, 5.0
    pos, cp = grpo.clipped_policy_loss(logp, old, torch.tensor([2.0]), 0.2, 0.2, dual_clip=None)
    # A > 0: -min(r*A, clip(r)*A) = -(1.2*2, 0.5*2, 1.2*2)
    assert torch.allclose(pos, torch.tensor([[-2.4, -1.0, -2.4]]))
    assert cp.tolist() == [[True, False, True]]
    neg, cn = grpo.clipped_policy_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.28, dual_clip=3.0)
    # A < 0: max(-r*A, -clip(r)*A) = (1.5, 0.8, 5.0) then dual clip caps at 3
    assert torch.allclose(neg, torch.tensor([[1.5, 0.8, 3.0]]))
    assert cn.tolist() == [[False, True, True]]


def test_gradient_sign_raises_logp_of_positive_advantage():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grpo.clipped_policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]))
    grpo.aggregate(loss, torch.ones(2, 3)).backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises row 0, lowers row 1


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
    assert torch.allclose(grpo.kl_penalty(logp, ref, "k1"), torch.tensor([[1.0, 0.0]]))
    # k3 = exp(ref - logp) - (ref - logp) - 1 = e^-1 + 1 - 1
    assert torch.allclose(grpo.kl_penalty(logp, ref, "k3"), torch.tensor([[math.exp(-1), 0.0]]))
    huge = grpo.kl_penalty(torch.tensor([[-200.0]]), torch.tensor([[0.0]]), "k3")
    assert torch.isfinite(huge).all()


def test_aggregation_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert grpo.aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert grpo.aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert grpo.aggregate(loss, mask, "seq-mean-token-sum-norm", max_len=5).item() == pytest.approx(10 / 10)
    with pytest.raises(ValueError, match="max_len"):
        grpo.aggregate(loss, mask, "seq-mean-token-sum-norm")
    # an all-masked batch gives 0, not NaN
    assert grpo.aggregate(loss, torch.zeros_like(mask), "token-mean").item() == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_add_up_to_the_mini_batch(mode):
    torch.manual_seed(0)
    loss = torch.rand(6, 4)
    mask = (torch.rand(6, 4) > 0.3).float()
    full = grpo.aggregate(loss, mask, mode, max_len=4)
    parts = sum(
        grpo.aggregate(loss[i : i + 2], mask[i : i + 2], mode, mask.sum().item(), 6, 4) for i in range(0, 6, 2)
    )
    assert torch.allclose(parts, full)


def test_truncated_importance_weights_hand_computed():
    trainer = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))
    sampler = torch.log(torch.tensor([[0.5, 0.3, 0.4]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = grpo.truncated_importance_weights(trainer, sampler, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 0.0]]))  # 0.9/0.3 = 3 capped at 2; padding 0
    loss, _ = grpo.clipped_policy_loss(trainer, trainer.detach(), torch.tensor([1.0]), is_weights=w)
    assert torch.allclose(loss, -w)
    with pytest.raises(ValueError, match="cap"):
        grpo.truncated_importance_weights(trainer, sampler, mask, cap=0.5)


def test_truncated_importance_weights_rows_and_padding():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -4.0]], requires_grad=True)
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -0.4, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = grpo.truncated_importance_weights(trainer, sampler, mask, cap=1.5)
    # exp(0.5) capped at 1.5; exp(-1); padding 0; exp(0); exp(0.1); exp(-3)
    expected = torch.tensor([[1.5, math.exp(-1.0), 0.0], [1.0, math.exp(0.1), math.exp(-3.0)]])
    assert torch.allclose(w, expected, atol=1e-6) and not w.requires_grad
    with pytest.raises(ValueError, match="same"):
        grpo.truncated_importance_weights(trainer, sampler[:, :2], mask, cap=2.0)


def test_token_logprobs_gradients_with_vocab_range_temperature_and_bf16():
    torch.manual_seed(2)
    h = torch.randn(2, 7, 6, requires_grad=True)
    w = torch.randn(30, 6, requires_grad=True)
    t = torch.randint(10, 20, (2, 7))
    t = t.masked_fill(t == 11, 12)  # 11 is disallowed: never a sampled token
    up = torch.rand(2, 7)  # the same upstream gradient for both

    def reference():
        logits = (h @ w.T)[..., 10:20] / 1.3
        logits = logits.masked_fill(torch.arange(10, 20) == 11, float("-inf"))
        return torch.log_softmax(logits, -1).gather(-1, (t - 10)[..., None]).squeeze(-1)

    ref = reference()
    g_ref = torch.autograd.grad((ref * up).sum(), (h, w))
    for chunk in (3, 8):  # head gradient accumulated in place (chunk < H = 6) and in a (V', H) buffer
        got = grpo.token_logprobs(h, w, t, chunk_size=chunk, temperature=1.3, vocab_range=(10, 20), disallowed=(11,))
        assert torch.allclose(got, ref, atol=1e-5)
        g_got = torch.autograd.grad((got * up).sum(), (h, w))
        for a, b in zip(g_got, g_ref):
            assert torch.allclose(a, b, atol=1e-5)
        assert not g_got[1][:10].any() and not g_got[1][20:].any()  # rows outside the range get no gradient
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    lb = grpo.token_logprobs(hb, wb, t, 4, vocab_range=(10, 20), disallowed=(11,))
    lb.sum().backward()
    assert lb.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and torch.isfinite(wb.grad).all()


def _reference_logprobs(h, w, t, vocab_range, disallowed, temperature):
    """Full log-softmax in float64, no autocast: the reference for the chunked fp32 head."""
    lo, hi = vocab_range
    logits = (h.double() @ w.double()[lo:hi].T) / temperature
    logits[..., [d - lo for d in disallowed]] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, (t - lo)[..., None]).squeeze(-1)


@pytest.mark.parametrize("backward_in_autocast", [True, False])
def test_token_logprobs_are_fp32_under_bf16_autocast(backward_in_autocast):
    """Under bf16 autocast (bf16-mixed) the head still runs in fp32, forward and backward, also when
    backward runs outside the autocast context: values and gradients equal a float64 reference to 1e-4,
    where a plain matmul under the same autocast is off by tenths of a nat."""
    torch.manual_seed(3)
    h = (2 * torch.randn(2, 48, 64)).requires_grad_()  # logits of a few units, as a trained LM head gives
    w = torch.randn(300, 64).requires_grad_()
    t = torch.randint(40, 300, (2, 48))
    up = torch.rand(2, 48)
    kw = dict(vocab_range=(40, 300), disallowed=(41, 42), temperature=0.8)
    t = t.masked_fill((t == 41) | (t == 42), 43)
    ref = _reference_logprobs(h, w, t, **kw)
    g_ref = torch.autograd.grad((ref * up.double()).sum(), (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = torch.log_softmax((h @ w[40:300].T) / 0.8, -1)
        assert naive.dtype == torch.bfloat16  # what autocast does to a plain head
        got = grpo.token_logprobs(h, w, t, chunk_size=20, **kw)
        loss = (got * up).sum()
        if backward_in_autocast:
            g_got = torch.autograd.grad(loss, (h, w))
    if not backward_in_autocast:
        g_got = torch.autograd.grad(loss, (h, w))
    naive_err = (naive.float().gather(-1, (t - 40)[..., None]).squeeze(-1).double() - ref).abs().max()
    assert naive_err > 1e-2, naive_err  # the error this guards against
    assert got.dtype == torch.float32 and (got.double() - ref).abs().max() < 1e-4
    for a, b in zip(g_got, g_ref):
        assert a.dtype == torch.float32 and (a.double() - b).abs().max() < 1e-4


def test_token_logprobs_of_a_bf16_head_are_fp32_and_keep_no_fp32_copy():
    """A bf16 head (a bf16 reference model) is cast to fp32 once per call, inside: the log-probs are those of the
    bf16 weights computed in fp32, and what forward saves for backward is the bf16 weight, not an fp32 copy."""
    torch.manual_seed(4)
    h = (2 * torch.randn(1, 40, 32)).requires_grad_()
    w = torch.randn(200, 32).bfloat16().requires_grad_()
    t = torch.randint(100, 200, (1, 40))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append((x.dtype, tuple(x.shape))) or x, lambda x: x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = grpo.token_logprobs(h, w, t, chunk_size=16, vocab_range=(100, 200))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _reference_logprobs(h64, w64, t, (100, 200), (), 1.0)
    assert (got.double() - ref).abs().max() < 1e-4
    assert (torch.bfloat16, (200, 32)) in saved
    assert not any(dtype == torch.float32 and len(shape) == 2 and shape[0] >= 100 for dtype, shape in saved), saved
    g_ref = torch.autograd.grad(ref.sum(), (h64, w64))
    got.sum().backward()
    assert w.grad.dtype == torch.bfloat16 and not w.grad[:100].any()
    assert torch.allclose(w.grad.double(), g_ref[1], rtol=1e-2, atol=1e-3)  # one bf16 rounding of the fp32 sum
    assert (h.grad.double() - g_ref[0]).abs().max() < 1e-4


def test_token_logprobs_run_in_full_fp32_when_tf32_is_on(monkeypatch):
    """With TF32 allowed process-wide (GRPOPolicy(tf32=True) on CUDA), the head switches matmuls to full fp32
    for its forward and its backward, and restores the process's setting after each."""
    calls = []
    real = torch.set_float32_matmul_precision
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: calls.append(p) or real(p))
    before = torch.get_float32_matmul_precision()
    try:
        real("high")
        h, w = torch.randn(1, 5, 8, requires_grad=True), torch.randn(12, 8, requires_grad=True)
        grpo.token_logprobs(h, w, torch.randint(0, 12, (1, 5)), chunk_size=2).sum().backward()
        assert calls == ["highest", "high", "highest", "high"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        real(before)


def _token_mean_worker(rank: int, world: int, port: int, out: str) -> None:
    """One DDP rank: the token-mean loss of its own rows, gradients averaged over ranks as DDP does."""
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    weight = torch.randn(4)
    feats = torch.randn(world, 3, 5, 4)  # every rank's rows: (3 rows, 5 tokens, 4 features)
    lengths = torch.tensor([[5, 1, 2], [1, 1, 0]])  # rank 0 has 8 tokens, rank 1 has 2
    masks = (torch.arange(5) < lengths[..., None]).float()

    def grad(feat, mask, normaliser):
        w = weight.clone().requires_grad_(True)
        grpo.aggregate(feat @ w, mask, "token-mean", normaliser).backward()
        return w.grad

    results = {}
    for name, normaliser in (("global", grpo.token_mean_normaliser(masks[rank])), ("per_rank", masks[rank].sum().item())):
        g = grad(feats[rank], masks[rank], normaliser)
        dist.all_reduce(g)
        results[name] = (g / world).tolist()
    # one process holding every rank's rows: the mean over all 10 tokens
    results["one_process"] = grad(feats.reshape(-1, 5, 4), masks.reshape(-1, 5), None).tolist()
    results["normaliser"] = grpo.token_mean_normaliser(masks[rank])
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_token_mean_under_ddp_is_the_mean_over_every_token_of_the_step(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_token_mean_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["normaliser"] == 5.0  # (8 + 2 tokens) / 2 ranks, on both ranks
        assert r["global"] == pytest.approx(r["one_process"], abs=1e-6)
        # normalising by the rank's own count weights rank 1's 2 tokens like rank 0's 8: not the same update
        assert max(abs(a - b) for a, b in zip(r["per_rank"], r["one_process"])) > 1e-2
    assert grpo.token_mean_normaliser(torch.ones(2, 3)) == 6.0  # no process group: the local count
