"""Several rewards as one: intelligibility + speaker similarity + duration + prosody floor + naturalness (DNSMOS),
weighted, optionally GDPO-normalised.

    sum                 reward = sum_k w_k * r_k
    normalize_then_sum  reward = sum_k w_k * z_k,  z_k = (r_k - mean_group(r_k)) / std_group(r_k)

`normalize_then_sum` standardises each component within the completions of one prompt before weighting
(GDPO; TRL's `normalize_then_sum`; verl-omni's TTS recipes), so a component with a wide spread (CER-based
reward) cannot drown one with a narrow spread (SIM) and the weights mean what they say. The std is the unbiased
one, as grpo.group_advantages uses; a component that is constant within a group (std <= eps, or a group of one
completion) contributes exactly 0 there, never a NaN. Groups come from `SpeechSample.group`, which GRPORollout
sets to the prompt's index, so the composite needs no group size of its own and serves training (G) and
validation (val_group_size) alike. The result is centred per group: read the components' levels, not the
reward's, in the logs (`reward/weighted_sum` is the weighted sum of the raw components). Under it use
`rollout.truncation: mask` or `keep`, not `penalize`: a fixed truncation_reward of 0 is the group's mean on
this scale, not a penalty (GRPORollout refuses the pair). Run it in the trainer process, composing a
RemoteReward with local components, not behind the scoring server, whose micro-batches mix groups of several
requests (the server does not carry `group`, so a composite there refuses normalize_then_sum).

Logged per sample (RewardResult.metrics, so the policy logs `train/reward/<name>_mean` and evaluation reports
carry one column each): `reward/<name>` is component <name>'s reward; every metric a component reports
(cer, nll, sim, duration_s, ...) passes through under its own name, or as `<name>/<metric>` when two
components report the same one. A sample's reason is the first non-`ok` reason of its components, in the
order they are listed; transcripts come from the first component that gives any. A component that raises
stops the step with an error naming it.

Decoding once: X-codec2 decoding is the most expensive stage of a CPU reward call (BENCHMARKS.md, "Whisper reward throughput").
With `share_codec` (default) the first component that has a codec lends it, behind a per-call cache, to every
component whose `codec` is null (SpeakerSimilarityReward's default) and keeps using it itself, so each code
sequence is decoded once per `score` call, whichever component asks first.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Iterator, Literal, Sequence

import torch

from .base import OK, Reward, RewardBase, RewardResult, SpeechSample, close_reward, codec_of, start_reward, takes_codec
from .codec import SpeechDecoder

Aggregation = Literal["sum", "normalize_then_sum"]


def standardize_within_groups(values: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """values: (N,), groups: (N,) int ids (any order) -> (N,) float32 (x - group mean) / group std (unbiased).

    A group whose std is <= eps, or that has one member, gives exactly 0 to every member.
    """
    values = values.double()
    out = torch.zeros_like(values)
    for g in groups.unique():
        idx = (groups == g).nonzero(as_tuple=True)[0]
        x = values[idx]
        if x.numel() < 2:
            continue
        std = x.std()
        if std > eps:
            out[idx] = (x - x.mean()) / std
    return out.float()


class CallCache(torch.nn.Module):
    """A SpeechDecoder that remembers each code sequence it decoded while a `session()` is open.

    Outside a session it decodes as the wrapped decoder does (the audio logger uses it that way). A session
    belongs to the thread that opened it, so a reward scored in a worker thread and a logger decoding in the
    main thread do not share one. The cached waveforms are shared between callers: treat them as read-only.
    """

    def __init__(self, inner: SpeechDecoder) -> None:
        super().__init__()
        self.inner = inner
        self.sample_rate = inner.sample_rate
        self._local = threading.local()  # .cache: dict[tuple[int, ...], Tensor] while a session is open
        self.decoded = 0  # sequences decoded by the wrapped decoder (tests and benchmarks count them)

    # rewards travel to DDP-spawned workers by pickle; a thread-local cannot, and a session never spans processes
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._local = threading.local()

    @contextmanager
    def session(self) -> Iterator[None]:
        self._local.cache = {}
        try:
            yield
        finally:
            self._local.cache = None

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        cache = getattr(self._local, "cache", None)
        if cache is None:
            self.decoded += len(codes)
            return self.inner.decode(codes)
        keys = [tuple(int(c) for c in seq) for seq in codes]
        missing = [k for k in dict.fromkeys(keys) if k not in cache]
        if missing:
            self.decoded += len(missing)
            for k, audio in zip(missing, self.inner.decode([list(k) for k in missing])):
                cache[k] = audio
        return [cache[k] for k in keys]


class CompositeReward(RewardBase):
    """Weighted rewards, summed or normalised within groups then summed (module docstring)."""

    def __init__(
        self,
        rewards: dict[str, Reward],
        weights: dict[str, float] | None = None,
        aggregation: Aggregation = "sum",
        share_codec: bool = True,
        eps: float = 1e-6,
    ) -> None:
        """
        Args:
            rewards: name -> reward, each a `class_path` in YAML (`whisper: {class_path: ...WhisperReward}`). Names
                become log keys (`reward/<name>`); the order sets which reason and transcript a sample reports.
            weights: name -> weight, one per reward (None: all 1). A weight of 0 scores and logs a component
                without training on it (a monitor).
            aggregation: `sum` (weighted sum of the raw rewards, TRL's reward_weights) or `normalize_then_sum`
                (each component standardised within its prompt's group first, GDPO).
            share_codec: components whose codec is null use the first component's codec, and all of them
                decode each code sequence once per call.
            eps: under normalize_then_sum, a component whose group std is <= eps contributes 0 to that group.
        """
        if not rewards:
            raise ValueError("--rewards is empty: list at least one reward, e.g. whisper: {class_path: ...}")
        for name in rewards:
            if not name or "/" in name or name != name.strip():
                raise ValueError(f"reward name {name!r} must be non-empty, without '/' or surrounding spaces")
        weights = {name: 1.0 for name in rewards} if weights is None else dict(weights)
        missing, unknown = set(rewards) - set(weights), set(weights) - set(rewards)
        if missing or unknown:
            raise ValueError(
                f"--weights must name exactly the rewards {sorted(rewards)}: "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        bad = {k: v for k, v in weights.items() if not math.isfinite(float(v))}
        if bad:
            raise ValueError(f"--weights {bad} must be finite numbers")
        if aggregation not in ("sum", "normalize_then_sum"):
            raise ValueError(f"--aggregation={aggregation!r} must be 'sum' or 'normalize_then_sum'")
        if eps < 0:
            raise ValueError(f"--eps={eps} must be >= 0")
        for name, reward in rewards.items():
            if not callable(getattr(reward, "score", None)):
                raise TypeError(f"reward {name!r} ({type(reward).__name__}) has no score(samples) method")
        self.rewards = dict(rewards)
        self.weights = {k: float(weights[k]) for k in rewards}
        self.aggregation = aggregation
        self.eps = eps
        self.codec: CallCache | None = self._share_codec() if share_codec else None
        self.timings: dict[str, float] = defaultdict(float)  # seconds per component, summed over calls

    def _share_codec(self) -> CallCache | None:
        owner = next((r for r in self.rewards.values() if codec_of(r) is not None), None)
        if owner is None:
            return None
        cache = owner.codec if isinstance(owner.codec, CallCache) else CallCache(owner.codec)
        for reward in self.rewards.values():
            if takes_codec(reward) and (reward is owner or codec_of(reward) is None):
                reward.codec = cache
        return cache

    def _score_component(self, name: str, samples: Sequence[SpeechSample]) -> RewardResult:
        reward = self.rewards[name]
        t0 = time.perf_counter()
        try:
            result = reward.score(samples)
        except Exception as err:
            raise RuntimeError(
                f"reward component {name!r} ({type(reward).__name__}) failed on {len(samples)} samples: "
                f"{type(err).__name__}: {err}"
            ) from err
        self.timings[name] += time.perf_counter() - t0
        if not isinstance(result, RewardResult) or result.rewards.shape != (len(samples),):
            got = tuple(result.rewards.shape) if isinstance(result, RewardResult) else type(result).__name__
            raise RuntimeError(f"reward component {name!r} returned {got} for {len(samples)} samples")
        return result

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        n = len(samples)
        with self.codec.session() if self.codec is not None else nullcontext():
            results = {name: self._score_component(name, samples) for name in self.rewards}
        raw = {name: r.rewards.float().cpu() for name, r in results.items()}
        weighted_sum = sum(self.weights[k] * raw[k] for k in raw)
        metrics = {f"reward/{k}": v for k, v in raw.items()}
        if self.aggregation == "normalize_then_sum":
            groups = self._groups(samples)
            rewards = sum(self.weights[k] * standardize_within_groups(raw[k], groups, self.eps) for k in raw)
            metrics["reward/weighted_sum"] = weighted_sum
        else:
            rewards = weighted_sum
        metrics.update(_merged_metrics(results))
        reasons = [next((r.reasons[i] for r in results.values() if r.reasons[i] != OK), OK) for i in range(n)]
        transcripts = next((r.transcripts for r in results.values() if any(r.transcripts)), [])
        return RewardResult(rewards=torch.as_tensor(rewards).float().reshape(n), metrics=metrics,
                            reasons=reasons, transcripts=list(transcripts))

    def start(self, trainer=None) -> None:
        """Start the components that own a process or a connection (a SharedReward's start is a collective: every
        rank starts the same components in the same order)."""
        for reward in self.rewards.values():
            start_reward(reward, trainer)

    def close(self) -> None:
        for reward in self.rewards.values():
            close_reward(reward)

    @staticmethod
    def _groups(samples: Sequence[SpeechSample]) -> torch.Tensor:
        if any(s.group is None for s in samples):
            raise ValueError(
                "aggregation normalize_then_sum standardises each reward within a prompt's group, but samples carry "
                "no group (SpeechSample.group; GRPORollout sets it). Score through GRPORollout, or use aggregation sum"
            )
        return torch.tensor([int(s.group) for s in samples])


def _merged_metrics(results: dict[str, RewardResult]) -> dict[str, torch.Tensor]:
    """Every component's metrics under their own names, prefixed `<component>/` where two components share one."""
    owners: dict[str, list[str]] = defaultdict(list)
    for name, r in results.items():
        for metric in r.metrics:
            owners[metric].append(name)
    out = {}
    for name, r in results.items():
        for metric, value in r.metrics.items():
            key = metric if len(owners[metric]) == 1 else f"{name}/{metric}"
            out[key] = value.float().cpu()
    return out
