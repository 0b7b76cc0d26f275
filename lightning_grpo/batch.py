"""The Rollout: what the rollout callback hands `training_step` (the sampler-to-trainer contract).

One `Rollout` is one step's samples: prompts_per_step / world_size prompts on this rank, each with
`group_size` completions, scored (or still being scored), laid out for the loss. `rollout_records` turns
it into one JSON-ready row per completion, the form evaluation reports and audio logs share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    records = []
    for i in range(len(rollout.texts)) if rows is None else rows:
        rec = {
            "text": rollout.texts[i],
            "language": languages[i // rollout.group_size] if languages else None,
            "reward": float(rollout.rewards[i]),
            "completion_length": len(rollout.completion_ids[i]) if rollout.completion_ids else None,
            "truncated": bool(rollout.truncated[i]),
            "reason": res.reasons[i],
            "transcript": res.transcripts[i] if res.transcripts else None,
        }
        for name, value in sorted(res.metrics.items()):
            v = float(value[i])
            rec[name] = v if math.isfinite(v) else None  # None: not measured for this sample
        records.append(rec)
    return records
