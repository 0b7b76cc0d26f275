"""Per-step timings and throughput, reduced over ranks: what a step's wall time went to.

Every training step logs (to every logger; `timing/step` also on the progress bar):

    timing/generate     sampling, weight sync excluded
    timing/weight_sync  copying the policy's weights into the sampler's engine (vLLM; 0 for HF generate)
    timing/reward       the reward was busy with this rank's samples: the union of its score calls' spans
                        (an owner process: from request to answer, queueing behind other ranks included)
    timing/reward_wait  what the trainer actually waited for rewards (all of timing/reward when sequential)
    timing/logprob      old and reference log-probs (the work that overlaps outstanding rewards)
    timing/update       the optimiser updates: forward, backward, all-reduce, step
    timing/step         the rollout callback's on_train_batch_start to its on_train_batch_end
    perf/samples_per_s, perf/speech_tokens_per_s    all ranks' completions (and their tokens) / timing/step
    perf/max_memory_allocated_gib, perf/max_memory_reserved_gib   the step's peak of torch's CUDA allocator
                        (CUDA only; memory vLLM's own allocator holds is not in it)

Wall times are the maximum over ranks (the slowest rank sets the step's pace), counts the sum, memory the
maximum; one all_gather per step. On CUDA each phase ends with a synchronize, so a phase's time is its
kernels' and not their launch's.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

PHASES = ("generate", "weight_sync", "reward", "reward_wait", "logprob", "update", "step")
GIB = 2**30


def elapsed(start: float, device: torch.device | None = None) -> float:
    """Seconds since `start` (a time.perf_counter value), after the device's queued work has finished."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def sampling_timings(sampling_s: float, sampler_metrics: dict[str, float]) -> dict[str, float]:
    """A sampling call's seconds split into generate and weight_sync (the sampler's `timing/weight_sync`,
    popped from `sampler_metrics`, a copy of the sampler's metrics)."""
    weight_sync = float(sampler_metrics.pop("timing/weight_sync", 0.0))
    return {"generate": max(0.0, sampling_s - weight_sync), "weight_sync": weight_sync}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """The peaks of torch's CUDA allocator since the last reset, in GiB; {} off CUDA."""
    if device.type != "cuda":
        return {}
    return {
        "perf/max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "perf/max_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
    }


def reduce_step(ranks: Sequence[dict]) -> dict[str, float]:
    """Each rank's {"timings": {phase: s}, "samples": int, "tokens": int, "memory": {key: GiB}} -> logged metrics.

    Wall times: max over ranks; samples and tokens: summed; memory: max. A phase a rank did not time counts 0."""
    out = {f"timing/{p}": max(float(r["timings"].get(p, 0.0)) for r in ranks) for p in PHASES}
    step = max(out["timing/step"], 1e-9)
    out["perf/samples_per_s"] = sum(int(r["samples"]) for r in ranks) / step
    out["perf/speech_tokens_per_s"] = sum(int(r["tokens"]) for r in ranks) / step
    for key in sorted({k for r in ranks for k in r.get("memory", {})}):
        out[key] = max(float(r["memory"].get(key, 0.0)) for r in ranks)
    return out
