"""What reference audio a scoring-server client may send: codes, the recording in the body, or a file under the
operator's --reference-dir; never another path of the server's file system, and no answer that tells whether a
file exists."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient

from lightning_grpo.reward.audio import load_wav
from lightning_grpo.reward.base import RewardResult, SpeechSample
from lightning_grpo.reward.app import create_app

ROOT = Path(__file__).resolve().parents[1]


class ReferenceSeconds:
    """Reward = the length in seconds of the reference recording it reads (-1 without one); keeps every path."""

    def __init__(self) -> None:
        self.read: list[str | None] = []

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        self.read += [s.prompt_wav for s in samples]
        seconds = [load_wav(s.prompt_wav).numel() / 16_000 if s.prompt_wav else -1.0 for s in samples]
        return RewardResult(rewards=torch.tensor(seconds))


def tone(seconds: float, rate: int = 16_000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def wav_bytes(seconds: float, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, rate), rate, format="WAV")
    return buf.getvalue()


def sample(**reference) -> dict:
    return {"tokens": [1, 2, 3], "text": "hello", **reference}


@pytest.fixture
def files(tmp_path):
    """refs/ok.wav (1.5 s), refs/notes.txt, refs/link.wav -> ../secret.wav, and secret.wav beside refs/."""
    refs = tmp_path / "refs"
    refs.mkdir()
    sf.write(refs / "ok.wav", tone(1.5), 16_000)
    (refs / "notes.txt").write_text("not audio")
    sf.write(tmp_path / "secret.wav", tone(2.0), 16_000)
    (refs / "link.wav").symlink_to(tmp_path / "secret.wav")
    return tmp_path


def client(reward, **kwargs) -> TestClient:
    return TestClient(create_app(reward, codebook_size=64, **kwargs))


def test_prompt_wav_outside_the_reference_dir_is_refused_alike_whether_it_exists_or_not(files):
    reward = ReferenceSeconds()
    refs = files / "refs"
    probes = ["/etc/shadow", "/etc/passwd", "/root/.ssh/id_rsa", "/no/such/file.wav", str(files / "secret.wav"),
              "../secret.wav", "link.wav", "~/secret.wav", "missing.wav", "notes.txt", "ok.wav/../../secret.wav",
              "", ".", "a\x00b", "x" * 5000]
    with client(reward, reference_dir=str(refs)) as c:
        details = set()
        for name in probes:
            r = c.post("/score", json=sample(prompt_wav=name))
            assert r.status_code == 422, (name, r.text)
            details.add(r.json()["detail"].replace(repr(name), "NAME"))
        assert details == {
            "invalid request body: prompt_wav NAME is not a readable recording under this server's --reference-dir; "
            "send the recording in prompt_audio (base64 WAV) or its codes in prompt_codes"
        }  # one answer for every cause: no oracle on what exists outside (or inside) the directory
        assert reward.read == []  # the reward never saw any of them
        for name in ("ok.wav", str(refs / "ok.wav"), "./sub/../ok.wav"):
            r = c.post("/score", json=sample(prompt_wav=name))
            assert r.status_code == 200 and r.json()["reward"] == 1.5, (name, r.text)
    assert reward.read == [str(refs / "ok.wav")] * 3


def test_without_a_reference_dir_no_path_is_read(files):
    reward = ReferenceSeconds()
    with client(reward) as c:
        for name in ("ok.wav", str(files / "refs" / "ok.wav"), "/etc/passwd"):
            r = c.post("/score", json=sample(prompt_wav=name))
            assert r.status_code == 422 and "started without --reference-dir" in r.json()["detail"]
    assert reward.read == []


def test_the_recording_in_the_body_is_scored_and_its_copy_removed(tmp_path):
    reward = ReferenceSeconds()
    audio = base64.b64encode(wav_bytes(2.0, rate=22_050)).decode()
    with client(reward, max_reference_seconds=5) as c:
        r = c.post("/score", json={"samples": [sample(prompt_audio=audio), sample(prompt_audio=audio), sample()]})
        assert r.status_code == 200
        assert [a["reward"] for a in r.json()["results"]] == [pytest.approx(2.0, abs=1e-3)] * 2 + [-1.0]
        stored = reward.read[0]
        assert reward.read[1] == stored and not Path(stored).exists()  # one copy, removed once answered
        assert oct(Path(stored).parent.stat().st_mode & 0o777) == "0o700"

        bad = {"not base64": "%%%", "not audio": base64.b64encode(b"GIF89a" + bytes(100)).decode()}
        for what, payload in bad.items():
            r = c.post("/score", json=sample(prompt_audio=payload))
            assert r.status_code == 422 and "prompt_audio is not" in r.json()["detail"], what
        long = base64.b64encode(wav_bytes(6.0)).decode()
        r = c.post("/score", json={"samples": [sample(prompt_audio=audio), sample(prompt_audio=long)]})
        assert r.status_code == 413 and "samples[1].prompt_audio is 6.0 s long, more than --max-reference-seconds=5" in r.json()["detail"]
        assert list(Path(stored).parent.iterdir()) == []  # the accepted first sample's copy went with the refusal
        r = c.post("/score", json=sample(prompt_audio=audio, prompt_wav="ok.wav"))
        assert r.status_code == 422 and "not both" in r.json()["detail"]
    assert len(reward.read) == 3


def test_reference_codes_are_capped_per_sample_and_per_request():
    reward = ReferenceSeconds()
    with client(reward, max_reference_seconds=2, max_request_reference_seconds=3) as c:
        ref = {"prompt_text": "ref", "prompt_codes": [5] * 100}  # 2 s at 50 codes/s: allowed
        assert c.post("/score", json=sample(**ref)).status_code == 200
        r = c.post("/score", json=sample(prompt_text="ref", prompt_codes=[5] * 101))
        assert r.status_code == 413 and "prompt_codes has 101 codes (2.0 s), more than --max-reference-seconds=2" in r.json()["detail"]
        same = [sample(**ref)] * 10  # one reference shared by a group counts once
        assert c.post("/score", json={"samples": same}).status_code == 200
        other = {"prompt_text": "ref", "prompt_codes": [6] * 100}
        r = c.post("/score", json={"samples": [sample(**ref), sample(**other)]})
        assert r.status_code == 413 and "--max-request-reference-seconds=3" in r.json()["detail"] and "samples[1]" in r.json()["detail"]


def test_serve_with_a_reward_that_cannot_load_exits_naming_why(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WHISPER_SERVER_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-m", "lightning_grpo", "serve", "--port", "0", "--log-level", "warning",
         "--reward-config", str(tmp_path / "missing.yaml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "building the reward failed: FileNotFoundError" in done.stderr and "missing.yaml" in done.stderr


def test_cli_reads_no_client_paths_by_default():
    from lightning_grpo.reward.server import build_parser

    args = build_parser().parse_args([])
    assert args.reference_dir is None and args.max_reference_seconds == 30.0
    assert build_parser().parse_args(["--reference-dir", "/srv/refs"]).reference_dir == "/srv/refs"
    with pytest.raises(ValueError, match=r"--max-reference-seconds=60 must be in \(0, 30\]"):
        create_app(ReferenceSeconds(), max_reference_seconds=60)


def test_served_from_the_command_line_with_a_reference_dir(files):
    """`python -m lightning_grpo serve --reference-dir DIR` as an operator starts it; the bearer token still applies."""
    import httpx
    from test_server import running_server

    with running_server(files, "--reference-dir", str(files / "refs"), "--token", "t0k",
                        reward_config={"class_path": "test_server_references.ReferenceSeconds"},
                        entry=("lightning_grpo", "serve")) as (url, _):
        with httpx.Client(trust_env=False, timeout=30, headers={"Authorization": "Bearer t0k"}) as c:
            assert c.post(url + "/score", json=sample(prompt_wav="ok.wav")).json()["reward"] == 1.5
            outside = c.post(url + "/score", json=sample(prompt_wav=str(files / "secret.wav")))
            assert outside.status_code == 422 and "--reference-dir" in outside.json()["detail"]
            audio = base64.b64encode(wav_bytes(0.5)).decode()
            assert c.post(url + "/score", json=sample(prompt_audio=audio)).json()["reward"] == 0.5
        with httpx.Client(trust_env=False, timeout=30) as c:
            assert c.post(url + "/score", json=sample(prompt_wav="ok.wav")).status_code == 401
