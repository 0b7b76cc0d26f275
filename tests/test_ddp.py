"""DDP on CPU with 2 gloo processes: own prompts per rank, synchronised weights, reduced metrics, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def ddp(out: Path, *args: str) -> list[dict]:
    """Runs tests/ddp_worker.py (2 processes); returns what each rank recorded."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("ddp_worker.py")), str(out), *args],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]


def test_two_process_ddp(tmp_path):
    ranks = ddp(tmp_path)
    assert ranks[0]["world"] == 2
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 2  # both ranks trained max_steps
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        # each rank samples its own prompts: 2 per rank (prompts_per_step=4 over 2 ranks)
        assert len(s0["texts"]) == len(s1["texts"]) == 2
        assert not set(s0["texts"]) & set(s1["texts"])
        # logged reward mean is over both ranks' samples, identical on both ranks
        both = (sum(s0["rewards"]) + sum(s1["rewards"])) / (len(s0["rewards"]) + len(s1["rewards"]))
        assert s0["logged_reward_mean"] == pytest.approx(both, abs=1e-6)
        assert s1["logged_reward_mean"] == pytest.approx(both, abs=1e-6)
    # gradients were all-reduced: both replicas hold the same weights after different data
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=0, abs=1e-9)


def test_resumed_ddp_run_sees_the_prompts_of_the_uninterrupted_run(tmp_path):
    """12 prompts, 4 per step over 2 ranks: 3-step epochs. Stopped after step 2 (mid-epoch) and resumed to
    step 5, every rank gets exactly the prompts the uninterrupted run gave it, in the same order,
    across the epoch boundary; each epoch covers all 12 prompts once."""
    common = ["--max_train_samples", "12"]
    full = ddp(tmp_path / "full", *common, "--max_steps", "5")
    first = ddp(tmp_path / "first", *common, "--max_steps", "2", "--ckpt_dir", str(tmp_path / "ckpt"))
    rest = ddp(tmp_path / "rest", *common, "--max_steps", "5", "--ckpt_dir", str(tmp_path / "ckpt"), "--resume")
    for rank in (0, 1):
        seen = [s["texts"] for s in first[rank]["steps"] + rest[rank]["steps"]]
        assert [s["step"] for s in rest[rank]["steps"]] == [3, 4, 5]
        assert seen == [s["texts"] for s in full[rank]["steps"]]
        sampled = [s["completions"] for s in first[rank]["steps"] + rest[rank]["steps"]]
        assert sampled == [s["completions"] for s in full[rank]["steps"]], f"rank {rank} sampled differently after resume"
        assert rest[rank]["checksum"] == full[rank]["checksum"]  # same weights at the end
    epoch0 = [t for rank in (0, 1) for s in full[rank]["steps"][:3] for t in s["texts"]]
    assert len(epoch0) == len(set(epoch0)) == 12
    assert full[0]["checksum"] == pytest.approx(full[1]["checksum"], rel=0, abs=1e-9)
