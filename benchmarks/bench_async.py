"""One-step-off rollouts: step time synchronous (`--rollout.async_steps 0`) against one-step-off (`1`).

    python benchmarks/bench_async.py            # calibrate, then both modes x 2 repeats (~5 min on 2 shared cores)
    python benchmarks/bench_async.py --smoke    # seconds: the smallest sizes

sleep   The generator stands in for a GPU engine: `SleepSampler` returns random speech tokens of a fixed length after
        sleeping a fixed time, as a trainer process waits for an engine on other hardware. A calibration run
        (synchronous, no generation cost) measures the step's logprob + update on the builtin tiny LLaSA; the
        generator's sleep is set to that, so generation costs what the update costs. Goal (one-step-off):
        step <= 1.1 x max(generate, logprob + update); synchronous is about generate + logprob + update.
hf      The real HF generate of the tiny LLaSA, on the same CPU cores as the update: no device of its own, so the
        two overlap only as far as the cores and the GIL let them.

Each run is its own process (alternated sync / async); figures are medians over the steps after a warm-up, the step
from one end-of-step stamp to the next (everything a step costs, the wait for the rollout in flight included) and
the phases from the step's own `timing/*` logs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info, markdown_table, median_after_warmup, run_worker  # noqa: E402

SIZES = {
    # prompts per step, G, completion tokens, steps, warm-up steps
    "full": {"prompts": 8, "group": 8, "tokens": 48, "steps": 12, "warmup": 3, "repeats": 2},
    "smoke": {"prompts": 2, "group": 2, "tokens": 6, "steps": 4, "warmup": 2, "repeats": 1},
}


class SleepSampler:
    """A generator on other hardware: sleeps `generate_s` per rollout, then returns `tokens - 1` random allowed ids
    and the stop token per row (drawn from torch's global generator, which the rollout seeds)."""

    def __init__(self, generate_s: float, tokens: int) -> None:
        self.generate_s, self.tokens = generate_s, tokens
        self.temperature, self.top_p, self.top_k, self.max_new_tokens = 1.0, 1.0, 0, tokens

    def setup(self, pl_module) -> None:
        pass

    def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
        import torch

        from lightning_grpo.sampling import Completions

        time.sleep(self.generate_s)
        allowed = torch.tensor([t for t in allowed_token_ids if t != stop_token_id])
        rows = allowed[torch.randint(0, len(allowed), (len(prompts) * n, self.tokens - 1))].tolist()
        return Completions(ids=[r + [stop_token_id] for r in rows], truncated=[False] * len(rows))


def fit_worker(a: argparse.Namespace) -> None:
    import lightning as L
    import torch

    from lightning_grpo.data import PromptDataModule
    from lightning_grpo.policy import GRPOPolicy
    from lightning_grpo.reward.rule import RuleReward
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.sampling import HFSampler

    torch.set_num_threads(a.threads)
    L.seed_everything(0)
    stamps, steps = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.append(time.perf_counter())
            steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("timing/", "rollout/"))})

    sampler = (SleepSampler(a.generate_s, a.tokens) if a.generator == "sleep"
               else HFSampler(temperature=1.0, max_new_tokens=a.tokens))
    cb = GRPORollout(sampler, RuleReward(codes_per_char=0.3, band=(0, 16)), group_size=a.group, truncation="keep",
                     async_steps=a.async_steps)
    L.Trainer(accelerator="cpu", devices=1, max_steps=a.steps, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=[cb, Record()]).fit(
        GRPOPolicy(learning_rate=1e-3, micro_batch_size=16),
        PromptDataModule(prompts_per_step=a.prompts, val_data=None))
    step, _ = median_after_warmup(stamps, a.warmup)
    kept = steps[a.warmup:]
    out = {key: statistics.median(s[key] for s in kept) for key in kept[0]}
    out["step_wall"] = step
    out["staleness"] = [s.get("rollout/staleness") for s in steps]
    emit(out)


def run(mode_args: list[str], threads: int) -> dict:
    return run_worker(__file__, ["--worker", *mode_args], threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--generators", default="sleep,hf")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--async_steps", type=int, default=0)
    p.add_argument("--generator", default="sleep")
    p.add_argument("--generate_s", type=float, default=0.0)
    for key in ("prompts", "group", "tokens", "steps", "warmup"):
        p.add_argument(f"--{key}", type=int)
    a = p.parse_args()
    if a.worker:
        return fit_worker(a)
    size = SIZES["smoke" if a.smoke else "full"]
    sized = [f"--{k}={size[k]}" for k in ("prompts", "group", "tokens", "steps", "warmup")]
    info = machine_info()
    results = {"machine": info, "size": size, "threads": a.threads}
    rows = []
    for generator in a.generators.split(","):
        generate_s = 0.0
        if generator == "sleep":  # the generator costs what the update costs
            calib = run([*sized, "--generator=sleep", "--generate_s=0"], a.threads)
            generate_s = calib["timing/logprob"] + calib["timing/update"]
            results["calibration"] = calib
        runs = {0: [], 1: []}
        for _ in range(size["repeats"]):
            for mode in (0, 1):
                runs[mode].append(run([*sized, f"--generator={generator}", f"--generate_s={generate_s}",
                                       f"--async_steps={mode}"], a.threads))
        results[generator] = runs
        for mode in (0, 1):
            r = runs[mode]
            gen = statistics.median(x["timing/generate"] for x in r)
            train = statistics.median(x["timing/logprob"] + x["timing/update"] for x in r)
            step = statistics.median(x["step_wall"] for x in r)
            rows.append([generator, "one-step-off" if mode else "synchronous", gen, train, step,
                         step / max(gen, train), statistics.median(x.get("timing/rollout_wait", 0.0) for x in r)])
    sync_steps = {row[0]: row[4] for row in rows if row[1] == "synchronous"}
    for row in rows:
        row.append(sync_steps[row[0]] / row[4])
    print(f"machine: {json.dumps(info)}; size: {size}; threads: {a.threads}")
    print(markdown_table(["generator", "mode", "generate s", "logprob+update s", "step s", "step / max(gen, train)",
                          "rollout wait s", "speed-up vs sync"], rows))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
