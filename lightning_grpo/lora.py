"""LoRA for the policy (`--model.lora`, peft): low-rank adapters train, the base model stays frozen.

What changes against full fine-tuning, and why:
- Only the adapters (and, with `train_embeddings`, trainable copies of the embedding and LM head)
  require grad, so the optimizer, the gradients and DDP's all-reduce hold only them: for LLaSA-8B at
  rank 16 on the seven projections, 42M parameters instead of 8.57B (BENCHMARKS.md, "LoRA: memory").
- The frozen base may be loaded in bf16 (`--model.dtype bfloat16`): it never takes an AdamW step, so
  bf16 cannot stall learning; the adapters are created in fp32 whatever the base dtype.
- The KL reference (beta > 0) is the base model itself with the adapters switched off
  (`adapters_disabled`, peft's `disable_adapter()`): no second copy of the weights.
- vLLM receives merged weights, W + (alpha / rank) * B @ A, computed one layer at a time
  (`merged_weights`) under the base model's HF names, so the engine runs its ordinary dense kernels
  and the existing sync check (engine vs policy log-probs) proves the sync as for full fine-tuning.
  vLLM's own LoRA path was not used: it loads adapters from disk only (a file per sync), rejects
  `modules_to_save` other than classifier heads (no trained embeddings), and adds its LoRA kernels to
  every decode step, while a merged sync costs one (out x in) matmul per layer. A sync's extra memory is
  one layer's delta in fp32 and its merged weight (LLaSA-8B's MLP: 235 + 117 MB), as the engine consumes
  the tensors one by one (`VLLMEngine.load_weights` streams them in process). What that gives up: a
  bf16 engine stores the merged weight rounded to bf16, as it stores a fully fine-tuned one, so a delta
  below half a bf16 step of W (0.2% of |W|) reaches the engine only once it has grown past it; vLLM's
  LoRA kernels would apply it unrounded. `--rollout.sampler.dtype float32` keeps it, at twice the
  engine's weight memory; the sync check and `importance_correction` see the difference either way.
- Checkpoints hold the trainable tensors and the optimizer state only; the frozen base is reloaded
  from `--model.model_name_or_path` on resume and its fingerprint (per tensor: float64 sum and sum of
  squares) must match the one saved, else the resume stops naming both models. An 8B checkpoint is
  then ~0.5 GB instead of ~100 GB.

`train_embeddings: true` trains full copies of the input embedding and the LM head (peft's
`modules_to_save`; one shared copy when they are tied, as in LLaSA-1B/3B): all 193,800 rows, in fp32
(so it needs `--model.dtype float32`), 16 bytes per row element with AdamW. The copies enter the
optimizer and the checkpoint, are synced to vLLM as `model.embed_tokens.weight` / `lm_head.weight`,
are written into a merged export, and travel inside an adapter export (peft restores them on load).
The KL reference keeps the original rows.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch

# The linear layers of a Llama decoder layer (LLaSA is a Llama): LoRA on all of them is the QLoRA-paper
# default and what TRL's and veRL's LoRA recipes use.
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"  # peft's adapter name; one adapter per policy
CHECKPOINT_KEY = "lora_base"  # what a LoRA checkpoint records about the base it left out


@dataclass
class LoRAConfig:
    """`--model.lora.*`: low-rank adapters on the policy (peft LoRA); the base model stays frozen.

    Args:
        rank: r, the adapters' inner dimension; trainable parameters grow linearly with it.
        alpha: the update is scaled by alpha / rank (peft's `lora_alpha`); alpha = 2 x rank is the common choice.
        dropout: dropout on the adapters' input in train mode. Keep 0 for GRPO: with dropout the trainer's
            log-probs are those of a random sub-network, and the ratio to the sampler's (or the old policy's)
            compares different functions (the policy switches every other dropout off for the same reason).
        target_modules: module names (last component) that get adapters: Llama's seven projections by default.
            `embed_tokens` puts a low-rank adapter on LLaSA's 193,800-row input table (merged like the others);
            `lm_head` is refused (the chunked log-prob head reads its weight matrix directly): see train_embeddings.
        train_embeddings: also train full copies of the input embedding and the LM head (all rows, fp32: needs
            --model.dtype float32; one copy when they are tied). False: LLaSA's 193,800-row tables stay frozen.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"--model.lora.rank={self.rank} must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"--model.lora.alpha={self.alpha} must be > 0 (the update is scaled by alpha / rank)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--model.lora.dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise ValueError(f"--model.lora.target_modules is empty; e.g. {list(LLAMA_PROJECTIONS)}")
        self.target_modules = list(self.target_modules)


def as_config(value: LoRAConfig | dict | None, reference_dtype: str | None = None) -> LoRAConfig | None:
    """The `lora` argument as a LoRAConfig (the CLI gives one, a checkpoint's hyper-parameters a dict), checked
    against the policy's other arguments."""
    if isinstance(value, dict):
        value = LoRAConfig(**value)
    elif value is not None and not isinstance(value, LoRAConfig):
        raise TypeError(f"--model.lora must be a mapping of {[f.name for f in dataclasses.fields(LoRAConfig)]} or null")
    if value is not None and reference_dtype is not None:
        raise ValueError(f"--model.reference_dtype={reference_dtype} has no effect with --model.lora: the KL reference "
                         "is the frozen base itself (adapters off), in --model.dtype; remove it")
    return value


