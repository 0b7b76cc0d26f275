"""Run by test_ddp.py: a 2-process CPU (gloo) DDP fit that writes what each rank saw to JSON.

    python tests/ddp_worker.py OUT [--max_steps N] [--max_train_samples N] [--ckpt_dir DIR] [--resume]
--ckpt_dir saves a checkpoint every step there; --resume continues from its last.ckpt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch

from lightning_grpo.checkpointing import StepCheckpoint
from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler


class UnevenRandomness(L.Callback):
    """Rank r draws r + 1 extra random numbers per step, as ranks whose completions stop at different
    lengths do: their RNG streams drift apart, which a resume has to restore per rank."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.rand(trainer.global_rank + 1)


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.steps = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = batch["rollout"]
        self.steps.append({
            "step": trainer.global_step,
            "texts": batch["text"],
            "rewards": r.rewards.tolist(),
            "completions": [list(map(int, ids)) for ids in r.completion_ids],
            "logged_reward_mean": float(trainer.callback_metrics["train/reward_mean"]),
        })

    def on_train_end(self, trainer, pl_module):
        checksum = sum(float(p.double().sum()) for p in pl_module.policy.parameters())
        (self.out / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"steps": self.steps, "checksum": checksum, "world": trainer.world_size})
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--max_steps", type=int, default=2)
    p.add_argument("--max_train_samples", type=int)
    p.add_argument("--ckpt_dir")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    out_dir = Path(args.out)
    cb = GRPORollout(HFSampler(max_new_tokens=8), RuleReward(codes_per_char=0.3, band=(0, 16)), group_size=4)
    callbacks = [cb, Record(out_dir), UnevenRandomness()]
    if args.ckpt_dir:
        callbacks.append(StepCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=1))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=args.max_steps, logger=False,
        enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(
        GRPOPolicy(learning_rate=1e-2, micro_batch_size=4),
        PromptDataModule(prompts_per_step=4, val_data=None, max_train_samples=args.max_train_samples),
        ckpt_path="last" if args.resume else None,
    )


if __name__ == "__main__":
    main()
