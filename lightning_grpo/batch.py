"""The Rollout: what the rollout callback hands `training_step` (the sampler-to-trainer contract).

One `Rollout` is one step's samples: prompts_per_step / world_size prompts on this rank, each with
`group_size` completions, scored (or still being scored), laid out for the loss. `rollout_records` turns
it into one JSON-ready row per completion, the form evaluation reports and audio logs share; `select_groups`
builds one Rollout from chosen groups of several (dynamic sampling's rounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from .reward.base import RewardResult


class PendingRewards(Protocol):
    """Rewards still being scored (`rollout.overlap_reward`): `result()` blocks until every sample is scored
    and returns the (N,) rewards on the rollout's device, the reward's result, and the seconds spent
    {"reward": busy, "reward_wait": blocked}; it raises what the reward raised."""

    def result(self) -> tuple[torch.Tensor, RewardResult, dict[str, float]]: ...


@dataclass
class Rollout:
    """One step's samples, on the policy's device.

    input_ids: (N, P + C) prompts left-padded to width P, completions right-padded to C;
    attention_mask: (N, P + C); completion_mask: (N, C) 1 on tokens the loss sees (stop token
    included; all 0 for rows masked by the truncation policy); rewards, truncated: (N,);
    sampler_logprobs: (N, C) or None; sampler_metrics: the sampler's own checks (vLLM:
    sync/logprob_mean_abs_diff, ...); timings: seconds this rank spent per phase of the step
    (generate, weight_sync, reward, reward_wait; the policy adds logprob and update).
    N = B * group_size, grouped by prompt.

    With `pending` the rewards are still being scored: reading `rewards` or `reward_result` waits for them
    (`wait_for_rewards`), so the trainer can compute what needs no reward (old and reference log-probs) first.
    Under DDP that first wait is a collective (a failed reward stops every rank, scoring.py): every rank reaches
    it at the same point, `training_step` (validation: the rollout callback).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_width: int
    truncated: torch.Tensor
    group_size: int
    temperature: float
    max_new_tokens: int
    texts: list[str]
    rewards: torch.Tensor | None = None  # (N,) float32 after the truncation policy; reading waits for pending scores
    reward_result: RewardResult | None = None  # the reward's own result; reading waits for pending scores
    pending: PendingRewards | None = None
    sampler_logprobs: torch.Tensor | None = None
    vocab_range: tuple[int, int] | None = None
    disallowed: tuple[int, ...] = ()
    completion_ids: list[list[int]] = field(default_factory=list)
    sampler_metrics: dict[str, float] = field(default_factory=dict)
    top_p: float = 1.0  # the sampler's truncation, so importance weights score the distribution it drew from
    top_k: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pending is None and (self._rewards is None or self._reward_result is None):
            raise ValueError("a Rollout needs its rewards and reward result, or a pending scoring of them")

    def wait_for_rewards(self) -> None:
        """Block until the rewards are scored (no-op when they are); adds `reward` and `reward_wait` timings."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            self._rewards, self._reward_result, seconds = pending.result()
        except BaseException:
            self.pending = pending  # a second read raises again instead of returning None
            raise
        for key, value in seconds.items():
            self.timings[key] = self.timings.get(key, 0.0) + value

    @property
    def completion_lengths(self) -> torch.Tensor:
        """(N,) tokens sampled per row (stop token included), before any loss mask."""
        return torch.tensor([len(c) for c in self.completion_ids], dtype=torch.float32)


def _waits_for_rewards(name: str, doc: str) -> property:
    """A Rollout attribute that waits for pending scores when read (the dataclass __init__ assigns it)."""
    private = f"_{name}"

    def get(self: Rollout) -> Any:
        self.wait_for_rewards()
        return getattr(self, private)

    def set(self: Rollout, value: Any) -> None:
        setattr(self, private, value)

    return property(get, set, doc=doc)


Rollout.rewards = _waits_for_rewards("rewards", "(N,) float32 rewards after the truncation policy; waits for pending scores.")  # type: ignore[assignment]
Rollout.reward_result = _waits_for_rewards("reward_result", "The reward's RewardResult (metrics, reasons, transcripts); waits for pending scores.")  # type: ignore[assignment]


def rollout_records(rollout: Rollout, languages: list[str | None] | None = None, rows: list[int] | None = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per completion: text, language, reward, completion_length, truncated,
    reason, transcript, then every reward metric (None where the reward did not measure it).

    languages: one per prompt (rows are grouped by prompt), or None; rows: which completions
    (default: all, in order)."""
    res = rollout.reward_result
    # one host copy per tensor, not a device sync per element
    rewards, truncated = rollout.rewards.tolist(), rollout.truncated.tolist()
    metrics = {name: torch.as_tensor(value).tolist() for name, value in sorted(res.metrics.items())}
    records = []
    for i in range(len(rollout.texts)) if rows is None else rows:
        rec = {
            "text": rollout.texts[i],
            "language": languages[i // rollout.group_size] if languages else None,
            "reward": float(rewards[i]),
            "completion_length": len(rollout.completion_ids[i]) if rollout.completion_ids else None,
            "truncated": bool(truncated[i]),
            "reason": res.reasons[i],
            "transcript": res.transcripts[i] if res.transcripts else None,
        }
        for name, values in metrics.items():
            v = float(values[i])
            rec[name] = v if math.isfinite(v) else None  # None: not measured for this sample
        records.append(rec)
    return records


def pad_rows(prompts: Sequence[Sequence[int] | torch.Tensor], completions: Sequence[Sequence[int] | torch.Tensor],
             pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The loss's layout of N rows: (input_ids, attention_mask, P), both (N, P + C), each prompt left-padded to
    the widest (P) and its completion right-padded to the longest (C, at least 1), on the rows' device."""
    prompts = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    completions = [torch.as_tensor(c, dtype=torch.long) for c in completions]
    width, clen = max(len(p) for p in prompts), max(1, max(len(c) for c in completions))
    device = prompts[0].device
    input_ids = torch.full((len(prompts), width + clen), pad_id, dtype=torch.long, device=device)  # (N, P+C)
    attention_mask = torch.zeros_like(input_ids)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[row, width - len(p) : width + len(c)] = torch.cat([p, c])
        attention_mask[row, width - len(p) : width + len(c)] = 1
    return input_ids, attention_mask, width


def pad_right(rows: Sequence[Sequence[float] | torch.Tensor], width: int) -> torch.Tensor:
    """(N, width) float32: row k's values first, zeros after (completion masks and per-token log-probs)."""
    rows = [torch.as_tensor(r, dtype=torch.float32) for r in rows]
    out = torch.zeros(len(rows), width, device=rows[0].device if rows else None)
    for k, r in enumerate(rows):
        out[k, : len(r)] = r
    return out


def select_groups(rollouts: Sequence[Rollout], picks: Sequence[tuple[int, int]], pad_id: int) -> Rollout:
    """One Rollout of the groups `picks` ((rollout index, group index) pairs, in that order) of scored rollouts,
    re-padded to the widest kept prompt and the longest kept completion (dynamic sampling: rounds whose prompt
    widths and completion lengths differ). Every per-row field follows its rows; `timings` are summed over all
    `rollouts`, kept or not (all were generated and scored); `sampler_metrics` are merged, later rounds' last.
    A single rollout picked whole, in order, is returned as it is."""
    if not rollouts:
        raise ValueError("select_groups needs at least one rollout")
    first = rollouts[0]
    g = first.group_size
    for r in rollouts:
        r.wait_for_rewards()
        same = (r.group_size, r.temperature, r.max_new_tokens, r.top_p, r.top_k, r.vocab_range, r.disallowed)
        if same != (g, first.temperature, first.max_new_tokens, first.top_p, first.top_k, first.vocab_range, first.disallowed):
            raise ValueError("rollouts sampled with different group sizes or sampling settings cannot be merged")
        if (r.sampler_logprobs is None) != (first.sampler_logprobs is None):
            raise RuntimeError("the sampler reported log-probs for some rounds of a step but not all")
    if len(rollouts) == 1 and list(picks) == [(0, b) for b in range(len(first.texts) // g)]:
        return first
    rows = [(k, b * g + j) for k, b in picks for j in range(g)]
    prompt_lens = [int(rollouts[k].attention_mask[i, : rollouts[k].prompt_width].sum()) for k, i in rows]
    comp_lens = [len(rollouts[k].completion_ids[i]) for k, i in rows]
    spans = [(rollouts[k], i, rollouts[k].prompt_width, p, c) for (k, i), p, c in zip(rows, prompt_lens, comp_lens)]
    input_ids, attention_mask, width = pad_rows([r.input_ids[i, w - p : w] for r, i, w, p, _ in spans],
                                                [r.input_ids[i, w : w + c] for r, i, w, _, c in spans], pad_id)
    clen = input_ids.shape[1] - width
    completion_mask = pad_right([r.completion_mask[i, :c] for r, i, _, _, c in spans], clen)
    sampler_logprobs = None if first.sampler_logprobs is None else pad_right(
        [r.sampler_logprobs[i, :c] for r, i, _, _, c in spans], clen)
    offsets = [0]
    for r in rollouts:
        offsets.append(offsets[-1] + len(r.texts))
    result = RewardResult.cat([r.reward_result for r in rollouts]).rows([offsets[k] + i for k, i in rows])
    timings: dict[str, float] = {}
    sampler_metrics: dict[str, float] = {}
    for r in rollouts:
        for key, value in r.timings.items():
            timings[key] = timings.get(key, 0.0) + value
        sampler_metrics.update(r.sampler_metrics)
    return Rollout(
        input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask, prompt_width=width,
        truncated=torch.stack([rollouts[k].truncated[i] for k, i in rows]), group_size=g,
        temperature=first.temperature, max_new_tokens=first.max_new_tokens,
        texts=[rollouts[k].texts[i] for k, i in rows],
        rewards=torch.stack([rollouts[k].rewards[i] for k, i in rows]), reward_result=result,
        sampler_logprobs=sampler_logprobs, vocab_range=first.vocab_range, disallowed=first.disallowed,
        completion_ids=[list(rollouts[k].completion_ids[i]) for k, i in rows], sampler_metrics=sampler_metrics,
        top_p=first.top_p, top_k=first.top_k, timings=timings,
    )
