"""`python -m lightning_grpo export`: a training checkpoint -> an HF model directory (weights + tokenizer).

The directory is what LLaSA's own inference code loads: `AutoTokenizer.from_pretrained(dir)` and
`AutoModelForCausalLM.from_pretrained(dir)`, then the usual chat-template prompt and `generate` with
`<|SPEECH_GENERATION_END|>` as eos. It is also a valid `--model.model_name_or_path` for more training
and for `evaluate --ckpt_path <dir>`.

    python -m lightning_grpo export --ckpt_path runs/llasa1b_original/.../last.ckpt --out runs/export/llasa1b-grpo

A run under ModelParallelStrategy (FSDP2) checkpoints a directory of shards (`last.ckpt/`, checkpointing.py);
export reads it in one process, without a process group, into the full model (torch.distributed.checkpoint):

    python -m lightning_grpo export --ckpt_path runs/llasa3b_fsdp/checkpoints/last.ckpt --out runs/export/llasa3b-grpo

Only the policy is exported; the frozen reference never enters checkpoints (it is the pretrained
model, reloaded from `model_name_or_path`). The tokenizer is the one the policy was trained with.

A LoRA run's checkpoint (`--model.lora`) holds the adapters only; export reloads the base from the run's
`model_name_or_path` and writes either the merged model (`--lora_export merged`, the default: a plain HF
directory as above) or the adapter alone (`--lora_export adapter`: peft's adapter_config.json and
adapter_model.safetensors plus the tokenizer; load it with `PeftModel.from_pretrained(base, DIR)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from .checkpointing import SHARDED_METADATA, checkpoint_problem, is_sharded_checkpoint
from .lora import export_lora
from .policy import GRPOPolicy


def checkpoint_meta(ckpt_path: str) -> dict:
    """The checkpoint's dict without loading its tensors into memory (global_step, epoch, hyper_parameters, ...):
    a .ckpt file memory-mapped, or a sharded directory's meta.pt (its weights are in the shards)."""
    path = Path(ckpt_path)
    if is_sharded_checkpoint(path):
        return torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # mmap: no second copy in RAM


def check_checkpoint(ckpt_path: str) -> dict:
    """`checkpoint_meta` of a checkpoint `fit` wrote; anything else is an error naming --ckpt_path and what it is
    instead of torch's unpickling message."""
    fix = "pass a checkpoint fit wrote (e.g. checkpoints/last.ckpt)"
    problem = checkpoint_problem(ckpt_path)
    if problem == "no such file":
        raise FileNotFoundError(f"--ckpt_path={ckpt_path}: no such file or directory; {fix}")
    if problem is not None:
        raise ValueError(f"--ckpt_path={ckpt_path} is {problem}; {fix}")
    try:
        meta = checkpoint_meta(ckpt_path)
    except Exception as e:
        raise ValueError(f"--ckpt_path={ckpt_path} does not load as a checkpoint ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(meta, dict) or "hyper_parameters" not in meta:
        got = f"a dict of {sorted(meta)[:5]}" if isinstance(meta, dict) else f"a {type(meta).__name__}"
        raise ValueError(f"--ckpt_path={ckpt_path} holds {got}, not a Lightning checkpoint of GRPOPolicy; {fix}")
    return meta


def load_policy(ckpt_path: str, map_location: str = "cpu") -> GRPOPolicy:
    """The GRPOPolicy of a Lightning checkpoint (a .ckpt file, or a sharded directory written under
    ModelParallelStrategy), without building the KL reference, in one process."""
    path = Path(ckpt_path)
    # beta=0 skips the reference copy: exporting needs the policy only; the weights are built here, not on rank 0
    overrides = {"beta": 0.0, "load_on_rank0": False}
    if path.is_file() or not path.exists():
        check_checkpoint(ckpt_path)
    if path.is_file():
        return GRPOPolicy.load_from_checkpoint(ckpt_path, map_location=map_location, **overrides)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"--ckpt_path={ckpt_path} is neither a .ckpt file nor a sharded checkpoint directory (one with "
            f"{SHARDED_METADATA}); pass what fit wrote (e.g. checkpoints/last.ckpt)"
        )
    import torch.distributed.checkpoint as dcp

    # a run launched by the CLI also records LightningCLI's `_instantiator`, which is no __init__ argument
    hparams = {k: v for k, v in checkpoint_meta(ckpt_path)["hyper_parameters"].items() if not k.startswith("_")}
    policy = GRPOPolicy(**{**hparams, **overrides})
    # the shards were saved as {"state_dict": LightningModule state dict, "optimizer_0": ...}: read the first only,
    # straight into the full tensors (no process group: DCP reads every rank's shards in this process)
    dcp.load({"state_dict": policy.state_dict()}, checkpoint_id=str(path))
    return policy.to(map_location)


def export(
    ckpt_path: str,
    out: str,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    lora_export: Literal["merged", "adapter"] = "merged",
) -> Path:
    """Write the policy of `ckpt_path` as an HF directory `out`; returns the directory.

    Args:
        ckpt_path: a checkpoint written by `fit` (ModelCheckpoint, e.g. `last.ckpt`).
        out: the output directory (created; existing files are overwritten).
        dtype: cast the weights before saving (bfloat16 halves the size); None keeps the training dtype.
        lora_export: for a LoRA run, `merged` (base + adapters, a plain HF model) or `adapter` (peft's files only).
    """
    policy = load_policy(ckpt_path)
    model = policy.policy
    lora = policy.hparams.get("lora")
    if lora is None and lora_export == "adapter":
        raise ValueError(f"--lora_export=adapter: {ckpt_path} is a full fine-tuning checkpoint (no --model.lora), "
                         "which has no adapter; export it without --lora_export")
    if dtype is not None and lora is None:
        model = model.to(getattr(torch, dtype))
    # training turns the KV cache off and may enable checkpointing; inference wants the cache
    model.config.use_cache = True
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    if lora is not None:
        model = export_lora(model, target, lora_export, policy.hparams.model_name_or_path,
                            None if dtype is None else getattr(torch, dtype))
    else:
        model.save_pretrained(target)
    policy.tokenizer.save_pretrained(target)
    checkpoint = checkpoint_meta(ckpt_path)
    provenance = {
        "ckpt_path": str(ckpt_path),
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "base_model": policy.hparams.model_name_or_path,
        "hyper_parameters": {k: v for k, v in policy.hparams.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    if lora is not None:
        provenance["lora"] = {**lora, "export": lora_export}
    (target / "lightning_grpo_export.json").write_text(json.dumps(provenance, indent=2))
    print(f"exported {ckpt_path} (step {provenance['global_step']}) to {target}")
    return target


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_grpo export", description=__doc__.split("\n\n")[0])
    parser.add_function_arguments(export)
    cfg = parser.parse_args(argv)
    export(**{k: v for k, v in vars(cfg).items() if k != "config"})
