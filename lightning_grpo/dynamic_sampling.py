"""Dynamic sampling (DAPO, Yu et al. 2025, section 3.2): train on groups whose rewards differ, top the step up.

Under group-relative advantages a group whose G rewards are all equal gets advantage 0 on every row: it adds no
policy gradient, only tokens to the loss's denominator (token-mean) and, with beta > 0, a KL term. As a policy
improves, more groups are all-correct (or, early on, all-wrong), so a fixed batch trains on fewer prompts.
With `--rollout.dynamic_sampling true` the rollout callback drops those groups and generates further rounds of
prompts until this rank holds its `prompts_per_step / world_size` informative groups.

How it departs from DAPO, which keeps generating whole batches until the buffer is full:
- rounds are bounded (`--rollout.max_extra_rounds`); each draws, on every rank alike, the largest shortfall of
  any rank divided by the informative rate seen so far in the step (`topup_size`), at most one first round's
  worth, so a round never needs more memory than the first;
- every rank takes part in every round, since FSDP2's HF generate and a tensor-parallel vLLM engine need all
  ranks in every generate call; a rank that is already full generates its round's prompts and discards them
  unscored;
- a step still short after the last round is filled with zero-spread groups (`pick_groups`): they carry zero
  advantage, so no policy gradient, and every rank trains on the same number of rows (FSDP2 gathers the weights
  in every forward: ranks with different numbers of micro-batches would wait for each other forever).

The decisions are pure functions of lists and tensors (`zero_spread`, `topup_size`, `pick_groups`,
`reduce_stats`); the rollout callback runs the rounds with its sampler and reward and agrees on them over ranks.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

TopUp = Callable[[int, int, int, set], dict]  # (count, step, start, exclude texts) -> a prompt batch (data.py)


def zero_spread(rewards: torch.Tensor, group_size: int, tol: float) -> torch.Tensor:
    """rewards: (B*G,) grouped by prompt -> (B,) bool: the group's reward std (unbiased, as
    grpo.group_advantages) is <= tol, i.e. the group carries no advantage."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.detach().double().view(-1, group_size).std(dim=1).cpu() <= tol


def topup_size(short: Sequence[int], informative: int, scored: int, cap: int) -> int:
    """Prompts each rank draws in the next round: enough for the rank that is shortest of informative groups
    (`short`: each rank's shortfall) at the step's informative rate so far (`informative` of `scored` groups,
    all ranks), at least 1 and at most `cap` (a first round's prompts per rank); 0 when no rank is short."""
    need = max(short, default=0)
    if need <= 0:
        return 0
    if informative <= 0:
        return cap
    return max(1, min(cap, math.ceil(need * scored / informative)))


def pick_groups(informative: Sequence[Sequence[bool]], target: int) -> list[tuple[int, int]]:
    """(round, group) of the `target` groups to train on, from each round's per-group flags (round 0 first; a
    round this rank generated but did not score has no flags): the first `target` informative groups in round
    order, then, if fewer, the first zero-spread groups in round order to fill the step."""
    order = [(k, g) for k, flags in enumerate(informative) for g in range(len(flags))]
    good = [(k, g) for k, g in order if informative[k][g]][:target]
    fill = [(k, g) for k, g in order if not informative[k][g]][: target - len(good)]
    if len(good) + len(fill) < target:
        raise ValueError(f"{len(order)} groups cannot fill a step of {target}")
    return good + fill


def reduce_stats(ranks: Sequence[dict], dynamic: bool) -> dict[str, float]:
    """Each rank's step counts -> the logged metrics (sums over ranks; rounds are equal on every rank).

    A rank's dict: first_groups, first_zero_std (groups of the step's first round, and those with zero spread),
    samples (completions generated this step, every round, discarded ones included); with dynamic sampling also
    extra_rounds, prompts_drawn, groups_generated, groups_trained, informative_trained."""
    total = lambda key: sum(int(r[key]) for r in ranks)  # noqa: E731
    out = {
        "train/frac_reward_zero_std": total("first_zero_std") / max(total("first_groups"), 1),
        "train/samples_generated": float(total("samples")),
    }
    if dynamic:
        trained = total("groups_trained")
        out.update({
            "train/dynamic_extra_rounds": float(max(int(r["extra_rounds"]) for r in ranks)),
            "train/dynamic_prompts_drawn": float(total("prompts_drawn")),
            "train/dynamic_groups_dropped": float(total("groups_generated") - trained),
            "train/frac_groups_informative": total("informative_trained") / max(trained, 1),
        })
    return out
