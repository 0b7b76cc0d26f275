"""Gathering Python objects over the ranks of a run (one call site per collective, one definition)."""

from __future__ import annotations

from typing import Any

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
