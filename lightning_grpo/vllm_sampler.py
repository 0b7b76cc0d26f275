"""vLLM group sampling, colocated with training: one engine per DDP rank, weights synced in place.

`VLLMSampler` implements the `Sampler` Protocol of `sampling.py`. At fit start each rank builds its own
vLLM engine on its own GPU (`pl_module.device`) from the policy's config with *dummy* weights; the first
`sample()` copies the policy's weights into it, then every `sync_every` steps again, in place
(the vLLM worker's `reload_weights` from the policy's tensors, GPU to GPU: no engine restart, no disk). `verify_every` checks the copy:
the engine's prompt log-probs of a fixed completion must match the policy's teacher-forced ones.

One step, in this order (the order is what makes sleep mode safe):
    wake_up(weights) -> sync weights -> reset prefix cache -> wake_up(kv_cache) -> generate -> [verify] -> sleep
Weights are woken before the sync because a sleeping engine's weights are offloaded (level 1: restored
from the CPU backup on wake, which would overwrite a sync done while asleep; level 2: discarded). The
KV cache is woken only after the sync so that the sync's peak memory does not include it. The prefix
cache is reset after every sync because cached KV blocks were computed with the old weights.

Departures from peers: the engine stops only on <|SPEECH_GENERATION_END|> (`ignore_eos`: the base
model's eos never ends a speech span), and prompts and completions are token ids (no detokenisation).
Every vLLM call lives in `vllm_engine.VLLMEngine`; tests substitute a fake engine through `engine_factory`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from typing import Callable, Iterator, Literal, Sequence

import torch

from .grpo import token_logprobs
from .sampling import Completions, check_sampling_params
from .vllm_engine import Engine, EngineConfig, RawCompletion, SampleRequest, VLLMEngine

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

# Wrappers that prefix parameter names: DDP / Lightning strategy wrappers, torch.compile. (torch's
# activation-checkpoint wrapper strips its own marker from state_dict keys; HF gradient checkpointing
# renames nothing.)
_PREFIXES = ("module.", "_forward_module.", "_orig_mod.")
_HF_NAMES = ("model.embed_tokens.", "model.layers.", "model.norm.", "model.rotary_emb.", "lm_head.")


def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of an HF causal LM with wrapper prefixes removed, tensors detached, no copy.

    Accepts the model wrapped by DDP / Lightning / torch.compile / activation checkpointing; names come
    out as `LlamaForCausalLM` names (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), which
    vLLM's `load_weights` maps onto its fused layers.
    """
    seen = False
    for name, tensor in model.state_dict(keep_vars=False).items():
        stripped = True
        while stripped:
            stripped = False
            for p in _PREFIXES:
                if name.startswith(p):
                    name, stripped = name[len(p) :], True
        if not name.startswith(_HF_NAMES):
            raise ValueError(
                f"parameter {name!r} is not a LlamaForCausalLM name ({', '.join(_HF_NAMES)}...): pass the HF causal "
                "LM itself (or a DDP/compile wrapper of it) as `model` to VLLMSampler.sample, not its owner"
            )
        seen = True
        yield name, tensor.detach()
    if not seen:
        raise ValueError("the model passed to VLLMSampler has no parameters to sync")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside DDP / Lightning / torch.compile wrappers."""
    for attr in ("module", "_forward_module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module) and not hasattr(model, "config"):
            model = getattr(model, attr)
    return model


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
        hidden = hf.get_decoder()(input_ids=x, use_cache=False).last_hidden_state  # (1, L, H)
        logp = token_logprobs(hidden[:, start - 1 : -1], hf.get_output_embeddings().weight, x[:, start:])
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
        sleep_level: Literal[1, 2] = 1,
        dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16",
        max_model_len: int | None = None,
        seed: int = 0,
        sync_every: int = 1,
        verify_every: int = 0,
        verify_tolerance: float = 0.05,
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
            sleep_level: 1 offloads weights to CPU RAM; 2 discards them (less RAM, no copy) and is only
                valid with sync_every=1 because every wake is then followed by a full sync.
            dtype: engine weight/activation dtype; the policy's weights are cast on sync.
            max_model_len: longest prompt + completion the engine accepts; default max_new_tokens + 512
                (the original run's max prompt length), capped by the model's max_position_embeddings.
            seed: base sampling seed; rank r uses seed + r so ranks draw different groups.
            sync_every: copy the policy's weights into the engine every k steps (1 = on-policy). The first
                sample() always syncs (the engine starts from dummy weights unless model_path is given).
            verify_every: after every k-th sync, check the engine against the policy on a fixed completion
                (0 = never). Costs one prefill and one policy forward of verify_tokens tokens.
            verify_tolerance: largest allowed mean |engine - policy| per-token log-prob (nats) in the check;
                bf16 kernels differ by ~0.01; an unsynced engine differs by far more.
            verify_tokens: completion tokens used by the check.
            on_verify_fail: raise (stop training) or log a warning on a failed check.
            logprobs_mode: processed_logprobs = log-probs of the distribution actually sampled from (after
                temperature / top-k / top-p), what importance weights need; raw_logprobs = temperature 1.
            enforce_eager: disable CUDA graphs (slower decode, faster start, less memory).
            model_path: HF directory to build the engine from; default: the policy's config in a temp
                dir with dummy weights (nothing written but config.json; weights come from the first sync).
            engine_kwargs: extra `vllm.LLM` keyword arguments (e.g. max_num_seqs), passed as is.
            engine_factory: builds the engine from an EngineConfig; default: vLLM. Tests pass a fake.
        """
        check_sampling_params(temperature, top_p, top_k, max_new_tokens)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
        if tensor_parallel_size < 1:
            raise ValueError(f"--tensor_parallel_size={tensor_parallel_size} must be >= 1")
        if sync_every < 1:
            raise ValueError(f"--sync_every={sync_every} must be >= 1 (1 syncs every step)")
        if sleep_level not in (1, 2):
            raise ValueError(f"--sleep_level={sleep_level} must be 1 or 2")
        if enable_sleep_mode and sleep_level == 2 and sync_every != 1:
            raise ValueError(
                f"--sleep_level=2 discards the engine's weights while asleep, so it needs --sync_every=1 "
                f"(got {sync_every}); use --sleep_level=1 to sync less often"
            )
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
        self.sleep_level = sleep_level
        self.dtype = dtype
        self.max_model_len = max_model_len
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
        self.metrics: dict[str, float] = {}  # of the last sample() call; the rollout callback logs them
        self._synced = False
        self._num_syncs = 0
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
        )

    def setup(self, pl_module) -> None:
        """Build this rank's engine once (a second call is a no-op)."""
        if self.engine is not None:
            return
        if self.tensor_parallel_size > 1:
            self._tp_group = _tp_subgroup(self.tensor_parallel_size)
        cfg = self.engine_config(pl_module)
        t0 = time.perf_counter()
        self.engine = self.engine_factory(cfg)
        self.build_seconds = time.perf_counter() - t0
        self._synced = False  # even a model_path checkpoint may differ from the policy: sync first
        if self.enable_sleep_mode:
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
        if self.engine is None:
            raise RuntimeError("VLLMSampler.setup(pl_module) must run before sample() (the rollout callback calls it)")
        if n < 1 or not prompts:
            raise ValueError(f"need n >= 1 and at least one prompt (got n={n}, {len(prompts)} prompts)")
        engine = self.engine
        metrics: dict[str, float] = {}
        due = not self._synced or step % self.sync_every == 0
        if self._asleep:
            engine.wake_up(["weights"])
        if due:
            metrics["rollout/sync_s"] = self.sync_weights(model)
        if self._asleep:
            engine.wake_up(["kv_cache"])
            self._asleep = False
        local = [list(p) for p in prompts]
        gathered, offset = _gather_prompts(local, self._tp_group)
        allowed = None if allowed_token_ids is None else tuple(int(t) for t in allowed_token_ids)
        request = SampleRequest(
            n, self.temperature, self.top_p, self.top_k, self.max_new_tokens, stop_token_id, allowed_token_ids=allowed
        )
        t0 = time.perf_counter()
        groups = engine.generate(gathered, request)[offset : offset + len(local)]
        gen_s = time.perf_counter() - t0
        out = self._to_completions(groups, n, stop_token_id)
        if due and self.verify_every and (self._num_syncs - 1) % self.verify_every == 0:
            metrics.update(self._verify_after_sync(model, local[0], out.ids[0]))
        if self.enable_sleep_mode:
            engine.sleep(self.sleep_level)
            self._asleep = True
        num_tokens = sum(len(r) for r in out.ids)
        metrics.update(
            {
                "rollout/generate_s": gen_s,
                "rollout/tokens_per_s": num_tokens / max(gen_s, 1e-9),
                "rollout/truncated_frac": sum(out.truncated) / len(out.truncated),
            }
        )
        self.metrics = metrics
        return out

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
        self.engine.load_weights(hf_weights(model))
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
        # The step's first completion is a realistic sequence; a speech-less one (immediate stop) still
        # checks one position.
        result = self.verify_sync(model, prompt, completion[: self.verify_tokens])
        if not result["sync/ok"]:
            msg = (
                f"vLLM weight sync check failed: mean |engine - policy| log-prob = "
                f"{result['sync/logprob_mean_abs_diff']:.4f} > --verify_tolerance={self.verify_tolerance} "
                f"(max {result['sync/logprob_max_abs_diff']:.4f}); the engine is not sampling from the policy"
            )
            if self.on_verify_fail == "raise":
                raise RuntimeError(msg)
            log.warning(msg)
        return result

    def teardown(self) -> None:
        """Drop the engine and its temp config dir."""
        self.engine = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


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


def _gather_prompts(local: list[list[int]], group) -> tuple[list[list[int]], int]:
    """All prompts of this rank's TP group (in rank order) and where this rank's start."""
    if group is None:
        return local, 0
    parts: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(parts, local, group=group)
    me = torch.distributed.get_rank(group)
    return [p for part in parts for p in part], sum(len(part) for part in parts[:me])
