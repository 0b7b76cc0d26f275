"""Cost curve: how step time and peak memory grow with group size G, prompts per step B and completion length T.

Each grid point is one fresh subprocess running the real training loop (Lightning Trainer + GRPORollout
+ GRPOPolicy, rule reward, CPU) on a tiny LLaSA-shaped policy (8,192 speech tokens).
Completion lengths are fixed so that T means T: `FixedLengthSampler` is `HFSampler` (real HF
`generate`, KV cache, temperature / top-p) with the stop token removed from the allowed ids, so every
completion runs to exactly `max_new_tokens` and is kept (truncation="keep"). The grid varies one axis
at a time around a base point. Step time is the median over the measured steps (after one warm-up
step), in wall-clock and process CPU seconds, the wall time split into rollout (sampling + reward)
and update (log-probs, loss, backward, optimiser);
memory is the growth of the process's peak RSS (VmHWM, benchmarks/common.py) over its RSS just before training.

    python benchmarks/bench_cost_curve.py          # table + benchmarks/results/cost_curve.png
    python benchmarks/bench_cost_curve.py --smoke  # two tiny points, plot to a temp dir
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import REPO, current_rss_mib, emit, machine_info, markdown_table, peak_rss_mib, run_worker  # noqa: E402

MODEL = dict(speech_tokens=8192, hidden=64, layers=2)
BASE = dict(prompts=2, group=4, max_new_tokens=64)
AXES = {"group": [2, 4, 8, 16], "prompts": [1, 2, 4, 8], "max_new_tokens": [32, 64, 128, 256]}
SMOKE_MODEL = dict(speech_tokens=64, hidden=16, layers=1)
SMOKE_BASE = dict(prompts=1, group=2, max_new_tokens=4)
SMOKE_AXES = {"group": [2, 3]}
MICRO_BATCH = 16
WARMUP, STEPS = 1, 2
SAMPLING = dict(temperature=0.8, top_p=0.9)


def grid(base: dict, axes: dict) -> list[tuple[str, dict]]:
    """One-axis-at-a-time points around `base`, each (axis, settings)."""
    return [(axis, {**base, axis: value}) for axis, values in axes.items() for value in values]


def worker(p: dict, model: dict) -> dict:
    import lightning as L
    import torch

    from lightning_grpo.data import PromptDataModule
    from lightning_grpo.policy import GRPOPolicy
    from lightning_grpo.reward.rule import RuleReward
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.sampling import HFSampler

    class FixedLengthSampler(HFSampler):
        """HF generate that can never emit the stop token, so every completion has max_new_tokens ids."""

        def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
            allowed = [i for i in allowed_token_ids if i != stop_token_id]
            return super().sample(model, prompts, n, stop_token_id, step, allowed_token_ids=allowed)

    marks: dict[str, list[float]] = {"start": [], "sampled": [], "end": [], "cpu_start": [], "cpu_end": []}
    lengths: list[int] = []

    class Mark(L.Callback):
        def __init__(self, hook_name: str) -> None:
            self.hook_name = hook_name

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            marks[self.hook_name].append(time.perf_counter())
            if self.hook_name == "start":
                marks["cpu_start"].append(time.process_time())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.hook_name == "sampled":
                marks["end"].append(time.perf_counter())
                marks["cpu_end"].append(time.process_time())
                lengths.extend(len(c) for c in batch["rollout"].completion_ids)

    from lightning_grpo.tiny import build_tiny_llasa

    L.seed_everything(0, verbose=False)
    policy = GRPOPolicy(learning_rate=1e-5, micro_batch_size=MICRO_BATCH)
    # Swap in a tiny model of the requested shape (the builtin has 64 speech tokens).
    policy.policy, policy.tokenizer = build_tiny_llasa(model["speech_tokens"], model["hidden"], model["layers"])
    policy.policy.config.use_cache = False
    rollout = GRPORollout(
        sampler=FixedLengthSampler(max_new_tokens=p["max_new_tokens"], **SAMPLING), reward=RuleReward(),
        group_size=p["group"], truncation="keep", max_prompt_length=512,
    )
    data = PromptDataModule(train_data="builtin:en", val_data=None, prompts_per_step=p["prompts"])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=WARMUP + STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[Mark("start"), rollout, Mark("sampled")],
    )
    rss_before = current_rss_mib()
    trainer.fit(policy, datamodule=data)
    if set(lengths) != {p["max_new_tokens"]}:
        raise RuntimeError(f"completion lengths {sorted(set(lengths))} are not all max_new_tokens={p['max_new_tokens']}")
    s = slice(WARMUP, None)
    step = [e - a for a, e in zip(marks["start"][s], marks["end"][s])]
    roll = [b - a for a, b in zip(marks["start"][s], marks["sampled"][s])]
    upd = [e - b for b, e in zip(marks["sampled"][s], marks["end"][s])]
    cpu = [e - a for a, e in zip(marks["cpu_start"][s], marks["cpu_end"][s])]
    return dict(step_s=statistics.median(step), cpu_step_s=statistics.median(cpu), rollout_s=statistics.median(roll), update_s=statistics.median(upd),
                peak_growth_mib=peak_rss_mib() - rss_before, threads=torch.get_num_threads())


def plot(points: list[tuple[str, dict, dict]], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = list(dict.fromkeys(axis for axis, _, _ in points))
    fig, axs = plt.subplots(1, len(axes_names), figsize=(3.3 * len(axes_names), 2.8), squeeze=False)
    labels = {"group": "group size G", "prompts": "prompts per step B", "max_new_tokens": "completion length T"}
    for ax, name in zip(axs[0], axes_names):
        pts = [(p[name], r) for axis, p, r in points if axis == name]
        xs = [x for x, _ in pts]
        ax.plot(xs, [r["step_s"] for _, r in pts], "o-", color="C0", label="step (wall)")
        ax.plot(xs, [r["cpu_step_s"] for _, r in pts], "x-", color="C2", label="step (CPU)")
        ax.plot(xs, [r["rollout_s"] for _, r in pts], "^--", color="C0", alpha=0.6, label="rollout")
        ax.plot(xs, [r["update_s"] for _, r in pts], "v:", color="C0", alpha=0.6, label="update")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(labels.get(name, name) + f"\n(others: {', '.join(f'{k}={v}' for k, v in base.items() if k != name)})", fontsize=7)
        ax.set_ylabel("seconds / step", color="C0", fontsize=8)
        ax.tick_params(labelsize=7)
        twin = ax.twinx()
        twin.plot(xs, [r["peak_growth_mib"] for _, r in pts], "s-", color="C3")
        twin.set_ylabel("peak RSS growth (MiB)", color="C3", fontsize=8)
        twin.tick_params(labelsize=7)
        if name == axes_names[0]:
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("lightning_grpo CPU cost curve (tiny LLaSA, fixed lengths)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def run(smoke: bool, threads: int, png: Path) -> tuple[str, list]:
    model, base, axes = (SMOKE_MODEL, SMOKE_BASE, SMOKE_AXES) if smoke else (MODEL, BASE, AXES)
    cache: dict[str, dict] = {}
    points = []
    for axis, p in grid(base, axes):
        key = json.dumps(p, sort_keys=True)
        if key not in cache:  # the base point sits on every axis; measure it once
            cache[key] = run_worker(__file__, ["--worker", key, "--model", json.dumps(model), "--threads", str(threads)], threads)
        points.append((axis, p, cache[key]))
    plot(points, base, png)
    rows = [[axis, p["prompts"], p["group"], p["prompts"] * p["group"], p["max_new_tokens"], r["step_s"], r["cpu_step_s"], r["rollout_s"],
             r["update_s"], r["peak_growth_mib"]] for axis, p, r in points]
    table = markdown_table(["axis", "B", "G", "N=B*G", "T", "step wall (s)", "step CPU (s)", "rollout wall (s)", "update wall (s)", "peak RSS growth (MiB)"], rows)
    header = (
        f"settings: tiny LLaSA {model}, micro-batch {MICRO_BATCH}, sampling {SAMPLING}, rule reward, "
        f"restrict_to_speech=True, fixed-length HF generate, {WARMUP} warm-up + {STEPS} measured steps (median), "
        f"{threads} thread(s); plot: {png.relative_to(REPO) if png.is_relative_to(REPO) else png}\n"
        f"machine: {json.dumps(machine_info())}"
    )
    return header + "\n\n" + table, points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="two tiny points; the plot goes to a temp dir unless --png")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--png", type=Path, default=None, help="plot path (default benchmarks/results/cost_curve.png)")
    p.add_argument("--json", default=None, help="also write raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        emit(worker(json.loads(a.worker), json.loads(a.model)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        png = a.png or (Path(tmp) / "cost_curve.png" if a.smoke else REPO / "benchmarks" / "results" / "cost_curve.png")
        table, points = run(a.smoke, a.threads, png.resolve())
        print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