def refuse_adapter_dir(path: Path, flag: str) -> None:
    """An adapter export is not a model: say what to pass instead of "no config.json"."""
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{flag}: {path.resolve()} holds a LoRA adapter alone (export --lora_export adapter), not a model; pass a "
            "merged export (--lora_export merged) or its base model, or resume the run from its .ckpt"
        )


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig) -> torch.nn.Module:
    """`model` (an HF causal LM) wrapped as a peft model with one adapter; only the adapters require grad.

    The base's weights are not copied (peft wraps its layers in place), so this adds only the adapters."""
    import peft

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    missing = sorted(set(cfg.target_modules) - present)
    if missing:
        raise ValueError(f"--model.lora.target_modules names {missing}, which the model does not have; "
                         f"its linear and embedding layers are {sorted(present)}")
    if "lm_head" in cfg.target_modules:
        raise ValueError(
            "--model.lora.target_modules names lm_head: the chunked log-prob head (grpo.token_logprobs) multiplies by the "
            "head's weight matrix directly, which would bypass a low-rank adapter on it; train the head with "
            "--model.lora.train_embeddings true instead"
        )
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    config = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        bias="none", task_type="CAUSAL_LM",
        modules_to_save=["embed_tokens", "lm_head"] if cfg.train_embeddings else None,
        # a tied head shares the trained embedding copy (LLaSA-1B/3B), as it shares the embedding today
        ensure_weight_tying=tied and cfg.train_embeddings,
    )
    # autocast_adapter_dtype: adapters in fp32 under a bf16 base
    return peft.get_peft_model(model, config, autocast_adapter_dtype=True)


def is_lora_model(model: torch.nn.Module) -> bool:
    """True for a peft-wrapped model (without importing peft: an unimported peft wrapped nothing)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The base model: `model` (a peft model) with every adapter and trained copy switched off."""
    with model.disable_adapter():
        yield model


def check_strategy(strategy) -> None:
    """LoRA runs on one device or under DDP (adapters replicated, base frozen on every rank); sharding the base
    (FSDP2's ModelParallelStrategy) with peft's wrappers is not built."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"--model.lora runs with a single device or DDP, not {type(strategy).__name__}: with LoRA the frozen base "
            "is the only large tensor (LLaSA-8B in bf16 fits one 48 GB GPU, BENCHMARKS.md); use --trainer.strategy "
            "ddp, or drop --model.lora to shard a full fine-tuning"
        )


# -- weights for vLLM and export ---------------------------------------------------------------------
@torch.no_grad()
def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the peft `model` with its adapters merged: what `merge_and_unload` would hold,
    without modifying `model` and one layer at a time.

    A LoRA layer yields `<name>.weight` = W + delta, delta = peft's own `get_delta_weight` (scale * B @ A),
    added exactly as peft's merge adds it (the delta cast to W's dtype), so a sync and a merged export are
    bit-identical. Only one layer's delta and merged weight exist at a time, if the consumer does not keep
    them. A trained copy (`train_embeddings`) replaces its original; names are the base model's
    (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), never peft's `base_layer` / `lora_A` names.
    Tied weights come out under both names, as `state_dict()` gives them.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    def walk(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            active = [] if module.disable_adapters or module.merged else [a for a in module.active_adapters if a in module.scaling]
            if any(a in module.lora_variant for a in active):
                raise NotImplementedError(f"{prefix[:-1]}: LoRA variants (DoRA, ...) are not merged here; use plain LoRA")
            for name, p in base.named_parameters(recurse=False):
                t = p.detach()
                for adapter in active if name == "weight" else ():
                    t = t + module.get_delta_weight(adapter).to(t.dtype)  # peft's merge, not in place
                yield prefix + name, t
            return
        if isinstance(module, ModulesToSaveWrapper):
            on = not module.disable_adapters and module.active_adapters
            yield from walk(module.modules_to_save[module.active_adapters[0]] if on else module.original_module, prefix)
            return
        for name, p in module.named_parameters(recurse=False):
            yield prefix + name, p.detach()
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:  # what state_dict() holds
                yield prefix + name, b.detach()
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    yield from walk(model.get_base_model(), "")


def export_lora(model: torch.nn.Module, out: Path, mode: Literal["merged", "adapter"], base_model: str,
                dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Write the peft `model` to `out`: a plain HF model with the adapters merged, or the adapter alone
    (peft's adapter_config.json + adapter_model.safetensors, loadable with `PeftModel.from_pretrained(base, out)`).
    Returns what was saved. `model` is consumed (merging happens in place)."""
    if mode == "merged":
        merged = model.merge_and_unload()  # peft's merge: W += delta, the same sum merged_weights yields
        if dtype is not None:
            merged = merged.to(dtype)
        merged.save_pretrained(out)
        return merged
    if mode != "adapter":
        raise ValueError(f"--lora_export={mode!r} must be merged or adapter")
    if dtype is not None:
        model = model.to(dtype)
    model.peft_config[ADAPTER].base_model_name_or_path = base_model
    model.peft_config[ADAPTER].inference_mode = True
    # save_embedding_layers=False: "auto" would ask the hub for the base's config; trained embedding copies
    # (train_embeddings) are modules_to_save and are saved with the adapter anyway
    model.save_pretrained(out, save_embedding_layers=False)
    return model


