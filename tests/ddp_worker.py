"""Run by test_ddp.py: a 2-process CPU (gloo) DDP fit that writes what each rank saw to JSON.

    python tests/ddp_worker.py OUT [--max_steps N] [--max_train_samples N] [--ckpt_dir DIR] [--resume]
                                   [--num_iterations N] [--sync_every_micro_batch] [--save_weights]
                                   [--shared_reward] [--kill_owner_at STEP] [--no_overlap] [--fail_rank1_at STEP]
                                   [--dynamic]
--ckpt_dir saves a checkpoint every step there; --resume continues from its last.ckpt.
--shared_reward scores through one SharedReward owner process for both ranks (tests/owner_rewards.py's
CountingRuleReward, recording its loads and calls under OUT); --kill_owner_at S has rank 0 SIGKILL the owner
at the start of step S (both ranks then wait at a barrier, so neither scores before the kill), and each rank
writes the error it stopped with to rank{r}_error.txt. --no_overlap scores sequentially. --fail_rank1_at S: rank 1's
in-process reward raises at step S (rank 0's does not); errors are written as with --kill_owner_at.
--async_steps N: one-step-off rollouts (N=1); --fail_generator_rank1_at S: rank 1's sampler raises from training
rollout S on (inside the generator thread under --async_steps 1); errors are written as with --kill_owner_at.
--dynamic: dynamic sampling on (3 extra rounds at most) with a reward that is constant, on rank 1 only, for prompts
of even length, and truncated completions scored as they are: rank 1 needs top-ups where rank 0 does not.
The strategy is DDP with gradient_as_bucket_view and a communication hook that records every gradient
bucket all-reduced, so each rank also reports, per optimiser update, which buckets each micro-batch's
backward all-reduced. --sync_every_micro_batch restores the all-reduce in every backward (the behaviour
before accumulation without sync), for comparison; --save_weights writes the final policy to rank{r}.pt.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from owner_rewards import CountingRuleReward  # tests/ is this script's directory

from lightning_grpo.checkpointing import StepCheckpoint
from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.owner import SharedReward
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler

ALLREDUCED: list[int] = []  # index of every gradient bucket this rank all-reduced, in order


def counting_allreduce(state, bucket):
    """DDP's own all-reduce (average over ranks), recording the bucket."""
    ALLREDUCED.append(bucket.index())
    return default_hooks.allreduce_hook(state, bucket)


class CountedPolicy(GRPOPolicy):
    """Records, per optimiser update, the buckets each micro-batch's backward all-reduced."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.updates: list[list[list[int]]] = []
        self._backwards: list[list[int]] = []

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # Lightning registers DDPStrategy(ddp_comm_hook=...) on CUDA only; gloo runs hooks as well
        self.trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def manual_backward(self, loss, *args, **kwargs) -> None:
        before = len(ALLREDUCED)
        super().manual_backward(loss, *args, **kwargs)
        self._backwards.append(ALLREDUCED[before:])

    def _update(self, opt, final: bool) -> None:
        self.updates.append(self._backwards)
        self._backwards = []
        super()._update(opt, final)


class SyncEveryMicroBatch(CountedPolicy):
    def _gradient_sync(self, sync: bool):
        return nullcontext()


class UnevenRandomness(L.Callback):
    """Rank r draws r + 1 extra random numbers per step, as ranks whose completions stop at different
    lengths do: their RNG streams drift apart, which a resume has to restore per rank."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.rand(trainer.global_rank + 1)


class KillOwner(L.Callback):
    """Rank 0 SIGKILLs the reward owner at the start of step `at`; a barrier keeps rank 1 from scoring before."""

    def __init__(self, reward, at: int) -> None:
        self.reward, self.at = reward, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            if trainer.global_rank == 0:
                os.kill(self.reward.owner["pid"], signal.SIGKILL)
            torch.distributed.barrier()


