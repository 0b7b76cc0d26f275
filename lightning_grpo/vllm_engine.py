"""The engine seam of `VLLMSampler`: what it asks of vLLM, and the one class that calls vLLM.

Everything vLLM-specific (0.32, V1 engine) lives in `VLLMEngine`; `vllm_sampler.VLLMSampler` talks to
the `Engine` Protocol only, so tests substitute a deterministic fake. vllm is imported lazily: this
module imports with the CPU base install.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build one rank's engine (what `engine_factory` receives)."""

    model_path: str
    load_format: str  # "dummy" when weights come from the first sync, else "auto"
    device: torch.device
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


@dataclass
class RawCompletion:
    """One engine output: ids (stop token included when produced), per-id logprobs, finish reason."""

    ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


class Engine(Protocol):
    """The only surface of vLLM the sampler uses."""

    def generate(self, prompts: Sequence[Sequence[int]], request: SampleRequest) -> list[list[RawCompletion]]:
        """For each prompt, `request.n` completions."""

    def prompt_logprobs(self, ids: Sequence[int], start: int) -> list[float]:
        """log p(ids[t] | ids[:t]) for t in start..len(ids)-1, temperature 1, no truncation."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the engine's model in place."""

    def reset_prefix_cache(self) -> None: ...

    def sleep(self, level: int) -> None: ...

    def wake_up(self, tags: list[str]) -> None: ...


class VLLMEngine:
    """The real engine: vLLM 0.32 `LLM` (V1 engine), run in this process.

    In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, or `external_launcher` under DDP) so that
    `collective_rpc` calls the worker directly and weight tensors are copied GPU-to-GPU without
    serialisation or IPC handles.
    """

    def __init__(self, cfg: EngineConfig) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM  # deferred: vllm is an optional extra (requirements-gpu.txt)

        kwargs = dict(
            model=cfg.model_path,
            load_format=cfg.load_format,
            skip_tokenizer_init=True,  # ids in, ids out
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            seed=cfg.seed,
            enable_sleep_mode=cfg.enable_sleep_mode,
            enforce_eager=cfg.enforce_eager,
            logprobs_mode=cfg.logprobs_mode,
        )
        if cfg.distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = cfg.distributed_executor_backend
        if cfg.distributed_executor_backend == "external_launcher":
            # vLLM joins the trainer's process group through env:// and needs these (torchrun sets
            # them; Lightning's launcher may not set RANK).
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
            os.environ.setdefault("LOCAL_RANK", str(cfg.device.index or 0))
        kwargs.update(cfg.extra)
        if cfg.device.type == "cuda":
            torch.cuda.set_device(cfg.device)  # vLLM's in-process worker uses the current device
        self.llm = LLM(**kwargs)

    def generate(self, prompts, request):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
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
            allowed_token_ids=None if request.allowed_token_ids is None else list(request.allowed_token_ids),
        )
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:  # vLLM returns outputs in prompt order
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs or [])]
                group.append(RawCompletion(ids=ids, logprobs=lps, finish_reason=c.finish_reason))
            result.append(group)
        return result

    def prompt_logprobs(self, ids, start):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)
        # prompt_logprobs[t] is a {token_id: Logprob} dict holding at least ids[t]; entry 0 is None.
        return [float(out.prompt_logprobs[t][ids[t]].logprob) for t in range(start, len(ids))]

    def load_weights(self, weights):
        # The worker's in-place reload (vLLM >= 0.2x): loads HF-format tensors through the model's own
        # weight loaders, then redoes the post-load processing (fused qkv / gate_up, CPU repacking)
        # layer by layer. Plain `model.load_weights` skips that processing and fails on repacked layers.
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": list(weights), "is_checkpoint_format": True}
        )

    def reset_prefix_cache(self):
        self.llm.reset_prefix_cache()

    def sleep(self, level):
        self.llm.sleep(level=level)

    def wake_up(self, tags):
        self.llm.wake_up(tags=tags)
