"""Scoring one rollout's samples piece by piece, inline or on worker threads while generation goes on.

The rollout callback hands `RewardScoring.submit` each piece of finished completions as the sampler
streams it. Sequential (`--rollout.overlap_reward false`): the piece is scored right there, and the trainer
waits. Overlapped: the piece goes to a worker thread and generation continues; `Rollout.wait_for_rewards`
collects the results later (in `training_step`, after the log-probs that need no reward). Both modes score
the same pieces in the same `Reward.score` calls, so an in-process reward gives bit-identical rewards.

Threads, not processes: an in-process reward runs on one worker thread (models are not thread-safe), with
autograd off as in the sequential path; a reward that only waits on I/O (`RemoteReward`, `SharedReward` with
an owner process) declares `max_concurrent_calls > 1`, so pieces are in flight together and the owner batches
them. The GIL: torch kernels and HTTP waits release it, Python-heavy reward code does not, so on a CPU an
in-process reward competes with generation for the cores; an owner process (`reward/owner.py`) does not.
A reward scored concurrently must not draw from torch's global random generator, which generation shares.

Failure under DDP: a reward that fails (an owner that died, a model that raised) must stop every rank, not leave
the others in the next collective (gloo: an error that says nothing; NCCL: a hang). So a failed piece is kept,
not raised: later pieces are no longer scored, generation runs to its end (tensor-parallel engines step in
lockstep), and `result()` raises on every rank at once, after one all_gather of each rank's error, with the
failing rank's own message (which names the owner's log).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

from .distributed import raise_on_every_rank
from .reward.base import Reward, RewardResult, SpeechSample


def reorder(result: RewardResult, rows: Sequence[int]) -> RewardResult:
    """`result` row k belongs to sample rows[k]; returns the result in sample order 0..N-1."""
    n = len(rows)
    if sorted(rows) != list(range(n)):
        raise RuntimeError(f"scored rows {sorted(rows)[:8]}... are not each sample exactly once (0..{n - 1})")
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor(list(rows), dtype=torch.long)] = torch.arange(n)
    return result.rows(inverse.tolist())


def busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: the time at least one call was running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def stop_if_any_rank_failed(error: BaseException | None) -> None:
    """Raise on every rank if the reward failed on any (this rank's own error, else the first failing rank's
    message). A collective: each rank calls it once per scored round, a rank that scored nothing this round
    (dynamic sampling's generate-only round) with None."""
    raise_on_every_rank(error, "the reward")


class _NotScored(Exception):
    """A piece skipped because an earlier piece of the rollout failed (that failure is what result() raises)."""


class RewardScoring:
    """The scores of one rollout, submitted piece by piece; implements `batch.PendingRewards`."""

    def __init__(
        self,
        reward: Reward,
        executor: ThreadPoolExecutor | None,
        finalize: Callable[[RewardResult], torch.Tensor],
    ) -> None:
        """
        Args:
            reward: scores a list of samples.
            executor: worker threads for overlapped scoring; None scores each piece inline.
            finalize: the reward result in sample order -> the (N,) rewards the trainer uses (truncation policy,
                device).
        """
        self.reward = reward
        self.executor = executor
        self.finalize = finalize
        self._pieces: list[tuple[list[int], Future | RewardResult]] = []
        self._intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self.wait_s = 0.0  # the caller's time blocked on scoring: inline calls, or waiting for workers
        self.error: BaseException | None = None  # the first failure; later pieces are not scored
        self._stopped: BaseException | None = None  # what result() raised after the ranks agreed to stop
        self._failed = threading.Event()  # a piece failed: pieces that start later are not scored

    def _score(self, samples: list[SpeechSample]) -> RewardResult:
        if self._failed.is_set():
            # a piece queued behind a failed one: the step is lost, and waiting on the reward again (a request's
            # whole retry budget) would keep the other ranks in their collective that much longer
            raise _NotScored()
        start = time.perf_counter()
        try:
            with torch.no_grad():  # grad mode is per thread; the sequential path scored under no_grad too
                result = self.reward.score(samples)
            if result.rewards.shape != (len(samples),):
                raise RuntimeError(
                    f"{type(self.reward).__name__}.score returned {tuple(result.rewards.shape)} rewards for "
                    f"{len(samples)} samples"
                )
        except Exception:
            self._failed.set()
            raise
        finally:
            with self._lock:
                self._intervals.append((start, time.perf_counter()))
        return result

    def submit(self, rows: list[int], samples: list[SpeechSample]) -> None:
        """Score `samples` (the samples of rollout rows `rows`), now or on a worker."""
        if len(rows) != len(samples):
            raise ValueError(f"{len(rows)} rows for {len(samples)} samples")
        if not samples:
            return
        for _, piece in self._pieces:
            if (self.error is None and isinstance(piece, Future) and piece.done()
                    and piece.exception() is not None and not isinstance(piece.exception(), _NotScored)):
                self.error = piece.exception()
        if self.error is not None:
            return  # the step is lost: no more scoring (result() raises)
        if self.executor is None:
            start = time.perf_counter()
            try:
                self._pieces.append((rows, self._score(samples)))
            except Exception as e:
                self.error = e
            finally:
                self.wait_s += time.perf_counter() - start
        else:
            self._pieces.append((rows, self.executor.submit(self._score, samples)))

    def result(self) -> tuple[torch.Tensor, RewardResult, dict[str, float]]:
        """Wait for every piece; (rewards, result in sample order, {"reward": busy s, "reward_wait": blocked s})."""
        if self._stopped is not None:  # read again after a failure: raise it again, with no second collective
            raise self._stopped  # (only the rank that reads again would enter it, and wait forever)
        start = time.perf_counter()
        parts = []
        for _, piece in self._pieces:
            try:
                parts.append(piece if isinstance(piece, RewardResult) else piece.result())
            except _NotScored:
                pass
            except Exception as e:
                self.error = self.error or e
        if self.executor is not None:
            self.wait_s += time.perf_counter() - start
        # every rank reaches this point once per rollout: all stop together if any rank's reward failed
        try:
            stop_if_any_rank_failed(self.error)
        except BaseException as e:
            self._stopped = e
            raise
        rows = [r for piece_rows, _ in self._pieces for r in piece_rows]
        result = reorder(parts[0] if len(parts) == 1 else RewardResult.cat(parts), rows)
        with self._lock:
            busy = busy_seconds(self._intervals)
        return self.finalize(result), result, {"reward": busy, "reward_wait": self.wait_s}
