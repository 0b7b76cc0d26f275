"""One-step-off rollouts (`--rollout.async_steps 1`): the next step's samples are generated while this step trains.

Synchronous (`async_steps 0`): step t generates its rollout R_t from the weights θ_t, then updates θ_t -> θ_t+1; the
sampler and the trainer take turns. One-step-off: at the start of step t the rollout callback takes R_t, generated
in the background from θ_t-1, copies θ_t into the generator's snapshot of the policy and starts generating R_t+1
from it on a worker thread; `training_step` updates on R_t meanwhile. Every sample trains one update after the
weights that drew it (`rollout/staleness` 1; 0 for a rollout generated in place: the first step, or after a
prediction of the next batch failed). The lag is what the loss's importance correction weighs out
(`--model.importance_correction` with a sampler that reports its log-probs: min(pi_trainer / pi_sampler, cap) per
token, logged as `train/is_weight_mean` and `train/is_weight_capped_frac`), as veRL's one-step-off trainer and TRL's
AsyncGRPO do.

Where the parts come from:
- the weights: a copy of the policy on its device (one more copy of the weights), refreshed in place before each
  launch; a policy sharded by FSDP2 has no whole copy on a rank and is refused. A sampler that keeps its own copy
  elsewhere (`generator.GeneratorProcess`) is sent the weights at the launch instead (`push_weights`, on every rank
  together: FSDP2 gathers them tensor by tensor), and no copy is made.
- the prompts of step t+1: the datamodule's `train_batch(epoch, index)`, the training loader's own order known in
  advance (`PromptDataModule`). When the loader then delivers another batch (a custom loader, a limit on batches),
  the rollout is dropped and the step generates in place, on every rank together.
- randomness: each rollout draws from a seed taken from the trainer's torch RNG when it is launched (the stream the
  callback checkpoints), under `torch.random.fork_rng`. While the thread generates it owns torch's global generator;
  the update draws nothing from it (GRPO's update has no dropout: a policy with dropout would make the samples
  depend on the threads' timing). Validation, which samples too, waits for the rollout in flight first.

Checkpoints: the rollout in flight is finished (generated and scored) and stored in the checkpoint with the step
and the weights' step it came from; a resumed run trains on it at its first step, so it trains on the samples the
uninterrupted run trained on. Regenerating it instead would need the weights of one update ago in every checkpoint.

Failure: a generation that raised stops every rank at the next point where the rollout is collected (step start,
validation, checkpoint), after one all_gather of each rank's error, naming the rank and the generator thread: a rank
that raised alone would leave the others waiting in the update's collectives.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from . import sharding, timing
from .batch import Rollout
from .distributed import gather_from_ranks
from .reward.base import RewardResult

# (pl_module, batch, step, model) -> the step's Rollout sampled from `model`, its rewards possibly pending
MakeRollout = Callable[[L.LightningModule, dict, int, torch.nn.Module], Rollout]
THREAD_NAME = "rollout-generator"


@dataclasses.dataclass
class InFlight:
    """A rollout launched ahead: for training rollout `step`, from the weights after `weights_step` updates."""

    step: int
    weights_step: int
    texts: list[str]
    future: Future | None = None
    rollout: Rollout | None = None


class RolloutAhead:
    """Keeps one rollout in flight: `rollout_for` hands out this step's and launches the next one."""

    def __init__(self, make: MakeRollout, push_weights: Callable[[torch.nn.Module], None] | None = None) -> None:
        """make: builds a rollout from a model; push_weights: sends the policy's weights to a sampler that keeps its
        own copy, which then samples from them whatever model `make` hands it."""
        self.make, self.push_weights = make, push_weights
        self._executor: ThreadPoolExecutor | None = None
        self._snapshot: torch.nn.Module | None = None
        self._in_flight: InFlight | None = None
        self._stored: dict[str, Any] | None = None  # a checkpoint's rollouts in flight, every rank's
        self.dropped = 0  # rollouts generated for a batch that did not come

    # -- one step ---------------------------------------------------------------------------------------------
    def rollout_for(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int,
                    step: int, next_batch: Callable[[int, int], dict]) -> Rollout:
        """Training rollout `step` for `batch`: the one in flight when it was made for this batch, else one generated
        now; then the launch of rollout step + 1 on next_batch(epoch, index) (none when max_steps ends the run first).
        Adds `rollout/staleness` and `timing/rollout_wait` (seconds blocked) to the rollout's sampler metrics (logged
        by training_step)."""
        start = time.perf_counter()
        self._restore_stored(trainer)
        self.finish()
        ahead, self._in_flight = self._in_flight, None
        usable = ahead is not None and ahead.step == step and ahead.texts == list(batch["text"])
        if ahead is not None and not all(gather_from_ranks(usable)):  # every rank generates in place, or none
            self.dropped += 1
            rank_zero_warn(
                f"the rollout generated ahead for step {step} was for another batch than the loader delivered "
                "(the training loader's order differs from the datamodule's train_batch): generated in place"
            )
            usable = False
        waited = timing.elapsed(start, pl_module.device)
        if usable:
            rollout, weights_step = ahead.rollout, ahead.weights_step
        else:
            rollout = _seeded(self.make, pl_module, batch, step, pl_module.policy, _draw_seed())
            weights_step = trainer.global_step
        if trainer.max_steps < 0 or trainer.global_step + 1 < trainer.max_steps:
            self._launch(trainer, pl_module, next_batch(trainer.current_epoch, batch_idx + 1), step + 1)
        rollout.sampler_metrics["rollout/staleness"] = float(trainer.global_step - weights_step)
        rollout.sampler_metrics["timing/rollout_wait"] = waited
        return rollout

    def _launch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, step: int) -> None:
        if self.push_weights is not None:
            self.push_weights(pl_module.policy)
            snapshot = pl_module.policy  # not read: the sampler holds the pushed weights
        else:
            snapshot = self._refresh_snapshot(pl_module.policy)
        seed = _draw_seed()  # in this thread, before the worker owns the generator
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME)
        future = self._executor.submit(_seeded, self.make, pl_module, batch, step, snapshot, seed)
        self._in_flight = InFlight(step, trainer.global_step, list(batch["text"]), future=future)

    @torch.no_grad()
    def _refresh_snapshot(self, policy: torch.nn.Module) -> torch.nn.Module:
        if self._snapshot is None:
            if sharding.is_sharded(policy):
                raise ValueError(
                    "--rollout.async_steps 1 generates from a copy of the policy's weights, and a policy sharded by "
                    "FSDP2 (ModelParallelStrategy) has no whole copy on a rank; use --rollout.async_steps 0, or DDP"
                )
            self._snapshot = copy.deepcopy(policy).requires_grad_(False).eval()
        else:
            self._snapshot.load_state_dict(policy.state_dict())
        return self._snapshot

    def finish(self) -> None:
        """Wait for the rollout in flight to be generated (a collective under DDP: a generation that raised on any
        rank raises on every rank, naming it). Validation and checkpoints call it before they touch the RNG."""
        ahead = self._in_flight
        error = None
        if ahead is not None and ahead.future is not None:
            try:
                ahead.rollout = ahead.future.result()
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                error = "".join(traceback.format_exception_only(exc)).strip()
                self._in_flight = None
            ahead.future = None
        if ahead is None and self._stored is None and not _distributed():
            return
        errors = gather_from_ranks(error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            raise RuntimeError(
                f"the rollout generator ({THREAD_NAME} thread, --rollout.async_steps) of rank {rank} failed while "
                f"generating the next step's rollout: {message}"
            )

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """The rollout in flight, finished and scored, every rank's (Lightning saves rank 0's callback state)."""
        self.finish()
        ahead = self._in_flight
        if ahead is None:
            return None
        return {"step": ahead.step, "weights_step": ahead.weights_step,
                "rank_rollouts": gather_from_ranks(rollout_state(ahead.rollout))}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._stored = state  # placed at the first step, which knows this process's rank and device

    def _restore_stored(self, trainer: L.Trainer) -> None:
        state, self._stored = self._stored, None
        if state is None:
            return
        ranks = state["rank_rollouts"]
        if len(ranks) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the rollouts in flight of {len(ranks)} process(es), this run has "
                f"{trainer.world_size}: the first step generates in place, not the uninterrupted run's samples"
            )
            return
        rollout = rollout_from_state(ranks[trainer.global_rank], trainer.lightning_module.device)
        prompts = rollout.texts[:: rollout.group_size]  # the rows are grouped by prompt
        self._in_flight = InFlight(state["step"], state["weights_step"], prompts, rollout=rollout)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._in_flight = None


def _seeded(make: MakeRollout, pl_module: L.LightningModule, batch: dict, step: int, model: torch.nn.Module,
            seed: int) -> Rollout:
    """`make` with torch's generators seeded by `seed` and restored after (the trainer's stream goes on unchanged)."""
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return make(pl_module, batch, step, model)


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, ()).item())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rollout_state(r: Rollout) -> dict[str, Any]:
    """A scored Rollout as plain values and CPU tensors (checkpoints load with weights_only=True)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Rollout):
        if f.name == "pending":
            continue
        value = getattr(r, f.name)  # rewards and reward_result wait for pending scores
        if isinstance(value, RewardResult):
            value = {"rewards": value.rewards.cpu(), "metrics": {k: v.cpu() for k, v in value.metrics.items()},
                     "reasons": list(value.reasons), "transcripts": list(value.transcripts)}
        elif isinstance(value, torch.Tensor):
            value = value.cpu()
        out[f.name] = value
    return out


def rollout_from_state(state: dict[str, Any], device: torch.device) -> Rollout:
    """The Rollout `rollout_state` stored, its tensors on `device`."""
    values = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    values["reward_result"] = RewardResult(**state["reward_result"])
    return Rollout(**values)
