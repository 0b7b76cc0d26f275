"""The scoring server's micro-batcher: concurrent requests share `Reward.score` calls on one worker thread.

The original server scored one sample per request, one request at a time. Here concurrent requests are gathered
into one `Reward.score` call (at most `max_batch_size` samples, waiting at most `max_wait_ms` for company),
scored on a single worker thread that owns the model, and the results are routed back by position. A reward
exception fails only the requests of that batch: the batch is re-scored request by request so one poisoned
request cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .base import Reward, RewardResult, SpeechSample

log = logging.getLogger(__name__)


@dataclass
class _Job:
    samples: list[SpeechSample]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Gathers concurrent jobs into `Reward.score` calls of at most `max_batch_size` samples.

    The first job of a batch waits at most `max_wait_ms` for company; jobs that arrive while a batch is
    being scored are taken at once by the next batch. All scoring happens on one worker thread, which is
    also the thread that built the reward, so the model is never used concurrently.
    """

    def __init__(self, max_batch_size: int, max_wait_ms: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"--max-batch-size={max_batch_size} must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms={max_wait_ms} must be >= 0")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-worker")
        self.reward: Reward | None = None
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._carry: _Job | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # number of Reward.score calls, for logs and tests

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in ([self._carry] if self._carry else []) + [self._queue.get_nowait() for _ in range(self._queue.qsize())]:
            if not job.future.done():
                job.future.set_exception(RuntimeError("server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, samples: list[SpeechSample]) -> RewardResult:
        """Score one request's samples; requests larger than max_batch_size are split into chunks."""
        loop = asyncio.get_running_loop()
        jobs = []
        for start in range(0, len(samples), self.max_batch_size):
            job = _Job(samples[start:start + self.max_batch_size], loop.create_future())
            self._queue.put_nowait(job)
            jobs.append(job)
        results = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results[0] if len(results) == 1 else RewardResult.cat(results)

    async def _next_job(self, timeout: float | None) -> _Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return await self._queue.get()
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next_job(None)
            batch, n = [first], len(first.samples)
            deadline = first.enqueued + self.max_wait_s
            while n < self.max_batch_size:
                job = await self._next_job(deadline - time.monotonic())
                if job is None:
                    break
                if n + len(job.samples) > self.max_batch_size:
                    self._carry = job  # starts the next batch; chunks never exceed max_batch_size
                    break
                batch.append(job)
                n += len(job.samples)
            batch = [job for job in batch if not job.future.done()]  # drop requests whose client went away
            try:
                if batch:
                    await self._score_batch(loop, batch)
            except Exception as e:  # a bug here must fail these requests, not stop the batcher
                log.exception("micro-batcher failed on a batch")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)

    async def _score_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        samples = [s for job in batch for s in job.samples]
        try:
            result = await loop.run_in_executor(self.executor, self._score_checked, samples)
        except Exception as e:
            if len(batch) > 1:  # find the culprit: only its request may fail
                for job in batch:
                    await self._score_batch(loop, [job])
                return
            log.exception("reward failed on a batch of %d samples", len(samples))
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return
        start = 0
        for job in batch:
            stop = start + len(job.samples)
            if not job.future.done():
                job.future.set_result(result.rows(range(start, stop)))
            start = stop

    def _score_checked(self, samples: list[SpeechSample]) -> RewardResult:
        assert self.reward is not None
        self.batches += 1
        result = self.reward.score(samples)
        if result.rewards.shape != (len(samples),) or (result.transcripts and len(result.transcripts) != len(samples)):
            raise RuntimeError(
                f"{type(self.reward).__name__}.score returned {tuple(result.rewards.shape)} rewards "
                f"for {len(samples)} samples"
            )
        return result
