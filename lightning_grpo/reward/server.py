"""HTTP scoring service: any `Reward` (the Whisper reward in practice) behind FastAPI, micro-batched.

For the 2-train + 1-reward GPU layout of the original recipe: the reward runs on its own GPU in its own
process and the trainers score through `lightning_grpo.reward.client.RemoteReward`.

    python -m lightning_grpo serve --port 8001 --model large-v3 --device cuda:0 --codec HKUSTAudio/xcodec2
    export WHISPER_SERVER=http://127.0.0.1:8001      # the client's default env var; matches --port 8001

Endpoints:
    POST /score   {"tokens": [codes], "text": str}               -> {"nll", "transcript", "cer", "reward", "reason", "metrics"}
                  {"samples": [{"tokens", "text", "language"?, "stopped"?, "truncated"?, "num_invalid"?,
                                "prompt_text"?, "prompt_codes"?, "prompt_audio"?, "prompt_wav"?}, ...]}
                                                                 -> {"results": [one answer per sample, in order]}
    GET  /healthz /readyz   200 {"status": "ok"} when the models are loaded, 503 {"status": "loading"} before,
                            503 {"status": "failed", "detail"} when loading failed (`serve` then exits with
                            code 1 and the reason, for a supervisor to restart it).
"tokens" are codec codes 0..codebook_size-1 (X-codec2: 65,536), not LLaSA vocabulary ids. Metrics that
were not measured for a sample (NaN in `RewardResult`) are null in JSON. A voice-cloning reference comes as
codes, as the recording itself (base64 `prompt_audio`), or as a file name under the operator's
`--reference-dir`; the server opens no other path a client names (reward/request.py).

In the original single-sample body `"nll"` is always finite, for the original client's `float(resp["nll"])`:
the measured NLL capped at `original_nll_cap` (100 nats/token), the cap itself where nothing was measured
(silent, invalid ids, ...). That client then scores such a sample ~1e-14 instead of taking its error fallback
on null, or dividing by zero once exp(-NLL/tau) underflows; `"metrics"` and the batched body keep null.

How it departs from the original server (one sample per request, handled one at a time, port 8000):
concurrent requests are gathered into one `Reward.score` call (at most `max_batch_size` samples, waiting at
most `max_wait_ms` for company), scored on a single worker thread that owns the model, and the results are
routed back by position. A reward exception fails only the requests of that batch: the batch is re-scored
request by request so one poisoned request cannot fail its neighbours. The server binds 127.0.0.1 by
default, can require a bearer token, and answers 413 / 4xx (naming the field) to oversized or malformed
bodies without ever going down.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import importlib
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..llasa import XCODEC2_CODEBOOK_SIZE
from .base import Reward, RewardResult, SpeechSample
from .request import (
    DEFAULT_MAX_REFERENCE_SECONDS, DEFAULT_MAX_REQUEST_REFERENCE_SECONDS, BadRequest, RequestReferences, parse_body,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001  # WHISPER_SERVER=http://127.0.0.1:8001 (the original README's port; its code said 8000)
TOKEN_ENV = "WHISPER_SERVER_TOKEN"

RewardFactory = Callable[[], Reward]


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def result_to_json(result: RewardResult) -> list[dict[str, Any]]:
    """One JSON-safe answer per sample (NaN metrics -> null)."""
    metrics = {name: value.tolist() for name, value in result.metrics.items()}
    out = []
    for i, reward in enumerate(result.rewards.tolist()):
        m = {name: _finite_or_none(values[i]) for name, values in metrics.items()}
        out.append({
            "reward": reward,
            "reason": result.reasons[i],
            "transcript": result.transcripts[i] if result.transcripts else "",
            "nll": m.get("nll"),
            "cer": m.get("cer"),
            "metrics": m,
        })
    return out


ORIGINAL_NLL_CAP = 100.0  # nats per token; exp(-100 / tau) > 0 in float64 for any tau > 0.14


def original_body(answer: dict[str, Any], nll_cap: float = ORIGINAL_NLL_CAP) -> dict[str, Any]:
    """The single-sample answer with a finite `"nll"` for the original client (see the module docstring)."""
    nll = answer.get("nll")
    return {**answer, "nll": nll_cap if nll is None else min(float(nll), nll_cap)}


def slice_result(result: RewardResult, start: int, stop: int) -> RewardResult:
    """Rows start..stop-1 of a result."""
    return RewardResult(
        rewards=result.rewards[start:stop],
        metrics={k: v[start:stop] for k, v in result.metrics.items()},
        reasons=result.reasons[start:stop],
        transcripts=result.transcripts[start:stop] if result.transcripts else [],
    )


# ------------------------------------------------------------------------------------------ micro-batcher


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
                job.future.set_result(slice_result(result, start, stop))
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


# -------------------------------------------------------------------------------------------------- app


def create_app(
    reward: Reward | RewardFactory,
    *,
    token: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_request_bytes: int = 8 * 1024 * 1024,
    max_request_samples: int = 256,
    codebook_size: int = XCODEC2_CODEBOOK_SIZE,
    original_nll_cap: float = ORIGINAL_NLL_CAP,
    allow_empty_tokens: bool = False,
    reference_dir: str | None = None,
    max_reference_seconds: float = DEFAULT_MAX_REFERENCE_SECONDS,
    max_request_reference_seconds: float = DEFAULT_MAX_REQUEST_REFERENCE_SECONDS,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The scoring app.

    Args:
        reward: a ready `Reward`, or a zero-argument factory that builds one; a factory runs on the
            worker thread at startup while /healthz answers 503 "loading".
        token: bearer token required on /score (None: no auth; health endpoints are always open).
        max_batch_size: most samples per `Reward.score` call (1 reproduces the original one-at-a-time server).
        max_wait_ms: how long the first request of a batch waits for others to join it.
        max_request_bytes: larger bodies answer 413.
        max_request_samples: batched bodies with more samples answer 413.
        codebook_size: codes must be in [0, codebook_size); 65,536 for X-codec2.
        original_nll_cap: `"nll"` of the original single-sample body: measured values are capped here and
            unmeasured ones (null elsewhere) answer it, so the original client never meets null or inf.
        allow_empty_tokens: pass samples without codes to the reward (a trainer's reward owner sends every
            sample); otherwise they answer 422, as the original server's clients expect.
        reference_dir: the only directory whose files a sample's `prompt_wav` may name (None: no paths).
        max_reference_seconds: longest reference (codes, upload or file) of one sample; longer ones answer 413.
        max_request_reference_seconds: the distinct references of one body together; more answer 413.
        on_load_failure: called with the reason when building the reward fails (`serve` stops the process).
    """
    if max_request_bytes < 1 or max_request_samples < 1 or codebook_size < 1:
        raise ValueError("--max-request-bytes, --max-batch-samples and --codebook-size must be >= 1")
    if not max_request_reference_seconds >= max_reference_seconds:
        raise ValueError(f"--max-request-reference-seconds={max_request_reference_seconds} must be >= "
                         f"--max-reference-seconds={max_reference_seconds}")
    references = RequestReferences(reference_dir, max_reference_seconds)
    if not 0 < original_nll_cap < 700:  # exp(-cap / tau) must not underflow for the usual tau >= 1
        raise ValueError(f"--original-nll-cap={original_nll_cap} must be in (0, 700); the default is {ORIGINAL_NLL_CAP}")
    is_factory = isinstance(reward, type) or not hasattr(reward, "score")  # a class is a factory too
    state: dict[str, Any] = {"status": "loading", "detail": None}
    batcher_box: dict[str, MicroBatcher] = {}

    def load(batcher: MicroBatcher) -> None:
        try:
            batcher.reward = reward() if is_factory else reward  # type: ignore[operator]
            if not isinstance(batcher.reward, Reward):
                raise TypeError(f"reward factory returned {type(batcher.reward).__name__}, which has no score()")
            state["status"] = "ok"
            log.info("reward %s ready", type(batcher.reward).__name__)
        except BaseException as e:  # report, don't die: /healthz says why, clients fail loudly
            log.exception("loading the reward failed")
            state["status"], state["detail"] = "failed", f"{type(e).__name__}: {e}"
            if on_load_failure is not None:
                on_load_failure(state["detail"])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = MicroBatcher(max_batch_size, max_wait_ms)
        batcher_box["b"] = batcher
        app.state.batcher = batcher
        batcher.start()
        loop = asyncio.get_running_loop()
        loop.run_in_executor(batcher.executor, load, batcher)  # same thread as scoring
        try:
            yield
        finally:
            await batcher.stop()
            references.close()

    app = FastAPI(title="lightning_grpo scoring server", lifespan=lifespan)
    app.state.load = state

    def health() -> JSONResponse:
        code = 200 if state["status"] == "ok" else 503
        body = {"status": state["status"]}
        if state["detail"]:
            body["detail"] = state["detail"]
        return JSONResponse(body, status_code=code)

    app.get("/healthz")(health)
    app.get("/readyz")(health)

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        try:
            if token is not None:
                auth = request.headers.get("authorization", "")
                if not hmac.compare_digest(auth.encode(), f"Bearer {token}".encode()):
                    raise BadRequest(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
                raise BadRequest(413, f"body of {declared} bytes exceeds --max-request-bytes={max_request_bytes}")
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > max_request_bytes:
                    raise BadRequest(413, f"body exceeds --max-request-bytes={max_request_bytes}")
            if state["status"] != "ok":
                raise BadRequest(503, f"reward is {state['status']}: {state['detail'] or 'retry later'}")
            body = parse_body(bytes(raw), codebook_size, max_request_samples, allow_empty_tokens, references,
                              max_request_reference_seconds)
            try:
                result = await batcher_box["b"].score(body.samples)
            except Exception as e:
                raise BadRequest(500, f"reward failed: {type(e).__name__}: {e}")
            finally:
                references.release(body.uploads)
        except BadRequest as e:
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            return JSONResponse({"detail": e.detail}, status_code=e.status, headers=headers)
        answers = result_to_json(result)
        return JSONResponse({"results": answers} if body.batched else original_body(answers[0], original_nll_cap))

    return app


def serve(reward: Reward | RewardFactory, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          log_level: str = "info", **app_kwargs: Any) -> None:
    """Run the app with uvicorn until interrupted; `app_kwargs` go to `create_app`."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the scoring server is reachable from other machines%s", host,
                    "" if app_kwargs.get("token") else " and has no --token")

    def stop(reason: str) -> None:  # a supervisor restarts a process that exits, not one that answers 503 forever
        server.should_exit = True

    app = create_app(reward, on_load_failure=stop, **app_kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                           timeout_keep_alive=30))
    server.run()
    if app.state.load["status"] == "failed":
        raise SystemExit(f"scoring server: building the reward failed: {app.state.load['detail']}")


# -------------------------------------------------------------------------------------------------- CLI


def _instantiate(value: Any) -> Any:
    """Build `{class_path, init_args}` mappings (nested ones too, e.g. a codec); other values pass through."""
    if isinstance(value, dict) and "class_path" in value:
        class_path = value["class_path"]
        if not isinstance(class_path, str) or "." not in class_path:
            raise ValueError(f"class_path must be 'package.module.Class', got {class_path!r}")
        module_name, _, name = class_path.rpartition(".")
        target = getattr(importlib.import_module(module_name), name)
        return target(**{k: _instantiate(v) for k, v in (value.get("init_args") or {}).items()})
    if isinstance(value, dict):
        return {k: _instantiate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_instantiate(v) for v in value]
    return value


def reward_from_config(path: str) -> Reward:
    """Build a reward from YAML `{class_path: pkg.mod.Class, init_args: {...}}` (nested class_paths too)."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict) or "class_path" not in cfg:
        raise ValueError(f"--reward-config {path}: needs 'class_path: package.module.Class' and optional 'init_args'")
    return _instantiate(cfg)


def reward_from_factory_file(path: str) -> Reward:
    """Build the reward by calling the zero-argument callable pickled in `path` (see --reward-factory)."""
    import pickle

    with open(path, "rb") as f:
        factory = pickle.load(f)
    if not callable(factory):
        raise TypeError(f"--reward-factory {path} holds a {type(factory).__name__}, not a callable that builds a reward")
    return factory()


def build_whisper_reward(model: str, device: str, codec: str | None, language: str | None, batch_size: int,
                         dtype: str = "float32") -> Reward:
    """The Whisper reward module on `device`; imported here so the server imports without Whisper weights.

    language None keeps WhisperReward's default; "auto" detects the language per sample.
    """
    from .module import WhisperReward

    kwargs: dict[str, Any] = {"whisper_model": model, "device": device, "batch_size": batch_size, "dtype": dtype}
    if codec is not None:
        kwargs["codec"] = codec
    if language is not None:
        kwargs["language"] = None if language == "auto" else language
    return WhisperReward(**kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_grpo serve",
        description="Serve a reward over HTTP (POST /score, GET /healthz). Point trainers at it with "
        f"WHISPER_SERVER=http://127.0.0.1:{DEFAULT_PORT} (the default --host/--port).",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="interface to bind; 0.0.0.0 exposes the server (use --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port; WHISPER_SERVER=http://127.0.0.1:8001 matches the default")
    p.add_argument("--model", default="large-v3", help="Whisper model name openai-whisper accepts, or a checkpoint path")
    p.add_argument("--device", default="cuda:0", help="device of the codec and Whisper (cuda:N or cpu)")
    p.add_argument("--codec", default=None, help="X-codec2 checkpoint: HF id (HKUSTAudio/xcodec2) or local dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="Whisper and codec precision; float16 halves memory and time on CUDA")
    p.add_argument("--language", default=None, help="language of the texts (en, ko, ...; 'auto' detects; default: WhisperReward's); a sample's 'language' overrides")
    p.add_argument("--token", default=None, help=f"bearer token required on /score (default: ${TOKEN_ENV}, else none)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most samples per reward call (1 = one at a time, as the original)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to share its batch")
    p.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies answer 413")
    p.add_argument("--max-batch-samples", type=int, default=256, help="most samples in one batched body (more: 413)")
    p.add_argument("--codebook-size", type=int, default=XCODEC2_CODEBOOK_SIZE, help="codes must be < this (X-codec2: 65536)")
    p.add_argument("--original-nll-cap", type=float, default=ORIGINAL_NLL_CAP,
                   help="'nll' of the original single-sample body: measured values capped here, unmeasured ones answer it")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--reference-dir", default=None,
                   help="directory whose recordings a sample's prompt_wav may name (default: none; clients send "
                   "prompt_audio or prompt_codes); no path outside it is opened, symlinks and '..' included")
    p.add_argument("--max-reference-seconds", type=float, default=DEFAULT_MAX_REFERENCE_SECONDS,
                   help="longest reference clip of one sample (codes, prompt_audio or prompt_wav); longer: 413")
    p.add_argument("--max-request-reference-seconds", type=float, default=DEFAULT_MAX_REQUEST_REFERENCE_SECONDS,
                   help="the distinct reference clips of one body together; more: 413")
    p.add_argument("--allow-empty-tokens", action="store_true",
                   help="score samples without codes with the reward itself instead of answering 422 (reward owners)")
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                   help="stop when process PID is gone (a trainer's reward owner must not outlive the trainer)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--reward-config", default=None, help="YAML {class_path, init_args} of the reward to serve instead of Whisper")
    group.add_argument("--reward-factory", default=None,
                       help="a pickled zero-argument callable that builds the reward (written by the trainer for its "
                       "reward owner, lightning_grpo.reward.owner; load only files you wrote: unpickling runs code)")
    group.add_argument("--fake-reward", choices=["rule"], default=None, help="serve the rule reward (tests; no Whisper)")
    return p


