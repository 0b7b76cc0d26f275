"""Gathering Python objects and summing numbers over the ranks of a run (one call site per collective, one definition)."""

from __future__ import annotations

from typing import Any, Sequence

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
