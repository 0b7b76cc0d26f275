"""The scoring app: any `Reward` (the Whisper reward in practice) behind FastAPI, micro-batched (batcher.py).

For the 2-train + 1-reward GPU layout of the original recipe: the reward runs on its own GPU in its own
process (`python -m lightning_grpo serve`, server.py) and the trainers score through
`lightning_grpo.reward.client.RemoteReward`.

Endpoints:
    POST /score   {"tokens": [codes], "text": str}               -> {"nll", "transcript", "cer", "reward", "reason", "metrics"}
                  {"samples": [{"tokens", "text", "language"?, "stopped"?, "truncated"?, "num_invalid"?,
                                "prompt_text"?, "prompt_codes"?, "prompt_audio"?, "prompt_wav"?}, ...]}
                                                                 -> {"results": [one answer per sample, in order]}
    GET  /healthz /readyz   200 {"status": "ok"} when the models are loaded, 503 {"status": "loading"} before,
                            503 {"status": "failed", "detail"} when loading failed (`serve` then exits with
                            code 1 and the reason, for a supervisor to restart it).
"tokens" are codec codes 0..codebook_size-1 (X-codec2: 65,536), not LLaSA vocabulary ids. Metrics that
were not measured for a sample (NaN in `RewardResult`) are null in JSON. The request body's schema and checks,
voice-cloning references included, are reward/request.py's.

In the original single-sample body `"nll"` is always finite, for the original client's `float(resp["nll"])`:
the measured NLL capped at `original_nll_cap` (100 nats/token), the cap itself where nothing was measured
(silent, invalid ids, ...). That client then scores such a sample ~1e-14 instead of taking its error fallback
on null, or dividing by zero once exp(-NLL/tau) underflows; `"metrics"` and the batched body keep null.

Unlike the original server (port 8000), it binds 127.0.0.1 by default, can require a bearer token, and answers
413 / 4xx (naming the field) to oversized or malformed bodies without ever going down.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..llasa import XCODEC2_CODEBOOK_SIZE
from .base import Reward, RewardResult
from .batcher import MicroBatcher
from .request import (
    DEFAULT_MAX_REFERENCE_SECONDS, DEFAULT_MAX_REQUEST_REFERENCE_SECONDS, BadRequest, RequestReferences, parse_body,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001  # WHISPER_SERVER=http://127.0.0.1:8001 (the original README's port; its code said 8000)

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