class FailsOnRank1(RuleReward):
    """Raises on rank 1 from its `at`-th score call on (a model crashing on one rank's samples)."""

    def __init__(self, at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at, self.calls = at, 0

    def score(self, samples):
        self.calls += 1
        if torch.distributed.get_rank() == 1 and self.calls > self.at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (rank 1's reward)")
        return super().score(samples)


class GeneratorFailsOnRank1(HFSampler):
    """Raises on rank 1 from training rollout `at` on (a generator crashing on one rank)."""

    def __init__(self, at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at = at

    def stream(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
        if torch.distributed.get_rank() == 1 and step >= self.at:
            raise RuntimeError("CUDA error: out of memory (rank 1's generator)")
        yield from super().stream(model, prompts, n, stop_token_id, step, allowed_token_ids)


class ConstantOnRank1(RuleReward):
    """The rule reward; on rank 1, 0.5 for every sample of a prompt of even length (a group without spread)."""

    def score(self, samples):
        result = super().score(samples)
        if torch.distributed.get_rank() == 1:
            for i, s in enumerate(samples):
                if len(s.text) % 2 == 0:
                    result.rewards[i] = 0.5
        return result


class Record(L.Callback):
    def __init__(self, out: Path, save_weights: bool) -> None:
        self.out, self.steps, self.save_weights = out, [], save_weights

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = batch["rollout"]
        self.steps.append({
            "step": trainer.global_step,
            "texts": batch["text"],
            "rewards": r.rewards.tolist(),
            "raw_rewards": r.reward_result.rewards.tolist(),  # the reward's, before the truncation policy
            "reasons": r.reward_result.reasons,
            "metrics": {k: v.tolist() for k, v in r.reward_result.metrics.items()},
            "completions": [list(map(int, ids)) for ids in r.completion_ids],
            "trained_texts": r.texts[:: r.group_size],
            "counts": next(c for c in trainer.callbacks if isinstance(c, GRPORollout)).step_counts,
            "logged_rollout": {k: float(v) for k, v in trainer.callback_metrics.items()
                               if k.startswith(("train/dynamic", "train/frac_", "train/samples_generated"))},
            "logged_reward_mean": float(trainer.callback_metrics["train/reward_mean"]),
            "staleness": r.sampler_metrics.get("rollout/staleness"),
            "timings": dict(r.timings),  # this rank's own
            "logged_timings": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("timing/", "perf/"))},
        })

    def on_train_end(self, trainer, pl_module):
        checksum = sum(float(p.double().sum()) for p in pl_module.policy.parameters())
        grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "steps": self.steps, "checksum": checksum, "world": trainer.world_size, "updates": pl_module.updates,
            # after the last update the gradients are zeros that are still views into DDP's buckets
            "grads_after_training": {"count": len(grads), "nonzero": sum(int(g.count_nonzero()) for g in grads),
                                     "storages": len({g.untyped_storage().data_ptr() for g in grads})},
        }))
        if self.save_weights:
            torch.save(pl_module.policy.state_dict(), self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--max_steps", type=int, default=2)
    p.add_argument("--max_train_samples", type=int)
    p.add_argument("--ckpt_dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--num_iterations", type=int, default=1)
    p.add_argument("--sync_every_micro_batch", action="store_true")
    p.add_argument("--save_weights", action="store_true")
    p.add_argument("--shared_reward", action="store_true")
    p.add_argument("--kill_owner_at", type=int)
    p.add_argument("--no_overlap", action="store_true")
    p.add_argument("--fail_rank1_at", type=int)
    p.add_argument("--dynamic", action="store_true")
    p.add_argument("--async_steps", type=int, default=0)
    p.add_argument("--fail_generator_rank1_at", type=int)
    args = p.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    out_dir = Path(args.out)
    reward = RuleReward(codes_per_char=0.3, band=(0, 16))
    if args.shared_reward:
        reward = SharedReward(functools.partial(CountingRuleReward, str(out_dir), codes_per_char=0.3, band=(0, 16)),
                              max_wait_ms=300, max_retries=2, backoff_s=0.5, log_dir=str(out_dir / "owner"))
    if args.fail_rank1_at is not None:
        reward = FailsOnRank1(args.fail_rank1_at, codes_per_char=0.3, band=(0, 16))
    if args.dynamic:
        reward = ConstantOnRank1(codes_per_char=0.3, band=(0, 16))
    sampler = HFSampler(max_new_tokens=8, prompts_per_chunk=1 if args.shared_reward else 0)
    if args.fail_generator_rank1_at is not None:
        sampler = GeneratorFailsOnRank1(args.fail_generator_rank1_at, max_new_tokens=8)
    cb = GRPORollout(sampler, reward, group_size=4, overlap_reward=not args.no_overlap,
                     dynamic_sampling=args.dynamic, max_extra_rounds=3,
                     truncation="keep" if args.dynamic else "penalize",  # keep: rank 0's groups all have spread
                     async_steps=args.async_steps)
    callbacks = [cb, Record(out_dir, args.save_weights), UnevenRandomness()]
    if args.kill_owner_at is not None:
        callbacks.insert(0, KillOwner(reward, args.kill_owner_at))
    if args.ckpt_dir:
        callbacks.append(StepCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=1))
    strategy = DDPStrategy(gradient_as_bucket_view=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=args.max_steps, logger=False,
        enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )
    policy_cls = SyncEveryMicroBatch if args.sync_every_micro_batch else CountedPolicy
    try:
        trainer.fit(
            # 8 rows per rank in micro-batches of 3: 3 backwards per update, the last one shorter
            policy_cls(learning_rate=1e-2, micro_batch_size=3, num_iterations=args.num_iterations),
            PromptDataModule(prompts_per_step=4, val_data=None, max_train_samples=args.max_train_samples),
            ckpt_path="last" if args.resume else None,
        )
    except RuntimeError as e:
        if args.kill_owner_at is None and args.fail_rank1_at is None and args.fail_generator_rank1_at is None:
            raise
        (out_dir / f"rank{trainer.global_rank}_error.txt").write_text(str(e))
        if trainer.global_rank == 0:  # the launcher: wait for rank 1 (its child) to stop on its own error
            deadline = time.monotonic() + 120
            while not (out_dir / "rank1_error.txt").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        os._exit(0)  # no collective cleanup: each rank stopped on its own error


if __name__ == "__main__":
    main()
