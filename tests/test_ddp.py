"""DDP on CPU with 2 gloo processes: own prompts per rank, synchronised weights, one gradient all-reduce per update,
reduced metrics, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_grpo.policy import GRPOPolicy


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


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory) -> tuple[Path, list[dict]]:
    """2 rollouts x num_iterations 2 on 2 ranks, 8 rows per rank in micro-batches of 3."""
    out = tmp_path_factory.mktemp("ddp")
    return out, ddp(out, "--num_iterations", "2", "--save_weights")


def test_two_process_ddp(two_iterations):
    _, ranks = two_iterations
    assert ranks[0]["world"] == 2
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 2  # both ranks trained max_steps
    assert [s["step"] for s in ranks[0]["steps"]] == [1, 2]  # a step is a rollout, with 2 updates each
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


def test_one_gradient_allreduce_round_per_update(two_iterations):
    """Micro-batches accumulate without communication; the last backward of each update all-reduces
    every bucket exactly once. Afterwards the gradients are zeroed in place, still DDP's bucket views."""
    _, ranks = two_iterations
    for rank in ranks:
        assert len(rank["updates"]) == 4  # 2 rollouts x 2 iterations
        for backwards in rank["updates"]:
            assert len(backwards) == 3  # micro-batches of 3, 3, 2 rows
            assert backwards[:-1] == [[], []]
            assert backwards[-1] and sorted(backwards[-1]) == list(range(len(backwards[-1])))
        grads = rank["grads_after_training"]
        assert grads["count"] > 0 and grads["nonzero"] == 0
        assert grads["storages"] == len(rank["updates"][-1][-1])  # one storage per bucket: views, not copies


def test_allreduce_per_update_trains_the_weights_of_allreduce_per_micro_batch(two_iterations, tmp_path):
    """The same run with an all-reduce in every micro-batch's backward (the behaviour before): 3 rounds per
    update instead of 1, and the same weights up to float rounding (an average of sums either way)."""
    import torch

    out, _ = two_iterations
    every = ddp(tmp_path, "--num_iterations", "2", "--save_weights", "--sync_every_micro_batch")
    assert all(len(b) == 1 for rank in every for update in rank["updates"] for b in update)  # counted: 3 per update
    ours, theirs = torch.load(out / "rank0.pt"), torch.load(tmp_path / "rank0.pt")
    initial = GRPOPolicy(micro_batch_size=3).policy.state_dict()
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-5), k  # measured 6e-7; lr is 1e-2
    assert any(not torch.equal(ours[k], initial[k]) for k in ours)  # trained, so the comparison means something


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
