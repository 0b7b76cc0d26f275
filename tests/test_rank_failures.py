"""Checks that fail on one rank only stop every rank at once with the same message, and ranks that hold different
metric names still gather the same statistics: 2 CPU (gloo) processes (tests/rank_worker.py), only rank 1 failing
or holding the extra names. Each rank's process group waits 120 s for a peer (its timeout); the ranks must stop in
seconds, not by that timeout."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("rank_worker.py")


def run_ranks(out: Path, scenario: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "PYTHONPATH": str(WORKER.parents[1]), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), scenario], env={**base, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    records = []
    for r in range(2):
        path = out / f"rank{r}.json"
        assert path.is_file(), logs[r][-3000:]
        records.append(json.loads(path.read_text()))
    return records


def assert_stopped_together(records: list[dict], *phrases: str) -> None:
    """Both ranks raised, within seconds (not the group's 120 s timeout), rank 1 its own error and rank 0 the same
    text after naming rank 1."""
    own, other = records[1]["error"], records[0]["error"]
    assert own is not None and other is not None, records
    assert all(p in own for p in phrases), own
    assert "failed on rank 1, so every rank stops" in other and own in other, other
    assert all(r["seconds"] < 60 for r in records), records


def test_a_sync_check_failing_on_one_rank_stops_both(tmp_path):
    """Rank 1's engine is 3 nats off its policy (a gross gap: the first check raises), rank 0's matches."""
    records = run_ranks(tmp_path, "sync_check")
    assert_stopped_together(records, "vLLM weight sync check failed", "3.0000")


def test_a_scoring_server_that_never_answers_stops_both_within_give_up_after_s(tmp_path):
    """Rank 1's server accepts and never answers: with timeout_s 300 and 4 retries its budget would be 25 minutes;
    give_up_after_s (2 s) cuts the request short, the queued piece is not sent, and rank 0 gets the same error."""
    records = run_ranks(tmp_path, "scoring_stall")
    assert_stopped_together(records, "give_up_after_s=2.0", "ReadTimeout")
    assert records[1]["seconds"] < 30


def test_rank0_downloads_while_the_others_wait_past_the_group_timeout(tmp_path):
    """load_on_rank0 on a cold cache: rank 0 alone fetches the weights (8 s here) while rank 1 waits longer than the
    process group's timeout (5 s here, 30 min by default) allows, in a group of its own; then both go on."""
    records = run_ranks(tmp_path, "cold_cache")
    assert [r["error"] for r in records] == [None, None], records
    assert [p.name for p in tmp_path.glob("fetched_by_rank*")] == ["fetched_by_rank0"]
    assert all(r["seconds"] > 7 for r in records)


def test_a_failed_download_stops_every_rank_with_its_error(tmp_path):
    records = run_ranks(tmp_path, "failed_fetch")
    assert "HTTP 503 from huggingface.co" in records[0]["error"]
    assert records[1]["error"].startswith("RuntimeError: fetching the model's weights failed on rank 0, so every rank")
    assert "HTTP 503 from huggingface.co" in records[1]["error"]


def test_metric_names_are_the_union_over_ranks(tmp_path):
    """Rank 0 scored {reward, cer}, rank 1 also {nll, similarity}: both gather every name, in rank order, rank 0's
    missing rows as NaN (left out of the statistics, which use finite values), the same on both ranks."""
    records = run_ranks(tmp_path, "metrics")
    assert all(r["error"] is None for r in records), records
    got = [json.loads((tmp_path / f"rank{r}_gathered.json").read_text()) for r in range(2)]
    assert got[0].keys() == got[1].keys() == {"reward", "cer", "nll", "similarity"}
    for g in got:
        assert g["reward"] == [1.0, 2.0, 11.0, 12.0] and g["cer"] == [0.5, 0.25, 0.5, 0.25]
        assert all(math.isnan(x) for x in g["nll"][:2]) and g["nll"][2:] == [3.0, 4.0]
        assert all(math.isnan(x) for x in g["similarity"][:2] + g["similarity"][3:]) and g["similarity"][2] == 0.75


def test_gather_by_name_without_a_process_group_and_wrong_row_counts():
    import torch

    from lightning_grpo.distributed import gather_by_name

    got = gather_by_name({"b": torch.tensor([1, 2]), "a": torch.tensor([0.5, 1.5])}, rows=2)
    assert list(got) == ["a", "b"] and got["b"].dtype == torch.float32 and got["b"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="'a' has 3 values for 2 rows"):
        gather_by_name({"a": torch.zeros(3)}, rows=2)


class _Trainer:
    """What the retry-budget check reads off a Trainer: the world size and the strategy's process-group timeout."""

    def __init__(self, world_size: int, timeout_s: float | None) -> None:
        from datetime import timedelta

        self.world_size = world_size
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        self.strategy = type("Strategy", (), {"_timeout": timeout})()


def test_a_retry_budget_past_the_process_group_timeout_is_refused_at_start():
    """A rank may raise up to 2 x give_up_after_s after its peers entered their collective: past the group's timeout
    they would be killed first. The check names both flags; one process (no group) is never refused."""
    from lightning_grpo.reward.client import RemoteReward
    from lightning_grpo.reward.owner import SharedReward
    from lightning_grpo.reward.rule import RuleReward

    RemoteReward(url="http://127.0.0.1:1").start(_Trainer(2, 1800))  # the defaults: 2 x 600 s < 30 min
    RemoteReward(url="http://127.0.0.1:1", give_up_after_s=5000).start(_Trainer(1, None))
    match = (r"--rollout.reward.give_up_after_s=900: .* \(1800 s\).* below 900 or raise "
             r"--trainer.strategy.init_args.timeout")
    with pytest.raises(ValueError, match=match):
        RemoteReward(url="http://127.0.0.1:1", give_up_after_s=900).start(_Trainer(2, 1800))
    with pytest.raises(ValueError, match=match):  # before any owner process starts
        SharedReward(RuleReward, mode="process", give_up_after_s=900).start(_Trainer(2, 1800))


def test_give_up_after_s_is_a_config_key():
    """`--rollout.reward.give_up_after_s` is a key of the shipped server config's reward, on the command line."""
    from test_configs import ROOT, parse

    cfg = parse(ROOT / "configs" / "llasa1b_server.yaml", "--rollout.reward.give_up_after_s", "240")
    assert cfg.rollout.reward.init_args.give_up_after_s == 240.0
    assert parse(ROOT / "configs" / "llasa1b_original.yaml").rollout.reward.init_args.give_up_after_s == 600.0
