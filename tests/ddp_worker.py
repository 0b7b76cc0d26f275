"""Run by test_ddp.py: a 2-process CPU (gloo) DDP fit that writes what each rank saw to JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.steps = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = batch["rollout"]
        self.steps.append({
            "texts": batch["text"],
            "rewards": r.rewards.tolist(),
            "logged_reward_mean": float(trainer.callback_metrics["train/reward_mean"]),
        })

    def on_train_end(self, trainer, pl_module):
        checksum = sum(float(p.double().sum()) for p in pl_module.policy.parameters())
        (self.out / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"steps": self.steps, "checksum": checksum, "world": trainer.world_size})
        )


def main(out: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    out_dir = Path(out)
    cb = GRPORollout(HFSampler(max_new_tokens=8), RuleReward(codes_per_char=0.3, band=(0, 16)), group_size=4)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[cb, Record(out_dir)],
    )
    trainer.fit(GRPOPolicy(learning_rate=1e-2, micro_batch_size=4), PromptDataModule(prompts_per_step=4, val_data=None))


if __name__ == "__main__":
    main(sys.argv[1])
