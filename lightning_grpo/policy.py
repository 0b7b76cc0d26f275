"""The policy LightningModule: a trainable LLaSA policy, a frozen reference, and the GRPO update.

`training_step` receives a batch that the rollout callback has already sampled and scored
(`batch["rollout"]`). It computes group advantages, then runs `num_iterations` optimiser updates
over the rollout in micro-batches (manual optimisation), with the clipped surrogate, an optional KL
to the reference, and one explicit loss aggregation. All math is in `grpo.py`. The objective is one
choice (`--model.objective token|gspo|cispo`); the logged token means (`train/entropy`, `train/kl`,
`train/clip_fraction`, ...) are means over every completion token of the step on all ranks together.

A trainer step is one rollout: only a rollout's last update advances `trainer.global_step`, so
`max_steps`, `val_check_interval`, checkpoints, the LR schedule and the logger count rollouts.
Under DDP the micro-batches accumulate without communication and each update all-reduces the
gradient once; under ModelParallelStrategy the policy and the reference are sharded with FSDP2
(`configure_model`, sharding.py). Weights train in fp32 (use `--trainer.precision bf16-mixed` for
bf16 matmuls); gradients are released right after each update, so a colocated vLLM engine has the
memory during the next rollout (BENCHMARKS.md, memory budget).

The reference is loaded once, kept out of the optimiser, the checkpoint and DDP, and is not even
loaded when `beta == 0` (the original recipe ran without KL). With `--model.lora` (lora.py) only
adapters train and the reference is the base model with its adapters switched off: no copy at all.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer, do_nothing_closure
from lightning.pytorch.strategies import ModelParallelStrategy, ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from . import grpo, lora as lora_lib, sharding, timing
from .batch import Rollout
from .distributed import concat_from_ranks, gather_by_name, sum_over_ranks
from .preference_step import PreferenceObjective

BUILTIN_TINY = "builtin:tiny-llasa"


MODEL_SOURCES = (
    "a local HF directory (config.json, weights, tokenizer files), e.g. what "
    "`python -m lightning_grpo export --ckpt_path ... --out DIR` or the small world's "
    "`python examples/small_world/warm_start.py --out DIR` writes; "
    "a Hugging Face hub id such as HKUSTAudio/Llasa-1B; or builtin:tiny-llasa"
)


def _looks_like_hub_id(name: str) -> bool:
    """`owner/name` or `name` as the hub spells repo ids (no other path separators, no ./~ prefix)."""
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith((".", "~", "-")) and
                                        all(c.isalnum() or c in "-_." for c in p) for p in parts)


def load_model_and_tokenizer(model_name_or_path: str, dtype: str = "float32", attn_implementation: str | None = "sdpa",
                             meta: bool = False):
    """(model, tokenizer) from a HF id (e.g. HKUSTAudio/Llasa-1B), a local dir, or `builtin:tiny-llasa`.
    meta: build the model from its config on the meta device, without weights (sharding.load_from_rank0 fills it)."""
    torch_dtype = getattr(torch, dtype)
    if model_name_or_path == BUILTIN_TINY:
        from .tiny import build_tiny_llasa

        with torch.device("meta") if meta else nullcontext():
            model, tokenizer = build_tiny_llasa()
        return model.to(torch_dtype), tokenizer
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    flag = f"--model.model_name_or_path={model_name_or_path}"
    local = Path(model_name_or_path).expanduser()
    if local.is_dir():
        lora_lib.refuse_adapter_dir(local, flag)
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{flag}: the directory {local.resolve()} has no config.json; expected {MODEL_SOURCES}")
    elif local.exists():
        raise ValueError(
            f"{flag} is a file, not a directory (a Lightning .ckpt goes to --ckpt_path, or `python -m lightning_grpo "
            f"export` makes a directory of it); expected {MODEL_SOURCES}"
        )
    elif not _looks_like_hub_id(model_name_or_path):
        raise FileNotFoundError(
            f"{flag}: no such directory ({local.resolve()}) and not a hub id (owner/name); expected {MODEL_SOURCES}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        kwargs = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_name_or_path), **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
    except OSError as err:
        if local.is_dir():
            raise
        raise FileNotFoundError(
            f"{flag}: no directory {local.resolve()}, and the hub did not give a model {model_name_or_path!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0]}); expected {MODEL_SOURCES}"
        ) from err
    return model, tokenizer


def fetch_weights(model_name_or_path: str) -> None:
    """Download a hub id's weights, configs and tokenizer into the Hugging Face cache (nothing for a local directory,
    the builtin model, or files already cached): what `load_model_and_tokenizer` then reads without waiting."""
    from pathlib import Path

    if model_name_or_path == BUILTIN_TINY or Path(model_name_or_path).expanduser().exists():
        return
    from huggingface_hub import snapshot_download

    snapshot_download(model_name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])


def low_precision_training_error(what: str, dtype: str, learning_rate: float) -> ValueError:
    """The error for trainable weights below fp32, which AdamW cannot move at RL learning rates."""
    return ValueError(
        f"{what} would train {dtype} weights, and those silently stop learning: an AdamW update is about "
        f"the learning rate ({learning_rate:g}) per weight, while {dtype} keeps so few significant bits that a "
        "weight of 0.02 moves in steps of 1.2e-4 (bf16) or 1.5e-5 (fp16): most updates round to no change. Keep "
        "--model.dtype float32 and set --trainer.precision bf16-mixed (fp32 master weights, bf16 matmuls); "
        "--model.reference_dtype bfloat16 halves the frozen KL reference."
    )


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """An eval-mode, grad-free copy of `model` with its parameters in `dtype`, cast one parameter at a
    time (a bf16 copy of an fp32 model never holds a second fp32 copy). Buffers keep their dtype, as
    `from_pretrained(dtype=...)` keeps Llama's fp32 rotary frequencies; tied weights stay tied."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


