"""The Rollout: what the rollout callback hands `training_step` (the sampler-to-trainer contract).

One `Rollout` is one step's samples: prompts_per_step / world_size prompts on this rank, each with
`group_size` completions, scored, laid out for the loss. `rollout_records` turns it into one
JSON-ready row per completion, the form evaluation reports and audio logs share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .reward.base import RewardResult


@dataclass
class Rollout:
    """One step's samples, on the policy's device.

    input_ids: (N, P + C) prompts left-padded to width P, completions right-padded to C;
    attention_mask: (N, P + C); completion_mask: (N, C) 1 on tokens the loss sees (stop token
    included; all 0 for rows masked by the truncation policy); rewards, truncated: (N,);
    sampler_logprobs: (N, C) or None; sampler_metrics: the sampler's own timings and sync checks
    (vLLM: rollout/sync_s, sync/logprob_mean_abs_diff, ...). N = B * group_size, grouped by prompt.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_width: int
    rewards: torch.Tensor
    truncated: torch.Tensor
    group_size: int
    temperature: float
    max_new_tokens: int
    texts: list[str]
    reward_result: RewardResult
    sampler_logprobs: torch.Tensor | None = None
    vocab_range: tuple[int, int] | None = None
    disallowed: tuple[int, ...] = ()
    completion_ids: list[list[int]] = field(default_factory=list)
    sampler_metrics: dict[str, float] = field(default_factory=dict)
    top_p: float = 1.0  # the sampler's truncation, so importance weights score the distribution it drew from
    top_k: int = 0

    @property
    def completion_lengths(self) -> torch.Tensor:
        """(N,) tokens sampled per row (stop token included), before any loss mask."""
        return torch.tensor([len(c) for c in self.completion_ids], dtype=torch.float32)


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
