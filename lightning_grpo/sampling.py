"""Samplers: turn prompt ids into G completions each, behind one small Protocol.

`HFSampler` uses `transformers` `generate` (CPU default, tests, any device). The vLLM sampler
(`lightning_grpo.vllm_sampler`) implements the same Protocol for GPU rollouts.
Rows of `Completions` are grouped by prompt: rows i*n .. i*n+n-1 are the n samples of prompt i.

A sampler may also *stream* (`stream()`): yield `CompletionChunk`s, the finished groups of some prompts,
while it keeps generating the rest, so the rollout can score them meanwhile (`rollout.overlap_reward`).
`HFSampler` streams one `generate` call per `prompts_per_chunk` prompts; `VLLMSampler` streams the groups
the engine finishes, in the order it finishes them. `sample_stream` falls back to one chunk from `sample()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass
class Completions:
    """Sampled completions for len(prompts) * n rows.

    ids: each row's completion ids, prompt excluded, stop token included when produced, no padding;
    truncated: the row reached max_new_tokens without the stop token;
    logprobs: the sampler's own log-prob of each completion id (same lengths as ids), or None.
    """

    ids: list[list[int]]
    truncated: list[bool]
    logprobs: list[list[float]] | None = None


@dataclass
class CompletionChunk:
    """The finished groups of some prompts: `completions` holds len(prompts) * n rows, grouped by prompt in
    the order of `prompts` (indices into the prompt list the sampler was given)."""

    prompts: list[int]
    completions: Completions


class ChunkRows:
    """The completions of `num_prompts` prompts x `n`, filled chunk by chunk in any order (rows grouped by
    prompt: rows i*n .. i*n+n-1 are prompt i's). `add` places a chunk and checks it; `completions` checks that
    every prompt came and returns them."""

    def __init__(self, num_prompts: int, n: int) -> None:
        self.num_prompts, self.n = num_prompts, n
        self.ids: list[list[int] | None] = [None] * (num_prompts * n)
        self.truncated: list[bool] = [False] * (num_prompts * n)
        self.logprobs: list[list[float] | None] | None = None  # made by the first chunk with log-probs

    def add(self, chunk: CompletionChunk) -> list[int]:
        """Place `chunk`'s rows; returns their row indices in the chunk's order. An error for a chunk whose rows
        do not match its prompts, or a prompt given twice or out of range."""
        comps, n = chunk.completions, self.n
        if len(comps.ids) != len(chunk.prompts) * n or len(comps.truncated) != len(comps.ids):
            raise RuntimeError(f"sampler returned {len(comps.ids)} completions for {len(chunk.prompts)} prompts x {n}")
        if comps.logprobs is not None and self.logprobs is None:
            self.logprobs = [None] * len(self.ids)
        rows = []
        for k, prompt in enumerate(chunk.prompts):
            if not 0 <= prompt < self.num_prompts or self.ids[prompt * n] is not None:
                raise RuntimeError(f"sampler returned prompt {prompt} twice or out of range (0..{self.num_prompts - 1})")
            for j in range(n):
                row, src = prompt * n + j, k * n + j
                self.ids[row], self.truncated[row] = list(comps.ids[src]), bool(comps.truncated[src])
                if comps.logprobs is not None:
                    self.logprobs[row] = comps.logprobs[src]  # type: ignore[index]
                rows.append(row)
        return rows

    def completions(self) -> Completions:
        """Every prompt's completions, in prompt order; an error if a prompt is missing, or if some chunks had
        log-probs and others not."""
        missing = sorted({row // self.n for row, x in enumerate(self.ids) if x is None})
        if missing:
            raise RuntimeError(f"sampler returned no completions for prompts {missing} of {self.num_prompts}")
        if self.logprobs is not None and any(lp is None for lp in self.logprobs):
            raise RuntimeError("the sampler reported log-probs for some chunks of a rollout but not all")
        return Completions(ids=self.ids, truncated=self.truncated, logprobs=self.logprobs)  # type: ignore[arg-type]


def concat_chunks(chunks: Sequence[CompletionChunk], num_prompts: int, n: int) -> Completions:
    """Completions for prompts 0..num_prompts-1 in prompt order, from chunks in any order (`ChunkRows`)."""
    rows = ChunkRows(num_prompts, n)
    for chunk in chunks:
        rows.add(chunk)
    return rows.completions()


def sample_stream(
    sampler: "Sampler", model: torch.nn.Module, prompts: Sequence[Sequence[int]], n: int, stop_token_id: int,
    step: int, allowed_token_ids: Sequence[int] | None = None,
) -> Iterator[CompletionChunk]:
    """The sampler's `stream()` when it has one; else its `sample()` as one chunk of every prompt. A subclass that
    overrides `sample()` but not `stream()` (say, to change the allowed ids) gets its `sample()` called."""
    kwargs = {"allowed_token_ids": allowed_token_ids} if allowed_token_ids is not None else {}
    if _streams(sampler):
        yield from sampler.stream(model, prompts, n, stop_token_id, step, **kwargs)
        return
    comps = sampler.sample(model, prompts, n, stop_token_id, step, **kwargs)
    if len(comps.ids) != len(prompts) * n:
        raise RuntimeError(f"sampler returned {len(comps.ids)} completions for {len(prompts)} prompts x {n}")
    yield CompletionChunk(list(range(len(prompts))), comps)


def _streams(sampler: object) -> bool:
    """Whether `stream()` is defined at least as far down the class hierarchy as `sample()`."""
    mro = type(sampler).__mro__
    owner = {name: next((i for i, c in enumerate(mro) if name in c.__dict__), None) for name in ("stream", "sample")}
    if owner["stream"] is None:
        return False
    return owner["sample"] is None or owner["stream"] <= owner["sample"]


def check_sampling_params(temperature: float, top_p: float, top_k: int, max_new_tokens: int) -> None:
    """The sampling settings every sampler shares; errors name the flag."""
    if temperature <= 0:
        raise ValueError(f"--temperature={temperature} must be > 0 (use a small value for near-greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p={top_p} must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"--top_k={top_k} must be >= 0 (0 disables it)")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens={max_new_tokens} must be >= 1")


@runtime_checkable
class Sampler(Protocol):
    """What the rollout callback needs from a sampler. The trainer reads the four sampling settings
    too: it scores log-probs at the sampler's `temperature` (over the same `allowed_token_ids`), and
    a Rollout records them, so a sampler must expose them as attributes (`check_sampler`)."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int

    def setup(self, pl_module) -> None:
        """Called once at fit start on every rank (e.g. to build an engine on this rank's GPU)."""

    def sample(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        n: int,
        stop_token_id: int,
        step: int,
        allowed_token_ids: Sequence[int] | None = None,
    ) -> Completions:
        """Sample n completions per prompt from the current weights of `model`.

        step: the number of training rollouts made before this call (0, 1, ...; a resumed run
        continues the count), in training and in validation alike, so a sampler can schedule work
        such as weight syncs every k rollouts. A rollout is one training step (docs/workflow.md, "Steps").

        allowed_token_ids: when given, every other token has probability 0 (LLaSA: the speech
        tokens and the stop token), and the trainer scores log-probs over the same set.
        """

    # Optional: `stream(model, prompts, n, stop_token_id, step, allowed_token_ids=None) -> Iterator[CompletionChunk]`,
    # the same completions as `sample()` in finished pieces (see the module docstring and `sample_stream`).


SAMPLER_SETTINGS = ("temperature", "top_p", "top_k", "max_new_tokens")


def check_sampler(sampler: object) -> None:
    """Raise naming what `sampler` lacks of the `Sampler` Protocol (never a silent default)."""
    missing = [a for a in (*SAMPLER_SETTINGS, "setup", "sample") if not hasattr(sampler, a)]
    if missing:
        raise TypeError(
            f"the sampler {type(sampler).__name__} has no {', '.join(missing)}: a sampler must expose "
            f"{', '.join(SAMPLER_SETTINGS)} as attributes and setup() / sample() (lightning_grpo.sampling.Sampler)"
        )
    check_sampling_params(sampler.temperature, sampler.top_p, sampler.top_k, sampler.max_new_tokens)


class HFSampler:
    """Sampling with `model.generate` on the model's own device: simple, exact, slow."""

    def __init__(
        self,
        temperature: float = 0.8,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 2048,
        pad_token_id: int | None = None,
        return_logprobs: bool = False,
        prompts_per_chunk: int = 0,
    ) -> None:
        """
        Args:
            temperature: softmax temperature (LLaSA card: 0.8; the original GRPO run: 0.8).
            top_p: nucleus mass; 1.0 disables it (some LLaSA users report runaway audio below 1).
            top_k: keep the k most likely tokens; 0 disables it.
            max_new_tokens: completion budget; 2048 tokens are about 41 s of audio at 50 tokens/s.
                Completions that reach it are flagged truncated, never silently cut.
            pad_token_id: id used to left-pad prompts; default: the stop token id (never sampled
                inside a completion because sampling ends at the stop token).
            return_logprobs: also return generate's own log-prob of each sampled token (from its
                processed scores: after the speech-only mask, temperature, top-k/top-p). Used to
                check that the trainer scores exactly the distribution that was sampled.
            prompts_per_chunk: prompts per `generate` call; 0 = all of a rank's prompts in one call. Smaller
                chunks let the rollout score finished chunks while later ones generate
                (`--rollout.overlap_reward`), at the price of smaller generate batches: little on a CPU, whose
                cost grows with the rows, more on a GPU, where a decode step costs about the same for 16 rows
                as for 64. Chunking changes how generate draws from the random stream, so the samples differ
                from unchunked ones; for a given chunking they are the same with overlap on or off.
        """
        check_sampling_params(temperature, top_p, top_k, max_new_tokens)
        if prompts_per_chunk < 0:
            raise ValueError(f"--prompts_per_chunk={prompts_per_chunk} must be >= 0 (0: one generate call for all prompts)")
        self.prompts_per_chunk = prompts_per_chunk
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.pad_token_id = pad_token_id
        self.return_logprobs = return_logprobs

    def setup(self, pl_module) -> None:
        pass

    def sample(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        n: int,
        stop_token_id: int,
        step: int,
        allowed_token_ids: Sequence[int] | None = None,
    ) -> Completions:
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
        """One chunk per `prompts_per_chunk` prompts, in prompt order, each from its own `generate` call."""
        size = self.prompts_per_chunk or len(prompts)
        for start in range(0, len(prompts), size):
            part = list(range(start, min(start + size, len(prompts))))
            comps = self._generate(model, [prompts[i] for i in part], n, stop_token_id, allowed_token_ids)
            yield CompletionChunk(part, comps)

    @torch.no_grad()
    def _generate(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        n: int,
        stop_token_id: int,
        allowed_token_ids: Sequence[int] | None,
    ) -> Completions:
        pad = stop_token_id if self.pad_token_id is None else self.pad_token_id
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        rows = [list(p) for p in prompts for _ in range(n)]  # (B*G,) grouped by prompt
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(rows):  # left padding so every completion starts at column `width`
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=stop_token_id,
                pad_token_id=pad,
                use_cache=True,
                logits_processor=LogitsProcessorList([_AllowOnly(allowed_token_ids)]) if allowed_token_ids else None,
                return_dict_in_generate=True,
                output_scores=self.return_logprobs,
            )
        finally:
            model.train(was_training)
        sequences = out.sequences[:, width:]  # (B*G, T)
        token_logprobs = None
        if self.return_logprobs:
            # one (B*G, V) block of processed scores at a time: never a (B*G, T, V) copy
            token_logprobs = torch.stack([  # (B*G, T)
                torch.log_softmax(s.float(), -1).gather(-1, sequences[:, t, None])[:, 0] for t, s in enumerate(out.scores)
            ], dim=1)
        ids, truncated, logprobs = [], [], []
        for i, row in enumerate(sequences.tolist()):
            if stop_token_id in row:
                row = row[: row.index(stop_token_id) + 1]
                truncated.append(False)
            else:
                truncated.append(True)
            ids.append(row)
            if token_logprobs is not None:
                logprobs.append(token_logprobs[i, : len(row)].tolist())
        return Completions(ids=ids, truncated=truncated, logprobs=logprobs if token_logprobs is not None else None)


class _AllowOnly(LogitsProcessor):
    """Sets every score outside `allowed` to -inf (applied before temperature / top-p / top-k)."""

    def __init__(self, allowed: Sequence[int]) -> None:
        self.allowed = torch.tensor(sorted(set(int(i) for i in allowed)), dtype=torch.long)
        self._bias: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._bias is None or self._bias.shape[0] != scores.shape[-1] or self._bias.device != scores.device:
            bias = torch.full((scores.shape[-1],), float("-inf"), device=scores.device)
            bias[self.allowed.to(scores.device)] = 0.0
            self._bias = bias
        return scores + self._bias.to(scores.dtype)