class GRPOPolicy(PreferenceObjective, L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str = BUILTIN_TINY,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        reference_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        attn_implementation: str | None = "sdpa",
        lora: lora_lib.LoRAConfig | None = None,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        max_grad_norm: float | None = 1.0,
        beta: float = 0.0,
        kl_estimator: grpo.KLEstimator = "k3",
        objective: grpo.Objective | Literal["dpo"] = "token",
        epsilon_low: float | None = None,
        epsilon_high: float | None = None,
        dual_clip: float | None = 3.0,
        loss_aggregation: grpo.LossAggregation = "token-mean",
        scale_rewards: grpo.RewardScale = "group",
        num_iterations: int = 1,
        micro_batch_size: int = 4,
        logprob_chunk_size: int = 512,
        gradient_checkpointing: bool = False,
        importance_correction: bool = False,
        importance_cap: float = 2.0,
        tf32: bool = True,
        load_on_rank0: bool = False,
        fsdp_offload: Literal["none", "cpu"] = "none",
        dpo_nll_weight: float = 0.0,
        dpo_cer_weight: float = 0.0,
    ) -> None:
        """
        Args:
            model_name_or_path: HF id (HKUSTAudio/Llasa-1B, -3B, -8B), a local HF dir, or
                `builtin:tiny-llasa` (a tiny random LLaSA built in code, for CPU runs and tests).
            dtype: weight dtype of the trained policy: float32. bfloat16/float16 weights are refused
                (they silently stop learning: AdamW updates of ~lr round away); for bf16 speed and
                activation memory keep float32 weights with `--trainer.precision bf16-mixed`.
            reference_dtype: weight dtype of the frozen KL reference (beta > 0); None = dtype.
                bfloat16 halves its memory; under bf16-mixed its matmuls run in bf16 either way, and
                its log-probs are computed in fp32 from the bf16 head.
            attn_implementation: `sdpa`, `eager`, `flash_attention_2` (GPU) or None for the default.
            lora: train low-rank adapters instead of the weights (`--model.lora.rank 16`; lightning_grpo/lora.py):
                the base stays frozen (and may be bfloat16), the KL reference is the base with the adapters
                off, vLLM gets merged weights, checkpoints hold the adapters. None: full fine-tuning.
            learning_rate: AdamW learning rate (the original: 1e-6).
            warmup_steps / lr_schedule: linear warm-up over warmup_steps rollouts, then constant or
                cosine to 0 at max_steps.
            max_grad_norm: clip the global gradient norm; None disables.
            beta: KL coefficient to the reference (the original: 0, i.e. no reference at all); under
                `--model.objective dpo` the DPO temperature (> 0; TRL's default 0.1; larger stays closer to the
                reference, which is then the round's starting model).
            kl_estimator: k1 (unbiased, noisy) or k3 (low variance, GRPO paper).
            objective: the policy-gradient objective (grpo.py). `token` (the original): PPO/GRPO's clipped
                ratio per token. `gspo` (GSPO, Zheng et al. 2025): one length-normalised ratio per sequence, clipped
                per sequence: more stable when token ratios are noisy; its paper aggregates with
                `--model.loss_aggregation seq-mean-token-mean` (token-mean weighs sequences by length). `cispo`
                (CISPO, MiniMax-M1 2025): the clipped ratio becomes a stop-gradient weight on log pi, so no token
                loses its gradient (rare tokens that PPO's clip silences keep learning). Where the ratio is 1
                (`num_iterations` 1, and the first update of more) all three give the same gradient: they differ
                from a rollout's second update on. `dpo`: a preference round (DPO, dpo.py) on pairs of
                `python -m lightning_grpo dpo fit` (PreferenceDataModule, preference_step.py): no rollout, one
                update per batch of pairs, the clip and num_iterations unused.
            epsilon_low / epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high] of the objective's ratio;
                None = its paper's: token 0.2 / 0.2 (DAPO raises epsilon_high to 0.28 to let unlikely good tokens
                grow), gspo 3e-4 / 4e-4 (a sequence ratio moves far less than a token's: 0.2 would hardly ever
                clip), cispo 1.0 / 4.0 (the weight in [0, 5]: no lower bound, ScaleRL's cap of 5).
            dual_clip: cap on the loss of negative-advantage tokens (the original: 3.0), of sequences under gspo;
                None off. Not used by cispo, whose weight is capped at 1 + epsilon_high for either sign.
            loss_aggregation: token-mean (the original, DAPO; the mean over every token of the step,
                all DDP ranks together), seq-mean-token-mean (GRPO paper),
                seq-mean-token-sum-norm (Dr.GRPO: no length bias, with scale_rewards=none).
            scale_rewards: divide centred rewards by the group std (GRPO), the batch std, or none.
            num_iterations: optimiser updates per rollout (PPO epochs); >1 uses the rollout's
                log-probs as the old policy, so the clip matters. A trainer step is still one
                rollout: `--trainer.max_steps`, `val_check_interval`, checkpoints
                (`every_n_train_steps`), warmup_steps / the cosine schedule (the LR changes once per
                rollout) and the logger's x-axis all count rollouts, whatever num_iterations is.
            micro_batch_size: rows per forward/backward; gradients accumulate over the rollout's
                micro-batches (under DDP without communication: one all-reduce per update).
            logprob_chunk_size: tokens per chunk of the LM head; peak logits memory is
                chunk x vocab x 4 bytes (512 x 65,537 = 134 MB for LLaSA's speech rows).
            gradient_checkpointing: recompute layer activations in backward (the original: on).
            importance_correction: weight each token's loss by min(pi_trainer / pi_sampler, cap)
                when the sampler reports its own log-probs (vLLM): corrects the off-policy drift
                between vLLM's and the trainer's numerics (TIS). Off by default, as in the original.
            importance_cap: the truncation cap of those weights (TIS uses 2).
            tf32: on CUDA, let fp32 matmuls use TF32 tensor cores (process-wide,
                `torch.set_float32_matmul_precision("high")`): HF generate, a reward model in this
                process (Whisper, the codec) and the fp32 parts of bf16-mixed. The log-prob head runs
                in full fp32 regardless. False sets "highest".
            load_on_rank0: under ModelParallelStrategy (FSDP2), build the policy and the reference on the meta
                device and let only rank 0 read the weights: it broadcasts them one tensor at a time and every
                rank keeps its shard. Otherwise every rank loads the whole fp32 model into CPU RAM before
                sharding it (4 bytes per parameter per rank: 34 GB per rank for LLaSA-8B). BENCHMARKS.md, FSDP2.
            fsdp_offload: under ModelParallelStrategy, `cpu` keeps the sharded fp32 weights and gradients, hence
                AdamW's state, in host RAM with FSDP2's own CPUOffloadPolicy (the reference's shards too): the GPU
                holds only the units being gathered, activations and vLLM, and AdamW steps on the CPU (torch's fused
                CPU kernel). Costs: host RAM of 16 bytes x parameters / GPUs per rank (LLaSA-8B on 2 GPUs: 68.5 GB,
                74 GB with the pinned allocator's rounding), half of it pinned; per micro-batch and rank, the fp32
                shards cross PCIe to the GPU for the forward and again for the backward, and the fp32 gradient shards
                back (use larger micro-batches: the GPU has the room); a CPU AdamW step of seconds rather than
                milliseconds (give each rank its cores: torchrun sets OMP_NUM_THREADS=1). Needs a process group with
                a CPU backend (`--trainer.strategy.init_args.process_group_backend cuda:nccl,cpu:gloo`). Use it when
                the sharded state does not fit the GPUs (LLaSA-8B on 2 x 80 GB: configs/llasa8b_fsdp_offload.yaml)
                and more GPUs are not at hand; `none` keeps everything on the GPUs. Not with LoRA. BENCHMARKS.md,
                FSDP2.
            dpo_nll_weight: (dpo) weight of the chosen samples' token-mean NLL added to the DPO loss (RPO; TRL's
                "sft" term): keeps the chosen samples likely while the rejected ones are pushed down. The mean is
                over the step's chosen tokens on all ranks, as on one process. 0: off.
            dpo_cer_weight: (dpo) weight of a second DPO term that orders each pair by the gate's CER, scaled by
                the CER gap (dpo.py): holds intelligibility where listeners chose the less intelligible sample.
                Needs chosen_cer / rejected_cer in the pairs file. 0: off.
        """
        super().__init__()
        # the checkpoint keeps these; the logger gets the whole run config from the CLI (cli.py)
        self.save_hyperparameters(logger=False)
        if num_iterations < 1:
            raise ValueError(f"--model.num_iterations={num_iterations} must be >= 1")
        if micro_batch_size < 1 or logprob_chunk_size < 1:
            raise ValueError("--model.micro_batch_size and --model.logprob_chunk_size must be >= 1")
        if beta < 0:
            raise ValueError(f"--model.beta={beta} must be >= 0")
        self.clip_range = (0.0, 0.0) if objective == "dpo" else self._clip_range(objective, epsilon_low, epsilon_high,
                                                                                 num_iterations)
        lora = lora_lib.as_config(lora, reference_dtype)
        if fsdp_offload != "none" and lora is not None:
            raise ValueError(
                f"--model.fsdp_offload={fsdp_offload} offloads FSDP2's shards, and --model.lora runs without FSDP2 "
                "(single device or DDP: the adapters and their AdamW state are small): drop --model.fsdp_offload"
            )
        self.hparams["lora"] = None if lora is None else dataclasses.asdict(lora)  # plain data in checkpoints
        if dtype != "float32" and (lora is None or lora.train_embeddings):
            # a LoRA base is frozen (no AdamW step to lose), unless its embedding copies train
            what = f"--model.dtype={dtype}" + (" with --model.lora.train_embeddings" if lora else "")
            raise low_precision_training_error(what, dtype, learning_rate)
        self.automatic_optimization = False
        self.policy, self.tokenizer = load_model_and_tokenizer(model_name_or_path, dtype, attn_implementation, load_on_rank0)
        # from_pretrained returns eval mode, and HF only checkpoints layers in train mode; dropout is
        # switched off instead, as peers do for RL: the ratio must compare the same function.
        self.policy.train()
        for module in self.policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "attention_dropout"):  # Llama's attention copies the config value when built
                module.attention_dropout = 0.0
        if hasattr(self.policy.config, "attention_dropout"):
            self.policy.config.attention_dropout = 0.0
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy.config.use_cache = False
        if lora is not None:
            self.policy = lora_lib.apply_lora(self.policy, lora)
        reference = None
        if beta > 0 and lora is None:
            reference = frozen_copy(self.policy, getattr(torch, reference_dtype or dtype))
        # Not an attribute nn.Module registers: the reference stays out of the optimiser, the
        # checkpoint (it is the pretrained weights, reloaded on resume) and DDP's gradient sync.
        self.__dict__["reference"] = reference
        self._grads_in_buckets = False  # DDP with gradient_as_bucket_view: see _update
        self._grad_norm: torch.Tensor | None = None

    @staticmethod
    def _clip_range(objective: str, low: float | None, high: float | None, num_iterations: int) -> tuple[float, float]:
        """(epsilon_low, epsilon_high) for `objective`, unset ones from its paper (grpo.CLIP_DEFAULTS); warns where the
        choice cannot do what its name says."""
        if objective not in grpo.CLIP_DEFAULTS:
            raise ValueError(f"--model.objective={objective!r} is not one of {', '.join(grpo.CLIP_DEFAULTS)}")
        default_low, default_high = grpo.CLIP_DEFAULTS[objective]
        low, high = default_low if low is None else low, default_high if high is None else high
        for flag, value in (("epsilon_low", low), ("epsilon_high", high)):
            if not value >= 0:
                raise ValueError(f"--model.{flag}={value} must be >= 0 (or null for --model.objective {objective}'s "
                                 f"default {grpo.CLIP_DEFAULTS[objective]})")
        if objective == "gspo" and max(low, high) >= 0.05:
            rank_zero_warn(
                f"--model.objective gspo clips the sequence ratio, a geometric mean of token ratios, at [1 - {low:g}, "
                f"1 + {high:g}]: at that width it hardly ever clips. The GSPO paper uses 3e-4 / 4e-4, which "
                "--model.epsilon_low null --model.epsilon_high null select"
            )
        if objective != "token" and num_iterations == 1:
            rank_zero_warn(
                f"--model.objective {objective} with --model.num_iterations 1: every update is on-policy (ratio 1), "
                "where gspo and cispo give the token objective's gradient; they differ from a rollout's second "
                "update on (--model.num_iterations 2 or more)"
            )
        return low, high

    # -- setup -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.hparams.lora is not None:
            lora_lib.check_strategy(self.trainer.strategy)
        if self.hparams.objective == "dpo":
            self.check_preference_setup()
        if self.trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision("high" if self.hparams.tf32 else "highest")

    def configure_model(self) -> None:
        """Under ModelParallelStrategy: shard the policy and the reference with FSDP2, and with load_on_rank0 load
        them from rank 0 (sharding.configure); a no-op otherwise. Lightning calls it before every fit / validate."""
        hp = self.hparams
        sharding.configure(self, lambda: load_model_and_tokenizer(hp.model_name_or_path, hp.dtype, hp.attn_implementation)[0],
                           hp.fsdp_offload, fetch=lambda: fetch_weights(hp.model_name_or_path))

    def on_fit_start(self) -> None:
        self._reference_to_device()
        for model in (self.policy, self.reference):  # before Lightning restores AdamW's state (sharding.py)
            if model is not None:
                sharding.finish_lazy_init(model)
        ddp = self.trainer.strategy.model
        if isinstance(ddp, DistributedDataParallel):
            self._grads_in_buckets = ddp.gradient_as_bucket_view
            if not ddp.gradient_as_bucket_view:
                rank_zero_warn(
                    "DDP without gradient_as_bucket_view keeps a second copy of the gradients beside its "
                    "all-reduce buckets (4 bytes per parameter); set --trainer.strategy to "
                    "{class_path: lightning.pytorch.strategies.DDPStrategy, init_args: {gradient_as_bucket_view: true}}"
                )

    def on_validation_start(self) -> None:
        self._reference_to_device()

    def _reference_to_device(self) -> None:
        # Not a registered submodule, so Lightning does not move it. A sharded one is already placed (sharding.py):
        # moving an offloaded one would copy its shards to the GPU and back at every validation.
        if self.reference is not None and not sharding.is_sharded(self.reference):
            self.reference.to(self.device)

    def on_validation_model_zero_grad(self) -> None:
        # Gradients are already released after every update (_update). Lightning's default sets them
        # to None, which under gradient_as_bucket_view would make the next step allocate a second copy.
        pass

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype != torch.float32})
        if low:  # e.g. --trainer.precision bf16-true converts the weights before this hook
            what = f"--trainer.precision={self.trainer.precision}"
            raise low_precision_training_error(what, "/".join(low), hp.learning_rate)
        # Fused AdamW where the weights are: one kernel, no parameter-sized temporaries (foreach allocates ~one). On
        # CUDA; with --model.fsdp_offload cpu the weights are in host RAM and fused picks torch's CPU kernel (one
        # vectorised, multi-threaded pass; CPU runs otherwise keep torch's default single-tensor loop).
        # Not with fp16's grad scaler: Lightning cannot unscale before clipping for a fused optimizer.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        fused = (self.trainer.strategy.root_device.type == "cuda" or hp.fsdp_offload == "cpu") and scaler is None
        opt = torch.optim.AdamW(
            params, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=tuple(hp.adam_betas),
            fused=True if fused else None,
        )
        # stepped once per rollout (training_step), so both count what max_steps counts
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps and self.trainer.max_steps > 0 else None

        def factor(step: int) -> float:
            if hp.warmup_steps and step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.lr_schedule == "cosine" and total:
                progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}]

    # -- log-probs -------------------------------------------------------------------------
    def completion_logprobs(self, model: torch.nn.Module, r: Rollout, rows: slice, entropy: bool = False):
        """log p(completion tokens) of `model` for rollout rows `rows`: (m, C) float32; with `entropy`, also the
        entropy at each position (m, C) of the distribution those log-probs come from (grpo.token_logprobs_and_entropy):
        the scored rows (the speech tokens and the stop token under restrict_to_speech) at the sampling temperature."""
        return self._score_completions(
            model, grpo.token_logprobs_and_entropy if entropy else grpo.token_logprobs, r, rows,
            chunk_size=self.hparams.logprob_chunk_size,
            temperature=r.temperature,
            vocab_range=r.vocab_range,
            disallowed=r.disallowed,
        )

    @torch.no_grad()
    def sampler_logprobs(self, model: torch.nn.Module, r: Rollout, rows: slice) -> grpo.SamplerLogProbs:
        """log p(completion tokens) of `model` under the sampler's top-k / top-p truncated distribution (and
        untruncated), for importance weights that compare like with like: (m, C) each."""
        return self._score_completions(
            model, grpo.sampler_token_logprobs, r, rows, r.temperature, r.top_p, r.top_k,
            self.hparams.logprob_chunk_size, r.vocab_range, r.disallowed,
        )

    @staticmethod
    def _score_completions(model: torch.nn.Module, fn, r: Rollout, rows: slice, *args, **kwargs):
        """fn(states, head weight, targets, *args, **kwargs) on the completion of rollout rows `rows`: the decoder,
        then the chunked head `fn` on the (m, C, H) states that predict the completion (sharding.logprob_forward)."""
        ids, mask, w = r.input_ids[rows], r.attention_mask[rows], r.prompt_width
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # matches generate() with left padding
        targets = ids[:, w:]  # (m, C)
        if r.vocab_range is not None:  # padding after a completion is not a scored row; any valid id will do
            targets = torch.where(mask[:, w:].bool(), targets, r.vocab_range[0])
        return sharding.logprob_forward(model, fn, ids, mask, position_ids, w, targets, *args, **kwargs)

    def reference_model(self) -> AbstractContextManager[torch.nn.Module]:
        """The frozen KL reference, for the body of a `with`: the copy, or under LoRA the base (adapters off)."""
        if self.hparams.lora is not None:
            return lora_lib.adapters_disabled(self.policy)
        return nullcontext(self.reference)

    # -- checkpoints: under LoRA only the trainable tensors (lora.py) -------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        lora_lib.on_save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        lora_lib.on_load_checkpoint(self, checkpoint)

    def _micro_batches(self, n: int) -> list[slice]:
        m = self.hparams.micro_batch_size
        return [slice(i, min(i + m, n)) for i in range(0, n, m)]

    # -- training --------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.hparams.objective == "dpo":
            return self.preference_training_step(batch)
        if "rollout" not in batch:
            raise RuntimeError(
                "training batch has no rollout: the `rollout:` config group (GRPORollout) makes it"
            )
        r: Rollout = batch["rollout"]
        hp = self.hparams
        n = r.input_ids.shape[0]
        mbs = self._micro_batches(n)
        num_tokens = r.completion_mask.sum().item()  # this rank's, for the logged means
        # token-mean over the whole step on every rank (a collective: every rank reaches it once per step)
        loss_tokens = grpo.token_mean_normaliser(r.completion_mask) if hp.loss_aggregation == "token-mean" else num_tokens

        use_is = hp.importance_correction and r.sampler_logprobs is not None
        old_logp = ref_logp = is_weights = is_logp = None
        start = time.perf_counter()  # the log-probs need no reward: they run while rewards may still be scoring
        with torch.no_grad():
            if use_is and (r.top_p < 1 or r.top_k > 0):
                # the sampler reports log-probs of its top-p/top-k truncated distribution: the weights compare
                # like with like, while the loss keeps the untruncated policy at temperature T
                scored = [self.sampler_logprobs(self.policy, r, s) for s in mbs]
                old_logp = torch.cat([x.full for x in scored])
                is_logp = torch.cat([x.truncated for x in scored])
                outside = (~torch.cat([x.kept for x in scored]) & r.completion_mask.bool()).sum().item()
            elif hp.num_iterations > 1 or use_is:
                old_logp = torch.cat([self.completion_logprobs(self.policy, r, s) for s in mbs])
            if hp.beta > 0:
                with self.reference_model() as reference:
                    ref_logp = torch.cat([self.completion_logprobs(reference, r, s) for s in mbs])
        if use_is:  # weights of the rollout's own policy vs the sampler, fixed for all iterations
            is_logp = old_logp if is_logp is None else is_logp
            is_weights = grpo.truncated_importance_weights(is_logp, r.sampler_logprobs, r.completion_mask, hp.importance_cap)
        r.timings["logprob"] = timing.elapsed(start, self.device)
        r.wait_for_rewards()  # overlapped scoring (rollout.overlap_reward) ends here
        advantages = grpo.group_advantages(r.rewards, r.group_size, hp.scale_rewards)  # (N,)

        start = time.perf_counter()
        opt = self.optimizers()
        lr = opt.param_groups[0]["lr"]  # this rollout's, for the log
        sums = Counter()
        self._grad_norm = None
        for it in range(hp.num_iterations):
            for k, s in enumerate(mbs):
                with self._gradient_sync(k == len(mbs) - 1):
                    if it == 0:  # the entropy of the rollout's own policy, from the same chunked pass
                        logp, entropy = self.completion_logprobs(self.policy, r, s, entropy=True)  # (m, C) each
                    else:
                        logp = self.completion_logprobs(self.policy, r, s)  # (m, C)
                    old = old_logp[s] if old_logp is not None else logp.detach()
                    cmask = r.completion_mask[s]
                    tok_loss, clipped = grpo.policy_loss(
                        hp.objective, logp, old, advantages[s], cmask, *self.clip_range, hp.dual_clip,
                        None if is_weights is None else is_weights[s],
                    )
                    if ref_logp is not None:
                        kl = grpo.kl_penalty(logp, ref_logp[s], hp.kl_estimator)
                        tok_loss = tok_loss + hp.beta * kl
                        sums["kl"] += (kl.detach() * cmask).sum().item()
                    loss = grpo.aggregate(tok_loss, cmask, hp.loss_aggregation, loss_tokens, n, r.max_new_tokens)
                    self.manual_backward(loss)
                sums["loss"] += loss.item()
                sums["clipped"] += (clipped.float() * cmask).sum().item()
                sums["ratio"] += (torch.exp(logp.detach() - old) * cmask).sum().item()
                sums["neg_logp"] += (-logp.detach() * cmask).sum().item()
                sums["seq_clipped"] += (clipped & cmask.bool()).any(-1).sum().item()
                if it == 0:
                    sums["entropy"] += (entropy * cmask).sum().item()
            self._update(opt, final=it == hp.num_iterations - 1)
        self.lr_schedulers().step()  # once per rollout, like trainer.global_step
        r.timings["update"] = timing.elapsed(start, self.device)

        stats = {"train/loss": sums["loss"] / hp.num_iterations, "train/lr": lr}
        if self._grad_norm is not None:  # of the rollout's last update
            stats["train/grad_norm"] = float(self._grad_norm)
        if is_weights is not None:
            cm = r.completion_mask.bool()
            sums["is_weight"] = is_weights[cm].sum().item()
            sums["is_capped"] = (is_weights[cm] >= hp.importance_cap).sum().item()
            sums["is_outside"] = outside if is_logp is not old_logp else 0
        sums["tokens"], sums["seqs"] = num_tokens, (r.completion_mask.sum(-1) > 0).sum().item()
        token_means = self.token_means(sums, ref_logp is not None, is_weights is not None and is_logp is not old_logp)
        stats.update({k: float(v) for k, v in r.sampler_metrics.items()})
        self.log_dict(stats, on_step=True, sync_dist=True, batch_size=n)
        self.log_dict(token_means, on_step=True, batch_size=n)  # already over all ranks: no sync_dist
        self.log_rollout_stats(r, "train")
        return torch.tensor(stats["train/loss"])

    def _gradient_sync(self, sync: bool) -> AbstractContextManager:
        """Under DDP, a backward without `sync` accumulates this rank's gradient locally and skips the
        all-reduce; the last micro-batch of an update all-reduces the sum: one round of the whole
        model's gradient per update instead of one per micro-batch (same result: an average of sums).
        Under FSDP2 every micro-batch's backward reduce-scatters its gradient into the sharded one instead:
        skipping it (`set_requires_gradient_sync(False)`) would keep an unsharded fp32 gradient of the whole
        model on every rank between micro-batches (4 bytes per parameter, the DDP cost FSDP2 is there to
        shed), to save reduce-scatters of (world-1)/world of the fp32 gradient each (BENCHMARKS.md, FSDP2)."""
        strategy = self.trainer.strategy
        if sync or not isinstance(strategy, ParallelStrategy) or isinstance(strategy, ModelParallelStrategy):
            return nullcontext()
        return strategy.block_backward_sync()

    def _update(self, opt: LightningOptimizer, final: bool) -> None:
        """One optimiser update, then the gradients are released.

        Only a rollout's final update goes through `LightningOptimizer.step`, which advances
        `trainer.global_step`; the others take the path below it, the strategy's `optimizer_step`
        (precision plugin, grad scaler, `on_before_optimizer_step` hooks, clipping), without the counter.
        Gradients are released right after the update rather than before the next backward, so the
        next rollout (a colocated vLLM engine) has the memory. Under DDP with gradient_as_bucket_view
        they are views into DDP's all-reduce buckets, which DDP keeps anyway: zeroed in place they stay
        views, while set to None the next step's backward would allocate a second copy beside them.
        """
        if final:
            opt.step()
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, do_nothing_closure)
        opt.zero_grad(set_to_none=not self._grads_in_buckets)

    def on_before_optimizer_step(self, optimizer) -> None:
        # The precision plugin calls this after unscaling fp16 gradients (16-mixed) and before the
        # update: clipping here clips true gradients, in training_step it would clip scaled ones.
        if self.hparams.max_grad_norm:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.hparams.max_grad_norm)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        # a DPO round may have two validation loaders (held-out pairs, held-out prompts); the batch says which
        if self.hparams.objective == "dpo":
            return self.preference_validation_step(batch)
        if "rollout" not in batch:
            raise RuntimeError("validation batch has no rollout: the `rollout:` config group (GRPORollout) makes it")
        self.log_rollout_stats(batch["rollout"], "val", on_epoch=True)
        self.log_val_entropy(batch["rollout"])

    # -- logging ---------------------------------------------------------------------------
    def token_means(self, sums: Counter, with_kl: bool, with_outside: bool) -> dict[str, float]:
        """The step's token means over all ranks: the sum over ranks of each numerator over the sum over ranks of
        the token count (one all_reduce of a small vector; a collective every rank reaches once per step). A mean
        of per-rank means would weigh up the tokens of a rank with fewer of them. Over the completion tokens the
        loss sees (`completion_mask`), and over the step's num_iterations updates where a value changes with them:
            train/entropy          the policy's entropy at each position (grpo.token_logprobs_and_entropy), of the
                                   rollout's policy (the step's first pass); the headline against entropy collapse
            train/neg_logp         -log p of the sampled token: its NLL, an estimate of the entropy only on-policy
            train/clip_fraction    tokens whose ratio term was clipped; gspo: tokens of clipped sequences; cispo:
                                   tokens whose weight was capped (they keep their gradient)
            train/seq_clip_fraction  (gspo) sequences (with a loss token) whose sequence ratio was clipped
            train/ratio_mean       exp(logp - old_logp) per token; train/kl: the KL estimate (beta > 0)
            train/is_weight_mean, train/is_weight_capped_frac, train/is_outside_nucleus_frac (importance_correction)
        """
        names = ("tokens", "seqs", "clipped", "seq_clipped", "ratio", "neg_logp", "entropy", "kl",
                 "is_weight", "is_capped", "is_outside")
        total = dict(zip(names, sum_over_ranks([float(sums[k]) for k in names], self.device)))
        iters, tokens = self.hparams.num_iterations, max(total["tokens"], 1.0)
        means = {
            "train/entropy": total["entropy"] / tokens,
            "train/neg_logp": total["neg_logp"] / (tokens * iters),
            "train/clip_fraction": total["clipped"] / (tokens * iters),
            "train/ratio_mean": total["ratio"] / (tokens * iters) if total["tokens"] else 1.0,
        }
        if self.hparams.objective == "gspo":
            means["train/seq_clip_fraction"] = total["seq_clipped"] / (max(total["seqs"], 1.0) * iters)
        if with_kl:
            means["train/kl"] = total["kl"] / (tokens * iters)
        if "is_weight" in sums:
            means["train/is_weight_mean"] = total["is_weight"] / tokens if total["tokens"] else 1.0
            means["train/is_weight_capped_frac"] = total["is_capped"] / tokens
            if with_outside:  # sampled tokens the trainer's own nucleus excludes: weight 0
                means["train/is_outside_nucleus_frac"] = total["is_outside"] / tokens
        return means

    @torch.no_grad()
    def log_val_entropy(self, r: Rollout) -> None:
        """val/entropy: the policy's token entropy over the validation completions, as train/entropy; a token mean
        over all ranks and, through batch_size, over the epoch's batches."""
        summed = sum(float((self.completion_logprobs(self.policy, r, s, entropy=True)[1] * r.completion_mask[s]).sum())
                     for s in self._micro_batches(r.input_ids.shape[0]))
        total, tokens = sum_over_ranks([summed, float(r.completion_mask.sum())], self.device)
        if tokens:
            self.log("val/entropy", total / tokens, on_step=False, on_epoch=True, batch_size=int(tokens),
                     add_dataloader_idx=False)

    def log_rollout_stats(self, r: Rollout, prefix: str, on_epoch: bool = False) -> None:
        """Exact statistics over all ranks' samples: rewards, reward metrics, lengths, reasons."""
        per_sample = {
            "reward": r.rewards.float(),
            "completion_length": r.completion_lengths.to(self.device),
            "truncated": r.truncated.float(),
        }
        for name, value in sorted(r.reward_result.metrics.items()):
            per_sample[name] = value.float().to(self.device)
        # the union of every rank's names (the ranks may score with different metrics); what a rank lacks is NaN,
        # left out of the statistics below
        gathered = gather_by_name(per_sample, r.rewards.numel(), self.device)  # {name: (world*N,)}
        stats = {}
        for name, v in gathered.items():
            finite = v[torch.isfinite(v)]
            if name in ("truncated",):
                stats[f"{prefix}/truncation_rate"] = v.mean().item()
                continue
            if finite.numel() == 0:
                continue
            stats[f"{prefix}/{name}_mean"] = finite.mean().item()
            if name in ("reward", "completion_length"):
                stats[f"{prefix}/{name}_std"] = finite.std().item() if finite.numel() > 1 else 0.0
                stats[f"{prefix}/{name}_min"] = finite.min().item()
                stats[f"{prefix}/{name}_max"] = finite.max().item()
        reasons = concat_from_ranks(list(r.reward_result.reasons))
        for reason, count in sorted(Counter(reasons).items()):
            stats[f"{prefix}/reason_{reason}"] = count / len(reasons)
        # Already reduced over ranks above, so no sync_dist; every rank logs the same numbers. The names are the same
        # whichever validation loader the rollout came from (a DPO round's held-out prompts are its second)
        self.log_dict(
            stats, on_step=not on_epoch, on_epoch=on_epoch, batch_size=len(reasons),
            prog_bar=False, rank_zero_only=False, add_dataloader_idx=False,
        )
        self.log(f"{prefix}/reward", stats[f"{prefix}/reward_mean"], prog_bar=True,
                 on_step=not on_epoch, on_epoch=on_epoch, batch_size=len(reasons), add_dataloader_idx=False)
