"""The policy's token entropy from the chunked log-prob pass: equal to a dense log_softmax computation, the log-probs
untouched, and what `train/entropy` and `val/entropy` log."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_grpo import grpo
from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler


def dense_entropy(logits: torch.Tensor, temperature: float = 1.0, vocab_range=None, disallowed=()) -> torch.Tensor:
    """-sum p log p of softmax(logits / T) over rows [lo, hi) with `disallowed` at -inf, from full (..., V) logits."""
    lo, hi = vocab_range if vocab_range is not None else (0, logits.shape[-1])
    z = logits[..., lo:hi].double() / temperature
    if disallowed:
        z[..., [d - lo for d in disallowed]] = float("-inf")
    logp = torch.log_softmax(z, -1)
    return -torch.where(logp.isfinite(), logp.exp() * logp, torch.zeros((), dtype=z.dtype)).sum(-1)


@pytest.mark.parametrize("chunk, temperature, rows, scale", [
    (4, 0.7, ((10, 30), (12, 17)), 1.0),  # chunks that do not divide N*T, restricted rows with holes
    (512, 1.0, None, 1.0),  # one chunk, the whole vocabulary
    (5, 1.0, None, 12.0),  # peaked distributions (logits of ~+-40): entropies near 0
])
def test_entropy_equals_a_dense_log_softmax(chunk, temperature, rows, scale):
    torch.manual_seed(0)
    h = (scale * torch.randn(3, 7, 8)).requires_grad_(True)
    w = torch.randn(40, 8, requires_grad=True)
    vocab_range, disallowed = rows if rows else (None, ())
    lo, hi = vocab_range or (0, 40)
    allowed = [i for i in range(lo, hi) if i not in disallowed]
    t = torch.tensor(allowed)[torch.randint(0, len(allowed), (3, 7))]
    kw = dict(chunk_size=chunk, temperature=temperature, vocab_range=vocab_range, disallowed=disallowed)
    logp, ent = grpo.token_logprobs_and_entropy(h, w, t, **kw)
    expected = dense_entropy(h.detach() @ w.detach().T, temperature, vocab_range, disallowed)
    assert ent.dtype == torch.float32 and ent.shape == (3, 7)
    assert torch.allclose(ent.double(), expected, rtol=0, atol=1e-5), (ent.double() - expected).abs().max()
    assert (ent >= -1e-6).all() and (ent.double() <= torch.log(torch.tensor(float(len(allowed)))) + 1e-5).all()
    if scale > 1:
        assert expected.min() < 1e-3  # the peaked case reaches entropies near 0
    # the log-probs are token_logprobs' bit for bit, and so is their gradient; the entropy has none
    plain = grpo.token_logprobs(h, w, t, **kw)
    assert torch.equal(logp, plain) and not ent.requires_grad
    weights = torch.randn(3, 7)
    g_with = torch.autograd.grad((logp * weights).sum(), (h, w))
    g_plain = torch.autograd.grad((plain * weights).sum(), (h, w))
    assert all(torch.equal(a, b) for a, b in zip(g_with, g_plain))


def test_entropy_is_fp32_under_bf16_autocast_and_empty_inputs_work():
    torch.manual_seed(1)
    h, w = torch.randn(2, 5, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ent = grpo.token_logprobs_and_entropy(h, w, t, chunk_size=3)
    assert ent.dtype == torch.float32
    assert torch.allclose(ent.double(), dense_entropy(h @ w.T), atol=1e-5)
    logp, ent = grpo.token_logprobs_and_entropy(torch.zeros(2, 0, 8), w, torch.zeros(2, 0, dtype=torch.long))
    assert logp.shape == ent.shape == (2, 0)


class DenseEntropy(L.Callback):
    """Before each train / val step (after the rollout callback made the rollout): the mean entropy over the
    completion tokens, from the policy's full logits (an HF forward, log_softmax) at the current weights."""

    def __init__(self) -> None:
        self.train, self.val = [], []

    @staticmethod
    @torch.no_grad()
    def entropy(pl_module, r) -> float:
        mask = r.attention_mask
        logits = pl_module.policy(input_ids=r.input_ids, attention_mask=mask,
                                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits  # (N, P + C, V)
        ent = dense_entropy(logits[:, r.prompt_width - 1 : -1], r.temperature, r.vocab_range, r.disallowed)
        cm = r.completion_mask.double()
        return float((ent * cm).sum() / cm.sum())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(self.entropy(pl_module, batch["rollout"]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(self.entropy(pl_module, batch["rollout"]))


def test_train_and_val_entropy_are_the_policys_over_the_sampled_rows():
    """Logged train/entropy is the rollout policy's entropy over the speech rows at the sampling temperature, averaged
    over the completion tokens (several micro-batches, two updates: the entropy is the first pass's), and val/entropy
    the same over the validation rollout after the update."""
    L.seed_everything(0)
    policy = GRPOPolicy(learning_rate=5e-2, num_iterations=2, micro_batch_size=3)
    rollout = GRPORollout(HFSampler(temperature=0.8, max_new_tokens=6), RuleReward(codes_per_char=0.3, band=(0, 8)),
                          group_size=4, val_group_size=2)
    dense = DenseEntropy()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, val_check_interval=1, callbacks=[rollout, dense])
    trainer.fit(policy, PromptDataModule(prompts_per_step=2, val_prompts_per_step=3))
    m = trainer.callback_metrics
    assert len(dense.train) == 1 and len(dense.val) == 1
    assert float(m["train/entropy"]) == pytest.approx(dense.train[0], abs=1e-5)
    assert float(m["val/entropy"]) == pytest.approx(dense.val[0], abs=1e-5)
    assert dense.val[0] != pytest.approx(dense.train[0], abs=1e-3)  # the update changed the policy in between
    # the sampled token's NLL is a different quantity (logged beside it, not instead)
    assert float(m["train/neg_logp"]) != pytest.approx(float(m["train/entropy"]), abs=1e-3)
