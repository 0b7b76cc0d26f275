"""`RemoteReward`: the reward seam backed by the HTTP scoring server (`lightning_grpo.reward.server`).

Used by the training loop when a server URL is configured (the `url` argument, or the `WHISPER_SERVER`
environment variable as in the original recipe, e.g. http://127.0.0.1:8001). Unlike the original client,
a server that cannot be reached or keeps failing is never turned into a silent zero reward: requests are
retried with exponential backoff on connection errors, timeouts and 5xx answers, and then `score` raises
a RuntimeError that names the URL, within `give_up_after_s` (kept under the process group's timeout, so the
other ranks of a run get the error instead of being killed while they wait). A 4xx answer (a bug in what we
send) raises at once.

Samples with no speech codes are scored here, not sent (the server rejects empty token lists): reward 0,
reason "invalid_token" when the span held non-speech ids, else "empty_speech" (the same reasons the reward
module gives), CER 1 and NLL not measured. Everything else is sent in batched bodies of at most
`max_samples_per_request` samples over one persistent connection pool.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from typing import Any, Sequence

import httpx
import torch

from .base import RewardBase, RewardResult, SpeechSample

log = logging.getLogger(__name__)

URL_ENV = "WHISPER_SERVER"
TOKEN_ENV = "WHISPER_SERVER_TOKEN"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class RemoteReward(RewardBase):
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_samples_per_request: int = 64,
        ready_timeout_s: float = 900.0,
        max_concurrent_calls: int = 4,
        give_up_after_s: float = 600.0,
    ) -> None:
        """
        Args:
            url: base URL of the scoring server, e.g. http://127.0.0.1:8001; None reads $WHISPER_SERVER.
            token: bearer token the server was started with; None reads $WHISPER_SERVER_TOKEN (may be unset).
            timeout_s: read timeout of one request; a batch of long clips on a busy server can take minutes.
            connect_timeout_s: TCP connect timeout.
            max_retries: retries after the first attempt on connection errors, timeouts and 5xx answers,
                before `score` raises. 0 fails on the first error.
            backoff_s: wait before the first retry; doubled at each retry (with jitter), capped by max_backoff_s.
            max_backoff_s: longest wait between two retries.
            max_samples_per_request: samples per HTTP body; must not exceed the server's --max-batch-samples.
            ready_timeout_s: how long the first call waits for a server that answers "loading" (large-v3
                takes a while to load) before raising.
            max_concurrent_calls: `score` calls the rollout may have in flight at once while it overlaps
                scoring with generation (`--rollout.overlap_reward`); the server batches them together. The
                client is thread-safe (httpx's Client is).
            give_up_after_s: the most one `score` call waits, every request, retry and backoff included, before it
                raises: a request is cut short and no retry starts past it. Under DDP the other ranks wait for the
                failing one in their next collective, which the process group aborts after its timeout (30 min by
                default): a scoring request already in flight when another failed may run its own course, so
                `start` requires twice this to stay under `--trainer.strategy.init_args.timeout`.
        """
        url = url or os.environ.get(URL_ENV)
        if not url:
            raise ValueError(
                f"no scoring server URL: pass RemoteReward(url=...) (config key url) or set {URL_ENV}="
                "http://127.0.0.1:8001 (the default of `python -m lightning_grpo serve`)"
            )
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"scoring server URL {url!r} must start with http:// or https://")
        if max_retries < 0 or backoff_s < 0 or max_samples_per_request < 1 or max_concurrent_calls < 1:
            raise ValueError("max_retries and backoff_s must be >= 0, max_samples_per_request and max_concurrent_calls >= 1")
        if not give_up_after_s > 0:
            raise ValueError(f"give_up_after_s={give_up_after_s} must be > 0 (seconds one score call may wait)")
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_samples_per_request = max_samples_per_request
        self.ready_timeout_s = ready_timeout_s
        self.max_concurrent_calls = max_concurrent_calls
        self.give_up_after_s = give_up_after_s
        self._client: httpx.Client | None = None
        self._ready = False
        self._lock = threading.Lock()

    # The client is built lazily so the reward can be pickled into worker processes (DDP spawn).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _ready=False, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            # trust_env=False: an HTTP(S)_PROXY meant for the internet must not capture the reward server.
            self._client = httpx.Client(
                base_url=self.url, headers=headers, trust_env=False,
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            )
        return self._client

    def start(self, trainer: Any = None) -> None:
        """Called by the rollout callback's setup on every rank: refuse a retry budget that outlasts the process
        group's timeout (then the other ranks would be killed before this rank's error reached them)."""
        check_retry_budget(self.give_up_after_s, trainer, "give_up_after_s")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "RemoteReward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- HTTP

    def _fail(self, what: str, err: str, attempts: int) -> RuntimeError:
        return RuntimeError(
            f"scoring server {self.url} {what} after {attempts} attempt(s): {err}. {self._advice()}"
        )

    def _advice(self) -> str:
        """What the user should check when the server fails (a subclass that runs the server knows more)."""
        return (f"Check that the server is running (python -m lightning_grpo serve ...) and that {URL_ENV} / "
                "RemoteReward(url=...) points at it")

    def _give_up(self) -> str | None:
        """Why retrying is pointless now (e.g. the server's process is gone), or None to keep retrying."""
        return None

    def _sleep_unless_gone(self, seconds: float, poll_s: float = 0.1) -> str | None:
        """Sleep `seconds`, unless `_give_up` finds a reason first (a dead server is not waited for)."""
        deadline = time.monotonic() + seconds
        while True:
            gone = self._give_up()
            left = deadline - time.monotonic()
            if gone or left <= 0:
                return gone
            time.sleep(min(poll_s, left))

    def _request(self, method: str, path: str, body: Any = None, deadline: float | None = None) -> httpx.Response:
        """One request with retries; returns the first answer that is not retryable. With a `deadline`
        (time.monotonic()) no request outlasts it and no retry starts that would."""
        err = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise self._fail(f"{method} {path} failed", f"{err}; gave up after "
                                     f"give_up_after_s={self.give_up_after_s}", attempt)
                log.warning("scoring server %s: %s; retry %d/%d in %.1fs", self.url, err, attempt, self.max_retries, delay)
                gone = self._sleep_unless_gone(delay)
                if gone:
                    raise self._fail(f"{method} {path} failed", f"{err}; {gone}", attempt)
            timeout = httpx.USE_CLIENT_DEFAULT
            if deadline is not None:
                left = max(0.001, deadline - time.monotonic())
                timeout = httpx.Timeout(min(self.timeout_s, left), connect=min(self.connect_timeout_s, left))
            try:
                response = self.client.request(method, path, json=body, timeout=timeout)
            except httpx.TransportError as e:  # connect / read / write errors and timeouts
                err = f"{type(e).__name__}: {e}"
                continue
            if response.status_code not in _RETRY_STATUS:
                return response
            err = f"HTTP {response.status_code}: {_detail(response)}"
            if path == "/healthz" and response.status_code == 503:
                return response  # "loading" is answered by _ensure_ready's own wait
        raise self._fail(f"{method} {path} failed", err, self.max_retries + 1)

    def _ensure_ready(self) -> None:
        with self._lock:
            if self._ready:
                return
            deadline = time.monotonic() + self.ready_timeout_s
            while True:
                response = self._request("GET", "/healthz")
                status = _json(response).get("status")
                if response.status_code == 200 and status == "ok":
                    self._ready = True
                    return
                if status == "failed" or response.status_code != 503:
                    raise RuntimeError(
                        f"scoring server {self.url} is not usable: HTTP {response.status_code} {_detail(response)}. "
                        f"{self._advice()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"scoring server {self.url} still loading after ready_timeout_s={self.ready_timeout_s}. "
                        f"{self._advice()}"
                    )
                gone = self._sleep_unless_gone(min(2.0, max(0.05, self.backoff_s)))
                if gone:
                    raise RuntimeError(f"scoring server {self.url} stopped while loading: {gone}. {self._advice()}")

    def _score_remote(self, samples: Sequence[SpeechSample], deadline: float | None = None) -> list[dict[str, Any]]:
        body = {"samples": [_sample_json(s) for s in samples]}
        response = self._request("POST", "/score", body, deadline)
        if response.status_code != 200:
            raise RuntimeError(
                f"scoring server {self.url} rejected a batch of {len(samples)} samples: "
                f"HTTP {response.status_code} {_detail(response)}"
            )
        results = _json(response).get("results")
        if not isinstance(results, list) or len(results) != len(samples):
            raise RuntimeError(f"scoring server {self.url} answered {response.text[:200]!r} for {len(samples)} samples")
        return results

    # --------------------------------------------------------------------------------------------- seam

    send_empty = False  # a server started with --allow-empty-tokens scores samples without codes itself

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        """Score samples on the server, in order; raises RuntimeError naming the URL if it cannot."""
        answers: list[dict[str, Any] | None] = [None] * len(samples)
        remote = [i for i, s in enumerate(samples) if len(s.codes) > 0 or self.send_empty]
        for i, s in enumerate(samples):
            if not s.codes and not self.send_empty:
                reason = "invalid_token" if s.num_invalid else "empty_speech"
                answers[i] = {"reward": 0.0, "reason": reason, "transcript": "",
                              "metrics": {"cer": 1.0, "cer_raw": 1.0, "nll": None}}
        if remote:
            self._ensure_ready()
        deadline = time.monotonic() + self.give_up_after_s
        for start in range(0, len(remote), self.max_samples_per_request):
            chunk = remote[start:start + self.max_samples_per_request]
            for i, answer in zip(chunk, self._score_remote([samples[i] for i in chunk], deadline)):
                answers[i] = answer
        return _to_result(answers)  # type: ignore[arg-type]


def check_retry_budget(give_up_after_s: float, trainer: Any, flag: str) -> None:
    """ValueError if a rank that fails to score could raise later than the process group lets the others wait:
    `give_up_after_s` for its own request, and as long again for one already in flight beside it."""
    from ..distributed import process_group_timeout_s

    limit = process_group_timeout_s(trainer)
    if limit is not None and 2 * give_up_after_s >= limit:
        raise ValueError(
            f"--rollout.reward.{flag}={give_up_after_s:g}: a rank whose scoring fails may raise up to twice that "
            f"late, past the process group's timeout ({limit:g} s), so the other ranks would be killed in their "
            f"collective before its error reached them. Lower --rollout.reward.{flag} below {limit / 2:g} or raise "
            "--trainer.strategy.init_args.timeout"
        )


def _sample_json(s: SpeechSample) -> dict[str, Any]:
    """One sample of a /score body. The voice-cloning fields go only when set (a server of an earlier version
    rejects unknown fields); `group` never does: the server's micro-batches mix several requests' groups."""
    item = {"tokens": [int(c) for c in s.codes], "text": s.text, "language": s.language,
            "stopped": bool(s.stopped), "truncated": bool(s.truncated), "num_invalid": int(s.num_invalid)}
    if s.prompt_text is not None:
        item["prompt_text"] = s.prompt_text
    if s.prompt_codes:
        item["prompt_codes"] = [int(c) for c in s.prompt_codes]
    if s.prompt_wav is not None:
        item["prompt_wav"] = s.prompt_wav
    return item


def _to_result(answers: list[dict[str, Any]]) -> RewardResult:
    names = sorted({name for a in answers for name in (a.get("metrics") or {})})
    metrics = {
        name: torch.tensor(
            [_nan_if_none((a.get("metrics") or {}).get(name)) for a in answers], dtype=torch.float32
        )
        for name in names
    }
    return RewardResult(
        rewards=torch.tensor([float(a["reward"]) for a in answers], dtype=torch.float32).reshape(len(answers)),
        metrics=metrics,
        reasons=[str(a["reason"]) for a in answers],
        transcripts=[str(a.get("transcript") or "") for a in answers],
    )


def _nan_if_none(x: Any) -> float:
    return math.nan if x is None else float(x)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _detail(response: httpx.Response) -> str:
    body = _json(response)
    return str(body.get("detail") or body.get("status") or response.text[:200])