def _exit_with_parent(pid: int, poll_s: float = 1.0) -> None:
    """A daemon thread that stops this server (SIGTERM to itself, then exit) once `pid` is no longer its parent:
    an owner whose trainer was SIGKILLed must not hold the reward GPU forever."""
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(poll_s)
        log.warning("parent process %d is gone: the scoring server stops", pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(15)
        os._exit(1)

    if os.getppid() != pid:
        raise SystemExit(f"--exit-with-parent {pid}: that process is not this server's parent (it is {os.getppid()})")
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """`python -m lightning_grpo serve ...`: parse flags and serve until interrupted."""
    args = build_parser().parse_args(argv)
    if args.exit_with_parent is not None:
        _exit_with_parent(args.exit_with_parent)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.fake_reward == "rule":
        from .rule import RuleReward

        factory: RewardFactory = RuleReward
    elif args.reward_config:
        factory = lambda: reward_from_config(args.reward_config)  # noqa: E731
    elif args.reward_factory:
        factory = lambda: reward_from_factory_file(args.reward_factory)  # noqa: E731
    else:
        factory = lambda: build_whisper_reward(args.model, args.device, args.codec, args.language, args.max_batch_size, args.dtype)  # noqa: E731
    serve(
        factory, host=args.host, port=args.port, log_level=args.log_level,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_request_bytes=args.max_request_bytes, max_request_samples=args.max_batch_samples,
        codebook_size=args.codebook_size, original_nll_cap=args.original_nll_cap,
        allow_empty_tokens=args.allow_empty_tokens, reference_dir=args.reference_dir,
        max_reference_seconds=args.max_reference_seconds,
        max_request_reference_seconds=args.max_request_reference_seconds,
    )


if __name__ == "__main__":
    main()
