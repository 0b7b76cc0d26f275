"""The reward seam: what the rollout callback hands a reward and what it gets back.

Every reward (the rule reward, the Whisper reward, the HTTP client) implements
`Reward.score(samples) -> RewardResult`. A reward never raises for one bad sample: it gives that
sample a defined reward and a reason string, which the trainer logs as a fraction per reason.
A reward raises only when it cannot score at all (a dead server after retries, a broken model).

`score` is the whole required contract. The optional members (`start`, `close`, `max_concurrent_calls`,
`aggregation`, `codec`) are declared once, with their defaults, by `RewardBase`, which the package's rewards
inherit; the trainer reads them through the functions below (`start_reward`, `close_reward`,
`concurrent_calls`, `aggregation_of`, `codec_of`), which give the same defaults for a user's class that has
only `score`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import torch

OK = "ok"


@dataclass(frozen=True)
class SpeechSample:
    """One completion to score.

    text: the ground-truth text the prompt asked for; codes: codec codes of the speech span;
    stopped: the completion ended with <|SPEECH_GENERATION_END|>; truncated: it hit
    max_new_tokens; num_invalid: non-speech ids inside the speech span; language: an ISO code
    such as "en" or "ko", or None for the reward's default.

    Voice cloning (LLaSA's zero-shot prompt; see llasa.encode_prompt): prompt_text is the transcript of
    the reference clip and prompt_codes its codec codes, both part of the prompt, never of `codes` or
    `text` (rewards score the continuation against the target text); prompt_wav is the path of the
    reference recording, which speaker similarity prefers to audio decoded from prompt_codes.
    group: the index of the prompt this completion answers within one `score` call (completions of one
    prompt share it; GRPORollout sets it), for rewards that compare a sample with its group
    (CompositeReward's normalize_then_sum); None when unknown.
    """

    text: str
    codes: list[int]
    stopped: bool = True
    truncated: bool = False
    num_invalid: int = 0
    language: str | None = None
    prompt_text: str | None = None
    prompt_codes: list[int] | None = None
    prompt_wav: str | None = None
    group: int | None = None

    @property
    def has_reference(self) -> bool:
        """The sample carries a reference voice: codes of a reference clip or its recording."""
        return bool(self.prompt_codes) or bool(self.prompt_wav)


def code_reason(s: SpeechSample, codebook_size: int) -> str:
    """The guard every audio reward applies first: "invalid_token" (non-speech ids in the speech span, or codes
    outside [0, codebook_size)), "empty_speech" (no codes), else OK."""
    if s.num_invalid > 0 or any(not 0 <= c < codebook_size for c in s.codes):
        return "invalid_token"
    if not s.codes:
        return "empty_speech"
    return OK


@dataclass
class RewardResult:
    """Rewards and diagnostics for N samples.

    rewards: (N,) float32, finite, usually in [0, 1];
    metrics: name -> (N,) float32 per-sample diagnostics (e.g. "cer", "nll"); NaN marks
             "not measured for this sample" and is excluded from logged means;
    reasons: N strings, "ok" or why the sample got a fixed reward ("empty_speech", ...);
    transcripts: N strings when the reward transcribes, else empty.
    """

    rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    transcripts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.rewards.shape[0]
        if not self.reasons:
            self.reasons = [OK] * n
        if len(self.reasons) != n:
            raise ValueError(f"RewardResult has {n} rewards but {len(self.reasons)} reasons")
        for name, value in self.metrics.items():
            if value.shape != (n,):
                raise ValueError(f"metric {name!r} has shape {tuple(value.shape)}, expected ({n},)")
        if not torch.isfinite(self.rewards).all():
            raise ValueError(f"reward is not finite: {self.rewards.tolist()}")

    def rows(self, index: Sequence[int]) -> "RewardResult":
        """The results of samples `index`, in that order (a sample may repeat)."""
        order = list(index)
        at = torch.tensor(order, dtype=torch.long)
        return RewardResult(
            rewards=self.rewards[at.to(self.rewards.device)],
            metrics={name: value[at.to(value.device)] for name, value in self.metrics.items()},
            reasons=[self.reasons[i] for i in order],
            transcripts=[self.transcripts[i] for i in order] if self.transcripts else [],
        )

    @staticmethod
    def cat(results: Sequence["RewardResult"]) -> "RewardResult":
        names = set().union(*(r.metrics for r in results)) if results else set()
        metrics = {}
        for name in names:
            metrics[name] = torch.cat(
                [r.metrics.get(name, torch.full_like(r.rewards, math.nan)) for r in results]
            )
        return RewardResult(
            rewards=torch.cat([r.rewards for r in results]),
            metrics=metrics,
            reasons=[x for r in results for x in r.reasons],
            transcripts=[x for r in results for x in (r.transcripts or [""] * len(r.rewards))]
            if any(r.transcripts for r in results) else [],
        )


@runtime_checkable
class Reward(Protocol):
    """Anything that scores a batch of speech samples: `score(samples: Sequence[SpeechSample]) -> RewardResult`.

    The annotations below are Any because the CLI (jsonargparse) accepts a class for a protocol only when its
    annotations equal the protocol's; with Any, a user's `def score(self, samples)` is accepted as it is."""

    def score(self, samples: Any) -> Any: ...


class RewardBase:
    """The optional members of the reward contract, with their defaults (a subclass overrides what it needs).

    start(trainer): called on every rank at the start of fit/validate (trainer None outside a Trainer), to start
        a process or a connection the reward owns (SharedReward's is a collective); default: nothing.
    close(): called when training ends or fails; default: nothing.
    max_concurrent_calls: `score` calls the rollout may have in flight at once (`--rollout.overlap_reward`);
        default 1 (calls one after the other).
    aggregation: how a reward combines components (CompositeReward: "sum" or "normalize_then_sum"); default
        "sum". Under "normalize_then_sum" a fixed penalty reward means nothing, which the rollout checks.
    codec: the SpeechDecoder this reward decodes with in this process, or None; a CompositeReward lends it
        to components without one. Not a class attribute (a torch module registers it as a submodule);
        read it with `codec_of`.
    """

    max_concurrent_calls: int = 1
    aggregation: Literal["sum", "normalize_then_sum"] = "sum"

    def start(self, trainer: Any = None) -> None:
        """Start what the reward owns (a process, a connection); every rank calls it. Default: nothing."""

    def close(self) -> None:
        """Release what `start` started. Default: nothing."""


def start_reward(reward: Reward, trainer: Any = None) -> None:
    """`reward.start(trainer)` where the reward declares it (RewardBase), else nothing."""
    start = getattr(reward, "start", None)
    if callable(start):
        start(trainer)


def close_reward(reward: Reward) -> None:
    """`reward.close()` where the reward declares it, else nothing."""
    close = getattr(reward, "close", None)
    if callable(close):
        close()


def concurrent_calls(reward: Reward) -> int:
    """How many `score` calls the reward takes at once: its `max_concurrent_calls`, default 1."""
    n = getattr(reward, "max_concurrent_calls", RewardBase.max_concurrent_calls)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{type(reward).__name__}.max_concurrent_calls={n!r} must be an int >= 1")
    return n


def aggregation_of(reward: Reward) -> str:
    """The reward's `aggregation`, default "sum"."""
    return getattr(reward, "aggregation", RewardBase.aggregation)


def codec_of(reward: Reward) -> Any:
    """The SpeechDecoder the reward decodes with in this process (its `codec`), or None when it has none here
    (a rule reward, a reward scored by an owner process or a server)."""
    return getattr(reward, "codec", None)


def takes_codec(reward: Reward) -> bool:
    """The reward has a `codec` member (a decoder, or None until one is lent), so a CompositeReward can lend it one."""
    return hasattr(reward, "codec")
