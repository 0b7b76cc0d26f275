"""DDP on CPU with 2 gloo processes: own prompts per rank, synchronised weights, reduced metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_two_process_ddp(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("ddp_worker.py")), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["world"] == 2
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
