"""Helpers for the listening-page tests: a synthetic pairs directory and a real `label` server process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from lightning_grpo.pairs import write_pairs
from lightning_grpo.reward.tone import ToneCodec

ROOT = Path(__file__).parents[1]


def make_pairs_dir(root: Path, n: int = 6, round_id: str = "round-test") -> Path:
    """A `pairs` output directory of n pairs of short tone samples (a: steady pitch, b: moving pitch)."""
    pairs = [{"pair_id": f"{i:05d}-0", "text": f"sentence number {i}", "language": "en",
              "a": {"codes": [20, 20, 20, 21], "stopped": True, "cer": 0.0, "reward": 1.0, "transcript": None},
              "b": {"codes": [0, 40, 5, 50, i % 8], "stopped": False, "cer": 0.1, "reward": 0.9, "transcript": None}}
             for i in range(n)]
    write_pairs(pairs, ToneCodec(), root, {"round_id": round_id})
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def label_server(pairs: Path, db: Path, *args: str):
    """Runs `python -m lightning_grpo label` as a user does; yields (base URL, {rater: token}, process)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_grpo", "label", "--pairs", str(pairs), "--db", str(db),
                             "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300  # importing torch and Lightning on a loaded 2-core machine
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
            if proc.poll() is not None:
                reader.join(timeout=5)
                raise RuntimeError(f"label server exited: {''.join(lines)}")
        else:
            raise TimeoutError("label server did not start in 300 s")
        # the tokens were printed before the server started listening
        tokens = {line.partition(": ")[0]: line.split("#token=")[1].strip() for line in list(lines) if "#token=" in line}
        yield url, tokens, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def manifest(pairs: Path) -> list[dict]:
    return [json.loads(line) for line in (pairs / "manifest.jsonl").read_text().splitlines()]