# -- checkpoints: trainable tensors only --------------------------------------------------------------
def frozen_keys(module: torch.nn.Module) -> list[str]:
    """State-dict keys of `module`'s frozen parameters (tied ones under every name)."""
    return [name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]


def fingerprint(module: torch.nn.Module, keys: list[str]) -> dict[str, list[float]]:
    """Per frozen tensor: [float64 sum, float64 sum of squares]: equal bases give equal numbers (up to the
    order of the reduction on another device), any other base differs in some tensor at O(1). Reduced in
    chunks of 2^24 elements, so the float64 temporaries stay at 128 MB whatever the tensor."""
    params = dict(module.named_parameters(remove_duplicate=False))
    out = {}
    for k in keys:
        total = squares = 0.0
        for part in params[k].detach().reshape(-1).split(2**24):
            part = part.double()
            total += part.sum().item()
            squares += part.square().sum().item()
        out[k] = [total, squares]
    return out


def on_save_checkpoint(module, checkpoint: dict) -> None:
    """GRPOPolicy's hook: a LoRA policy's checkpoint leaves the frozen base out."""
    if module.hparams.get("lora") is not None:
        strip_frozen(module, checkpoint)


def on_load_checkpoint(module, checkpoint: dict) -> None:
    """GRPOPolicy's hook: a LoRA checkpoint gets the reloaded base back; the two kinds never load into each other."""
    if module.hparams.get("lora") is not None:
        restore_frozen(module, checkpoint)
    elif CHECKPOINT_KEY in checkpoint:
        raise ValueError("this checkpoint holds LoRA adapters only (a run with --model.lora); resume it with the same "
                         f"--model.lora settings ({checkpoint.get('hyper_parameters', {}).get('lora')})")


def strip_frozen(module, checkpoint: dict) -> None:
    """Drop the frozen base from a checkpoint being saved; record its fingerprint in its place."""
    keys = frozen_keys(module)
    if getattr(module, "_lora_fingerprint", None) is None:  # the base is frozen: computed once per process
        module._lora_fingerprint = fingerprint(module, keys)
    state = checkpoint["state_dict"]
    for k in keys:
        state.pop(k, None)
    hp = module.hparams
    checkpoint[CHECKPOINT_KEY] = {"model_name_or_path": hp.model_name_or_path, "dtype": hp.dtype,
                                  "fingerprint": module._lora_fingerprint}


def restore_frozen(module, checkpoint: dict) -> None:
    """Put this process's base weights into a LoRA checkpoint being loaded, after checking that they are the
    base the checkpoint was trained on; strict loading then checks every other key."""
    hp = module.hparams
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None:
        raise ValueError(
            "this checkpoint was written without --model.lora (it holds a fully fine-tuned policy), but the policy "
            "has --model.lora set: resume it without --model.lora, or `python -m lightning_grpo export` it and start "
            "a LoRA run from the exported directory (--model.model_name_or_path)"
        )
    keys = frozen_keys(module)
    if set(saved["fingerprint"]) != set(keys):
        raise ValueError(
            f"the checkpoint's LoRA layout differs from --model.lora={dataclasses.asdict(as_config(hp.lora))}: its frozen "
            f"base has {len(saved['fingerprint'])} tensors, this policy's {len(keys)}; resume with the run's "
            f"--model.lora settings (its hyper_parameters hold them)"
        )
    now = fingerprint(module, keys)
    params = dict(module.named_parameters(remove_duplicate=False))
    for k in keys:
        (s0, q0), (s1, q1) = saved["fingerprint"][k], now[k]
        numel = params[k].numel()
        if abs(q0 - q1) > 1e-6 * max(q0, 1e-30) or abs(s0 - s1) > 1e-6 * math.sqrt(numel * max(q0, 1e-30)):
            raise ValueError(
                f"the frozen base weights differ from the ones this LoRA checkpoint was trained on (first at {k}): "
                f"the checkpoint's base was --model.model_name_or_path={saved['model_name_or_path']} "
                f"--model.dtype={saved['dtype']}, this run loads {hp.model_name_or_path} in {hp.dtype}. A LoRA "
                "checkpoint holds the adapters only; resume with the same base model and dtype"
            )
    module._lora_fingerprint = now
    state = checkpoint["state_dict"]
    for k in keys:
        state[k] = params[k].detach()  # what module.state_dict() holds under k
