"""Run by test_rank_failures.py: one of 2 CPU (gloo) processes, where only rank 1 fails or lacks something, with a
process-group timeout of 120 s (what a NCCL run would wait before its watchdog kills it). Each rank writes what it
stopped with, and when, to OUT/rank{r}.json.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/rank_worker.py OUT SCENARIO

Scenarios:
  sync_check    a VLLMSampler step on a fake engine; rank 1's engine is 3 nats off the policy (a wrong sync): its
                check fails while rank 0's passes. Then the next collective (a barrier).
  scoring_stall one rollout's scoring (RewardScoring) on each rank; rank 1's RemoteReward talks to a server that
                accepts connections and never answers (timeout_s 300, give_up_after_s 2). Then a barrier.
  cold_cache    sharding.fetch_on_rank0 under a process-group timeout of 5 s: rank 0's download (a fake one) takes
                8 s, rank 1 waits for it, then both meet in a barrier of the default group.
  failed_fetch  the same, rank 0's download raises: both ranks stop with its error.
  metrics       distributed.gather_by_name of per-sample metrics: rank 0 has {reward, cer}, rank 1 has
                {reward, cer, nll, similarity}; writes what each rank gathered.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from lightning_grpo.distributed import gather_by_name  # noqa: E402


def sync_check(rank: int) -> None:
    from test_vllm_sampler import STOP, make

    s, policy, _ = make(verify_every=1, dtype="bfloat16", engine_kw={"logprob_shift": 3.0 if rank == 1 else 0.0})
    s.sample(policy, [[1, 2]], 2, STOP, 0)


def scoring_stall(rank: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from lightning_grpo.reward.base import SpeechSample
    from lightning_grpo.reward.client import RemoteReward
    from lightning_grpo.reward.rule import RuleReward
    from lightning_grpo.scoring import RewardScoring

    silent = socket.socket()  # listens, never answers: a hung scoring server
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    if rank == 1:
        reward = RemoteReward(url=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=300.0, max_retries=4,
                              give_up_after_s=2.0)
        reward._ready = True  # the stall is in scoring, not in the health check at setup
    else:
        reward = RuleReward()
    scoring = RewardScoring(reward, ThreadPoolExecutor(2), finalize=lambda result: result.rewards)
    samples = [SpeechSample(codes=[1, 2, 3], text="abc", stopped=True) for _ in range(4)]
    scoring.submit([0, 1], samples[:2])
    scoring.submit([2, 3], samples[2:])  # queued behind the first piece: not waited on once that failed
    scoring.result()


def cold_cache(rank: int, out: Path, fails: bool = False) -> None:
    from lightning_grpo.sharding import fetch_on_rank0

    def download():
        (out / f"fetched_by_rank{rank}").touch()
        time.sleep(1 if fails else 8)
        if fails:
            raise OSError("HTTP 503 from huggingface.co while fetching model-00001-of-00004.safetensors")

    fetch_on_rank0(download, timeout_s=60)


def metrics(rank: int, out: Path) -> None:
    mine = {"reward": torch.tensor([1.0, 2.0]) + 10 * rank, "cer": torch.tensor([0.5, 0.25])}
    if rank == 1:
        mine.update(nll=torch.tensor([3.0, 4.0]), similarity=torch.tensor([0.75, math.nan]))
    gathered = gather_by_name(mine, rows=2, device=torch.device("cpu"))
    (out / f"rank{rank}_gathered.json").write_text(json.dumps({k: v.tolist() for k, v in gathered.items()}))


def main() -> None:
    out, scenario = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    short = scenario in ("cold_cache", "failed_fetch")  # a group that gives up sooner than the download takes
    dist.init_process_group("gloo", timeout=timedelta(seconds=5 if short else 120))
    rank = dist.get_rank()
    t0 = time.monotonic()
    record: dict = {"error": None}
    try:
        if scenario == "metrics":
            metrics(rank, out)
        elif short:
            cold_cache(rank, out, fails=scenario == "failed_fetch")
        else:
            {"sync_check": sync_check, "scoring_stall": scoring_stall}[scenario](rank)
        dist.barrier()  # the next collective a healthy rank would enter
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
    record["seconds"] = time.monotonic() - t0
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    os._exit(0)  # a rank stopped on an error leaves the group in no state to be torn down


if __name__ == "__main__":
    main()
