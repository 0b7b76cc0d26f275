"""The reward seam: what the rollout callback hands a reward and what it gets back.

Every reward (the rule rewards below, the Whisper reward module, the HTTP client) implements
`Reward.score(samples) -> RewardResult`. A reward never raises for one bad sample: it gives that
sample a defined reward and a reason string, which the trainer logs as a fraction per reason.
A reward raises only when it cannot score at all (a dead server after retries, a broken model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

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
    """Anything that scores a batch of speech samples."""

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult: ...
