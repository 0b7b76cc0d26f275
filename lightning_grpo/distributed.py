"""Gathering Python objects and summing numbers over the ranks of a run (one call site per collective, one definition),
and stopping every rank together when one fails.

An error raised on one rank only leaves the others in their next collective: gloo fails there with a message that
says nothing, NCCL waits until its watchdog kills the job (the process group's timeout, 30 minutes by default). Each
check that can fail on some ranks only therefore reports its error to `raise_on_every_rank`, which every rank calls
at the same point, and every rank raises the same message:
- the reward of a rollout (`scoring.RewardScoring.result`): a failed piece, an owner that died or never answered;
- the vLLM weight-sync check and the engine's placement (`vllm_sampler.VLLMSampler`): each rank has its own engine;
- the reward owner's readiness at setup (`reward.owner.SharedReward.start`): each node has its own owner.
A check that waits (a scoring request's retries) must also give up well within the process group's timeout, or the
waiting ranks are killed before its error arrives (`process_group_timeout_s`; reward/client.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import math

import torch
import torch.distributed as dist


def gather_from_ranks(obj: Any, group: Any = None) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] over `group` (default: all ranks); [obj] without a process group.

    A collective: under DDP every rank of the group must call it, in the same order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [obj]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def concat_from_ranks(items: list[Any], group: Any = None) -> list[Any]:
    """Every rank's `items` concatenated in rank order (a collective, as `gather_from_ranks`)."""
    return [x for part in gather_from_ranks(items, group) for x in part]


def sum_over_ranks(values: Sequence[float], device: torch.device | str = "cpu", group: Any = None) -> list[float]:
    """Element-wise sums of `values` over the ranks of `group`: one all_reduce of a float64 vector on `device` (the
    backend's: CUDA for NCCL); the values themselves without a process group. A collective: every rank calls it,
    with as many values, in the same order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [float(v) for v in values]
    vector = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(vector, group=group)
    return vector.tolist()


def gather_by_name(values: dict[str, torch.Tensor], rows: int, device: torch.device | str = "cpu",
                   group: Any = None) -> dict[str, torch.Tensor]:
    """Per-sample values of every rank, concatenated in rank order under each name any rank has: {name: (world*rows,)}.

    Ranks may hold different names (a rank whose rollout has no speech scores it locally, without the server's
    metrics); a name this rank lacks contributes `rows` NaN, which statistics over finite values leave out (missing,
    not zero). Collectives: one all_gather of the names, then one all_gather per name in sorted order, each of a
    float32 (rows,) tensor on `device` (the backend's: CUDA for NCCL); every rank has the same `rows`."""
    for name, value in values.items():
        if value.numel() != rows:
            raise ValueError(f"gather_by_name: {name!r} has {value.numel()} values for {rows} rows")
    names = sorted({name for part in gather_from_ranks(sorted(values), group) for name in part})
    mine = {name: values[name].detach().float().reshape(rows).to(device) if name in values
            else torch.full((rows,), math.nan, device=device) for name in names}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return mine
    out = {}
    for name in names:
        parts = [torch.empty_like(mine[name]) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine[name], group=group)
        out[name] = torch.cat(parts)
    return out


def raise_on_every_rank(error: BaseException | None, what: str, group: Any = None) -> None:
    """Raise on every rank of `group` if `error` is set on any: this rank's own error, else a RuntimeError naming the
    first failing rank and quoting its message. A collective (one all_gather of a string or None): every rank calls it
    at the same point, with None where its check passed."""
    errors = gather_from_ranks(None if error is None else f"{type(error).__name__}: {error}", group)
    if error is not None:
        raise error
    failed = [(rank, msg) for rank, msg in enumerate(errors) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank}, so every rank stops: {msg}")


def process_group_timeout_s(trainer: Any) -> float | None:
    """How long a collective waits for the slowest rank before the run is killed: the strategy's `timeout` (Lightning's
    DDPStrategy and ModelParallelStrategy; 30 minutes unless set), in seconds; None for a single process."""
    if trainer is None or getattr(trainer, "world_size", 1) <= 1:
        return None
    timeout = getattr(trainer.strategy, "_timeout", None)  # Lightning keeps the argument under this name only
    return timeout.total_seconds() if timeout is not None else None
