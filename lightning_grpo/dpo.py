"""DPO math as pure torch functions: the preference loss, its NLL and CER terms, and the logged statistics.

Notation: B pairs; T = completion length (padded). Inputs are per-token log-probs of the completions
(grpo.token_logprobs, the same chunked pass GRPO uses) and their masks; a pair's log-prob is the sum over its
tokens, as in the DPO paper (Rafailov et al. 2023, arXiv 2305.18290) and TRL's `sigmoid` loss.

    chosen_logratio   = log pi(y_w | x) - log pi_ref(y_w | x)             (B,)
    rejected_logratio = log pi(y_l | x) - log pi_ref(y_l | x)             (B,)
    loss_dpo          = -log sigmoid(beta * (chosen_logratio - rejected_logratio))

The reference is the round's starting model, so each round is regularised to the model the listeners judged
(iterative DPO, as Shin et al., arXiv 2509.18531, run it on TTS). Two optional terms, both off by default:
- the NLL term (`summed_nll`): the token-mean NLL of the chosen samples (RPO, Pang et al. 2024; TRL's
  `loss_type=["sigmoid", "sft"]`), which stops DPO from lowering the chosen sample's likelihood with the rejected one's.
- `cer_weight`: a second DPO term on the same pair ordered by the intelligibility gate's CER instead of the
  listener, weighted by the CER gap (zero for pairs of equal CER): where a listener preferred the less
  intelligible sample it pulls back, so preference rounds cannot trade intelligibility for prosody unchecked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def sequence_logprobs(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probs over each row's completion tokens: (N, T), (N, T) -> (N,)."""
    return (token_logp * mask).sum(-1)


class DPOTerms(NamedTuple):
    """Per pair, each (B,): losses (DPO plus the CER term; differentiable), and, detached, chosen_reward /
    rejected_reward = beta * log-ratio (DPO's implicit reward) and margin = their difference."""

    losses: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    margin: torch.Tensor


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    cer_gap: torch.Tensor | None = None,
    cer_weight: float = 0.0,
) -> DPOTerms:
    """The DPO loss of each of B pairs, with the optional CER term (the caller takes the mean over pairs).

    chosen_logp, rejected_logp: (B,) sequence log-probs of the policy; ref_*: (B,) the reference's (no grad).
    beta: the DPO temperature (> 0): larger keeps the policy closer to the reference.
    cer_gap: (B,) CER(rejected) - CER(chosen) from the gate (required when cer_weight > 0); a positive gap means
        the listener's choice is also the more intelligible one, and that term then pushes the same way.
    """
    if not beta > 0:
        raise ValueError(f"DPO beta={beta} must be > 0")
    chosen_ratio = chosen_logp - ref_chosen_logp  # (B,)
    rejected_ratio = rejected_logp - ref_rejected_logp  # (B,)
    delta = chosen_ratio - rejected_ratio  # (B,)
    losses = -F.logsigmoid(beta * delta)
    if cer_weight:
        if cer_gap is None or not torch.isfinite(cer_gap).all():
            raise ValueError("cer_weight > 0 needs cer_gap = CER(rejected) - CER(chosen), finite for every pair")
        # the pair ordered by CER: -log sigmoid(beta * sign(gap) * delta), weighted by |gap|
        losses = losses + cer_weight * cer_gap.abs() * -F.logsigmoid(beta * torch.sign(cer_gap) * delta)
    chosen_reward = beta * chosen_ratio.detach()
    rejected_reward = beta * rejected_ratio.detach()
    return DPOTerms(losses, chosen_reward, rejected_reward, chosen_reward - rejected_reward)


def summed_nll(token_logp: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """-(sum of masked log-probs) / num_tokens: (N, T), (N, T) -> (). With num_tokens the whole step's count of
    chosen tokens, the micro-batches' terms add up to the step's token-mean NLL (TRL's `sft` loss on one batch);
    under DDP, with grpo.token_mean_normaliser's count (all ranks' tokens / ranks), the ranks' averaged gradient is
    that of the token mean over every rank's chosen tokens."""
    return -(token_logp * mask).sum() / max(num_tokens, 1.0)
