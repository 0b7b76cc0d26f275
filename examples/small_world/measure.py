"""Measure the demo: held-out CER / NLL / reward before and after GRPO, per seed and reward ablation.

For every run: warm start (cached), `validate` the warm-started policy on the held-out prompts
(the "before"), `fit` with GRPO (validating every `val_check_interval` steps: the curve), and keep the
last validation's samples (codes, transcripts) to check for reward hacking. It also measures the
held-out unit error of the codes alone, sampled and near-greedy, before and after. Each run writes
`<out>/<name>/summary.json` and the trained policy to `<out>/<name>/policy`; `--report` turns all
summaries into a markdown table and a CER plot.

    python examples/small_world/measure.py --runs seed0 seed1 seed2 cer_only nll_only --rollouts 60
    python examples/small_world/measure.py --report --markdown notes/results_demo.md --plot benchmarks/results/demo_cer.png
    python examples/small_world/measure.py --runs seed0 seed1 --out runs/gspo -- --model.objective gspo   # overrides

At equal sample budgets (dynamic sampling generates more than prompts_per_step x group_size per step): `--max_samples
N` stops each fit once N completions were generated (`--rollout.max_samples`; raise `--rollouts` so it is reached),
and the summary's curve records the samples generated before each validation:

    python examples/small_world/measure.py --runs seed0 --rollouts 200 --max_samples 1440 -- --rollout.dynamic_sampling true

The prosody world (small_world/prosody_world.py; BENCHMARKS.md "Small world: prosody collapse and cure"): `--world
prosody` reads its config (or `--config`, a file of this directory or a path), prompts and warm starts, and adds to
each summary the held-out prosody diversity before and after (`prosody_measures`); `--compare_prosody` tabulates it:

    python examples/small_world/measure.py --world prosody --runs seed0 seed1 seed2 --out runs/prosody/cer_nll \
        --warm_dir runs/prosody
    python examples/small_world/measure.py --compare_prosody runs/prosody/cer_nll runs/prosody/prosody runs/prosody/kl
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `small_world` importable from any directory

from lightning_grpo.data import load_prompts  # noqa: E402
from lightning_grpo.llasa import LlasaVocab, parse_completion  # noqa: E402
from small_world import CONFIG, HERE, TEST_PROMPTS, TRAIN_PROMPTS  # noqa: E402
from small_world import prosody_world  # noqa: E402
from small_world.unit_codec import JUNK_UNITS, UNITS, codes_to_text, text_to_codes  # noqa: E402
from small_world.warm_start import (  # noqa: E402
    WarmStartConfig, edit_distance, sample_codes, unit_error_rate, warm_config, warm_start,
)

# world -> (default config, train prompts, held-out prompts)
WORLDS = {
    "words": (CONFIG, TRAIN_PROMPTS, TEST_PROMPTS),
    "prosody": (prosody_world.CONFIG, prosody_world.TRAIN_PROMPTS, prosody_world.TEST_PROMPTS),
}

# Capped CER of the *correct* codes of the 48 held-out sentences under the demo reward (tiny.en, 5 s window):
# the best any policy can score; measured once, drawn on the plot.
WHISPER_FLOOR = 0.103
REWARD = "--rollout.reward"
# name -> (seed, lambda_c, lambda_n)
RUNS = {
    "seed0": (0, 0.6, 0.4),
    "seed1": (1, 0.6, 0.4),
    "seed2": (2, 0.6, 0.4),
    "cer_only": (0, 1.0, 0.0),
    "nll_only": (0, 0.0, 1.0),
    "seed3": (3, 0.6, 0.4),
    "seed4": (4, 0.6, 0.4),
}


def world_args(world: str, config: Path | None = None) -> list[str]:
    """`--config` and the prompt files of `world` as absolute paths; `config`: another file (of this directory or a path)."""
    default, train, test = WORLDS[world]
    path = default if config is None else config if config.exists() else HERE / config
    if not path.exists():
        raise FileNotFoundError(f"--config {config} is neither a path nor a file of {HERE}")
    return ["--config", str(path), f"--data.train_data={train}", f"--data.val_data={test}"]


def held_out(world: str) -> list[str]:
    return [row["text"] for row in load_prompts(str(WORLDS[world][2]), "test")]


def sample_report(rollout, tokenizer, world: str = "words") -> dict:
    """Hacking indicators and a few samples of one validation rollout (prosody world: of the words said)."""
    vocab = LlasaVocab.from_tokenizer(tokenizer)
    junk = {UNITS.index(u) for u in JUNK_UNITS}
    rows, counts = [], Counter()
    for i, ids in enumerate(rollout.completion_ids):
        parsed = parse_completion(ids, vocab)
        ref = text_to_codes(rollout.texts[i])
        codes = prosody_world.word_units(parsed.codes) if world == "prosody" else parsed.codes
        counts["n"] += 1
        counts["junk"] += any(c in junk for c in codes)
        counts["repeat"] += any(a == b for a, b in zip(codes, codes[1:])) and not any(a == b for a, b in zip(ref, ref[1:]))
        counts["short"] += len(codes) < len(ref)
        counts["long"] += len(codes) > len(ref)
        counts["unstopped"] += not parsed.stopped
        counts["exact"] += codes == ref
        counts["unit_errors"] += edit_distance(codes, ref)
        counts["ref_units"] += len(ref)
        rows.append({
            "text": rollout.texts[i], "spoken": codes_to_text(codes),
            "transcript": rollout.reward_result.transcripts[i] if rollout.reward_result.transcripts else "",
            "cer": float(rollout.reward_result.metrics["cer"][i]), "reason": rollout.reward_result.reasons[i],
        })
    n = counts["n"]
    return {
        "junk_rate": counts["junk"] / n, "repeat_rate": counts["repeat"] / n, "short_rate": counts["short"] / n,
        "long_rate": counts["long"] / n, "unstopped_rate": counts["unstopped"] / n, "exact_rate": counts["exact"] / n,
        "unit_error_rate": counts["unit_errors"] / counts["ref_units"], "samples": rows[:: max(1, n // 8)][:8],
    }


def unit_errors(policy, tokenizer, seed: int, world: str = "words") -> dict[str, float]:
    """Held-out unit error of the codes alone (no Whisper): sampled as in training (T = 1, 4 per prompt)
    and near-greedy (T = 0.01), so a CER drop can be told apart from mere sharpening of the warm start."""
    texts = held_out(world)
    return {
        "sampled": unit_error_rate(policy, tokenizer, texts, temperature=1.0, n=4, seed=seed, world=world)["uer"],
        "greedy": unit_error_rate(policy, tokenizer, texts, temperature=0.01, n=1, seed=seed, world=world)["uer"],
    }


def prosody_measures(policy, tokenizer, seed: int, codec=None, n: int = 4) -> dict[str, float]:
    """Prosody diversity of `n` samples per held-out prompt of the prosody world, sampled as in training (T = 1,
    8 new tokens): prosody_world.diversity of the codes and the mean Praat voiced-F0 std of their audio."""
    texts = held_out("prosody")
    parsed = sample_codes(policy, tokenizer, texts, temperature=1.0, n=n, max_new_tokens=8, seed=seed)
    codes = [p.codes for p in parsed]
    codec = codec or prosody_world.ProsodyUnitCodec()
    return {**prosody_world.diversity(codes), **prosody_world.f0_spread(codec, codes, [texts[i // n] for i in range(len(codes))]),
            "samples": len(codes)}


def _metrics(trainer) -> dict[str, float]:
    m = trainer.callback_metrics
    return {k: float(m[k]) for k in ("val/cer_capped_mean", "val/cer_above_1", "val/exact_rate", "val/cer_mean", "val/nll_mean", "val/reward_mean", "val/completion_length_mean", "val/prosody/f0_std_st_mean") if k in m}


def run_one(
    name: str, out: Path, rollouts: int, val_every: int, extra: list[str], num_iterations: int = 2,
    warm: WarmStartConfig = WarmStartConfig(), max_samples: int | None = None, config: Path | None = None,
    warm_dir: Path | None = None,
) -> dict:
    from lightning.pytorch.loggers import CSVLogger  # noqa: F401  (fail early if lightning is broken)

    from lightning_grpo.cli import build_cli

    seed, lc, ln = RUNS[name]
    run_dir = out / name
    world = warm.world
    model_dir = warm_start((warm_dir or out) / f"warm_seed{seed}", dataclasses.replace(warm, seed=seed))
    # both worlds' configs weigh 0.6 / 0.4; only other weights are passed (a composite reward nests them deeper)
    weights = [] if (lc, ln) == (0.6, 0.4) else [f"{REWARD}.lambda_c", str(lc), f"{REWARD}.lambda_n", str(ln)]
    common = [
        *world_args(world, config), "--seed_everything", str(seed), "--model.model_name_or_path", str(model_dir),
        *weights,
        "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.default_root_dir", str(run_dir),
        "--model.num_iterations", str(num_iterations), *extra,
    ]
    before_cli = build_cli(["validate", *common])
    before = _metrics(before_cli.trainer)
    rollout_cb = next(c for c in before_cli.trainer.callbacks if hasattr(c, "last_rollout"))
    before_samples = sample_report(rollout_cb.last_rollout, before_cli.model.tokenizer, world)
    before_units = unit_errors(before_cli.model.policy, before_cli.model.tokenizer, seed, world)
    if world == "prosody":
        before_prosody = prosody_measures(before_cli.model.policy, before_cli.model.tokenizer, seed)
    budget = ["--rollout.max_samples", str(max_samples)] if max_samples else []
    fit_cli = build_cli(["fit", *common, "--trainer.max_steps", str(rollouts),  # a step is a rollout
                         "--trainer.val_check_interval", str(val_every), *budget])
    after = _metrics(fit_cli.trainer)
    rollout_cb = next(c for c in fit_cli.trainer.callbacks if hasattr(c, "last_rollout"))
    after_samples = sample_report(rollout_cb.last_rollout, fit_cli.model.tokenizer, world)
    after_units = unit_errors(fit_cli.model.policy, fit_cli.model.tokenizer, seed, world)
    curve = [{"step": 0, "samples": 0, **before}]
    samples = 0  # completions generated so far (train/samples_generated_total), for comparisons at equal budgets
    with open(Path(fit_cli.trainer.logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/samples_generated_total"):
                samples = int(float(row["train/samples_generated_total"]))
            if row.get("val/cer_mean"):
                # the CSV's step counts rollouts (batches), not optimiser updates
                f0 = {"val/prosody/f0_std_st_mean": float(row["val/prosody/f0_std_st_mean"])} if row.get("val/prosody/f0_std_st_mean") else {}
                curve.append({"step": int(row["step"]) + 1, "samples": samples, **f0, "val/cer_mean": float(row["val/cer_mean"]),
                              "val/cer_capped_mean": float(row["val/cer_capped_mean"]),
                              "val/nll_mean": float(row["val/nll_mean"]), "val/reward_mean": float(row["val/reward_mean"])})
    summary = {
        "name": name, "seed": seed, "lambda_c": lc, "lambda_n": ln, "rollouts": rollouts, "num_iterations": num_iterations, "curve_steps": "rollouts", "extra": extra,
        "max_samples": max_samples, "samples_generated": rollout_cb.samples_generated, "steps_trained": fit_cli.trainer.global_step,
        "before": before, "after": after, "curve": curve,
        "before_samples": before_samples, "after_samples": after_samples,
        "before_units": before_units, "after_units": after_units,
        "warm_start": dataclasses.asdict(dataclasses.replace(warm, seed=seed)),
    }
    if world == "prosody":
        summary |= {"world": world, "config": str(config or WORLDS[world][0]), "before_prosody": before_prosody,
                    "after_prosody": prosody_measures(fit_cli.model.policy, fit_cli.model.tokenizer, seed)}
    run_dir.mkdir(parents=True, exist_ok=True)
    fit_cli.model.policy.save_pretrained(run_dir / "policy")  # the trained policy, to listen to or evaluate
    fit_cli.model.tokenizer.save_pretrained(run_dir / "policy")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _load_summaries(outs: list[Path]) -> list[dict]:
    summaries = []
    for out in outs:
        for n in RUNS:
            path = out / n / "summary.json"
            if path.exists():
                s = json.loads(path.read_text())
                if s.get("curve_steps") != "rollouts":  # summaries written before the step fix
                    for point in s["curve"]:
                        point["step"] *= s.get("num_iterations", 1)
                s["label"] = f"{out.name}/{n}"
                summaries.append(s)
    return summaries


def _units(summary: dict, kind: str) -> str:
    if "before_units" not in summary:  # summaries written before unit errors were measured
        return "-"
    return f"{summary['before_units'][kind]:.2f} / {summary['after_units'][kind]:.2f}"


def report(outs: list[Path], markdown: Path | None, plot: Path | None) -> str:
    summaries = _load_summaries(outs)
    lines = [
        "| run | reward weights | CER before | CER after | rel. change | raw mean CER before / after |"
        " NLL before / after | reward before / after | exact before / after | unit error sampled before / after |"
        " unit error near-greedy before / after | junk / repeat / short / long / unstopped after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        b, a, hb, ha = s["before"], s["after"], s["before_samples"], s["after_samples"]
        rel = (a["val/cer_capped_mean"] - b["val/cer_capped_mean"]) / b["val/cer_capped_mean"]
        samples = f", {s['samples_generated']} samples" if s.get("samples_generated") else ""
        lines.append(
            f"| {s['label']} (seed {s['seed']}, {s.get('steps_trained', s.get('rollouts', '?'))} rollouts{samples}{', ' + ' '.join(s['extra']) if s.get('extra') else ''}) | lc {s['lambda_c']} / ln {s['lambda_n']} | {b['val/cer_capped_mean']:.3f} | "
            f"{a['val/cer_capped_mean']:.3f} | {rel:+.0%} | {b['val/cer_mean']:.3f} / {a['val/cer_mean']:.3f} | "
            f"{b['val/nll_mean']:.2f} / {a['val/nll_mean']:.2f} | {b['val/reward_mean']:.3f} / {a['val/reward_mean']:.3f} | "
            f"{hb['exact_rate']:.2f} / {ha['exact_rate']:.2f} | {_units(s, 'sampled')} | {_units(s, 'greedy')} | {ha['junk_rate']:.2f} / {ha['repeat_rate']:.2f} / "
            f"{ha['short_rate']:.2f} / {ha['long_rate']:.2f} / {ha['unstopped_rate']:.2f} |"
        )
    table = "\n".join(lines)
    if markdown:
        markdown.write_text(table + "\n")
    if plot and summaries:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for s in summaries:
            steps = [p["step"] for p in s["curve"]]
            ax.plot(steps, [p["val/cer_capped_mean"] for p in s["curve"]], marker="o",
                    label=f"{s['label']} (lc {s['lambda_c']}, ln {s['lambda_n']})",
                    linestyle="-" if s["lambda_c"] and s["lambda_n"] else "--")
        ax.axhline(WHISPER_FLOOR, color="grey", linestyle=":", label=f"correct codes (Whisper floor {WHISPER_FLOOR})")
        ax.set_xlabel("GRPO step (rollout)")
        ax.set_ylabel("held-out CER, mean of min(CER, 1)")
        ax.set_title("Unit-codec demo: held-out CER during GRPO")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
    return table


def _samples_per_rollout() -> int:
    """prompts_per_step x group_size of the small world's config (what a step generates without dynamic sampling)."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).with_name("config.yaml")).read_text())
    return cfg["data"]["prompts_per_step"] * cfg["rollout"]["group_size"]


FIT_LOG_KEYS = ("rollout/staleness", "train/clip_fraction", "train/is_weight_mean", "train/is_weight_capped_frac")


def fit_log_means(run_dir: Path) -> dict[str, float]:
    """Means over the fit's steps of FIT_LOG_KEYS, from the run's last CSV log (the fit's; validate writes the one
    before): how stale the samples were and how much the clip and the importance weights acted. A key the run never
    logged is left out (synchronous runs before staleness was logged, runs without importance correction)."""
    logs = sorted((run_dir / "grpo").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not logs:
        return {}
    with open(logs[-1]) as f:
        rows = list(csv.DictReader(f))
    means = {}
    for key in FIT_LOG_KEYS:
        values = [float(r[key]) for r in rows if r.get(key)]
        if values:
            means[key] = sum(values) / len(values)
    return means


def compare(outs: list[Path]) -> str:
    """One row per arm (each directory of `outs`, named for its variant), its seeds side by side: held-out capped CER
    before -> after and the relative change per seed, their mean, the sampled unit error after, and the samples
    each run generated (equal budgets are the caller's to check)."""
    lines = [
        "| arm | seeds | capped CER before -> after, per seed | rel. change per seed | mean rel. change |"
        " unit error sampled after (mean) | samples generated per run | steps trained |"
        " staleness / clip fraction / IS weight / IS capped (fit means, mean of seeds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for out in outs:
        runs = _load_summaries([out])
        if not runs:
            continue
        rel = [(s["after"]["val/cer_capped_mean"] - s["before"]["val/cer_capped_mean"]) / s["before"]["val/cer_capped_mean"]
               for s in runs]
        units = [s["after_units"]["sampled"] for s in runs if "after_units" in s]
        # summaries written before samples were counted: every step generated prompts_per_step x group_size
        samples = sorted({s.get("samples_generated") or s["rollouts"] * _samples_per_rollout() for s in runs})
        steps = sorted({s.get("steps_trained", s["rollouts"]) for s in runs})
        unit_mean = f"{sum(units) / len(units):.3f}" if units else "-"
        logs = [fit_log_means(out / s["name"]) for s in runs]

        def log_mean(key: str) -> str:
            values = [m[key] for m in logs if key in m]
            return f"{sum(values) / len(values):.3g}" if len(values) == len(logs) else "-"
        lines.append(
            f"| {out.name} | {' '.join(str(s['seed']) for s in runs)} | "
            + ", ".join(f"{s['before']['val/cer_capped_mean']:.3f} -> {s['after']['val/cer_capped_mean']:.3f}" for s in runs)
            + f" | {' / '.join(f'{r:+.0%}' for r in rel)} | {sum(rel) / len(rel):+.1%} | {unit_mean} | "
            f"{' / '.join(map(str, samples))} | {' / '.join(map(str, steps))} | "
            + " / ".join(log_mean(k) for k in FIT_LOG_KEYS) + " |"
        )
    return "\n".join(lines)


PROSODY_KEYS = ("f0_std_st", "variant_entropy_bits", "contour_variety", "monotone_share")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare_prosody(outs: list[Path]) -> str:
    """The prosody world's arms (each directory of `outs`; the first is the CER+NLL-only reference): per seed and as
    the mean over seeds, held-out capped CER and prosody diversity (prosody_measures) before -> after; the mean
    rows add the arm's CER gain as a share of the first arm's and each measure after as a share of before."""
    head = ("| arm | seed | capped CER before -> after | F0 std (st) before -> after | variant entropy (bits) | "
            "contour variety | monotone share | val/prosody/f0_std_st (Whisper's log) | samples |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    means, reference_gain = [], None
    for out in outs:
        runs = [s for s in _load_summaries([out]) if "before_prosody" in s]
        if not runs:
            continue
        for s in runs:
            b, a, pb, pa = s["before"], s["after"], s["before_prosody"], s["after_prosody"]
            f0 = "val/prosody/f0_std_st_mean"
            lines.append(
                f"| {out.name} | {s['seed']} | {b['val/cer_capped_mean']:.3f} -> {a['val/cer_capped_mean']:.3f} | "
                + " | ".join(f"{pb[k]:.3f} -> {pa[k]:.3f}" for k in PROSODY_KEYS)
                + f" | {b.get(f0, float('nan')):.3f} -> {a.get(f0, float('nan')):.3f} | {s['samples_generated']} |")
        gain = _mean([s["before"]["val/cer_capped_mean"] - s["after"]["val/cer_capped_mean"] for s in runs])
        reference_gain = gain if reference_gain is None else reference_gain
        kept = {k: _mean([s["after_prosody"][k] for s in runs]) / _mean([s["before_prosody"][k] for s in runs])
                for k in PROSODY_KEYS if _mean([s["before_prosody"][k] for s in runs])}
        means.append(
            f"| {out.name} | {len(runs)} | {_mean([s['before']['val/cer_capped_mean'] for s in runs]):.3f} -> "
            f"{_mean([s['after']['val/cer_capped_mean'] for s in runs]):.3f} | {gain:+.3f} | "
            f"{gain / reference_gain:.0%} | " if reference_gain else f"| {out.name} | {len(runs)} | - | {gain:+.3f} | - | ")
        means[-1] += " | ".join(
            f"{_mean([s['before_prosody'][k] for s in runs]):.3f} -> {_mean([s['after_prosody'][k] for s in runs]):.3f}"
            + (f" ({kept[k]:.0%})" if k in kept else "") for k in PROSODY_KEYS) + " |"
    summary = [
        "| arm | seeds | capped CER before -> after | CER gain (before - after) | gain / first arm's | F0 std (st) "
        "(after / before) | variant entropy (bits) | contour variety | monotone share |",
        "|---|---|---|---|---|---|---|---|---|", *means,
    ]
    return "\n".join(lines) + "\n\nMeans over seeds:\n\n" + "\n".join(summary)


def reward_by_contour(config: Path | None = None) -> str:
    """What the prosody world's Whisper reward pays for prosody alone: the correct words of every held-out sentence,
    said monotone at each pitch x rate and with the warm start's contours (one draw each), scored by the reward of
    `config` (default prosody.yaml). A reward that prefers one rendering pulls a CER+NLL run toward it."""
    import random

    import yaml

    from lightning_grpo.reward.base import SpeechSample
    from lightning_grpo.reward.short_window import ShortWindowWhisperReward
    from small_world.warm_start import target_codes

    path = WORLDS["prosody"][0] if config is None else config if config.exists() else HERE / config
    init = dict(yaml.safe_load(path.read_text())["rollout"]["reward"]["init_args"])
    codec = prosody_world.ProsodyUnitCodec()
    reward = ShortWindowWhisperReward(**(init | {"codec": codec}))
    texts = held_out("prosody")
    renderings = {f"monotone {p} {r}": [prosody_world.speak_codes(text_to_codes(t), [(i, j)] * 6) for t in texts]
                  for i, p in enumerate(prosody_world.PITCHES) for j, r in enumerate(prosody_world.RATES)}
    rng = random.Random(0)
    renderings["warm-start contours"] = [target_codes(t, 0.0, rng, "prosody") for t in texts]
    lines = ["| rendering (correct words) | capped CER | NLL | reward | F0 std (st) |", "|---|---|---|---|---|"]
    for name, codes in renderings.items():
        result = reward.score([SpeechSample(text=t, codes=c) for t, c in zip(texts, codes)])
        m = result.metrics
        f0 = prosody_world.f0_spread(codec, codes, texts)["f0_std_st"]
        lines.append(f"| {name} | {m['cer'].clamp(max=1).mean():.3f} | {m['nll'].mean():.3f} | "
                     f"{result.rewards.mean():.3f} | {f0:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], choices=sorted(RUNS))
    p.add_argument("--out", type=Path, default=Path("runs/demo_measure"), help="where runs go")
    p.add_argument("--report_dirs", type=Path, nargs="*", help="run directories to report (default: --out)")
    p.add_argument("--rollouts", type=int, default=60, help="GRPO steps (rollouts); each makes --num_iterations updates")
    p.add_argument("--num_iterations", type=int, default=2)
    p.add_argument("--val_every", type=int, default=20)
    p.add_argument("--max_samples", type=int, help="stop each fit once this many completions were generated (equal sample budgets)")
    p.add_argument("--warm_steps", type=int, default=WarmStartConfig.steps, help="teacher-forcing steps of the warm start")
    p.add_argument("--label_noise", type=float, default=WarmStartConfig.label_noise,
                   help="share of words the warm start learns to say as their confusion partner (0: clean labels)")
    p.add_argument("--report", action="store_true")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--compare", type=Path, nargs="*", help="arm directories (one per variant) to compare side by side")
    p.add_argument("--world", choices=sorted(WORLDS), default="words",
                   help="prosody: small_world/prosody_world.py's codec, prompts, warm start and diversity measures")
    p.add_argument("--config", type=Path, help="another config (a file of this directory or a path); default: the world's")
    p.add_argument("--warm_dir", type=Path, help="where the warm starts are made or reused (default: --out), so arms share them")
    p.add_argument("--compare_prosody", type=Path, nargs="*", help="prosody-world arm directories, the CER+NLL-only one first")
    p.add_argument("--reward_by_contour", action="store_true",
                   help="score the held-out sentences' correct words at each fixed pitch x rate and with the warm "
                        "start's contours with the prosody world's reward (--config)")
    p.add_argument("extra", nargs="*", help="more CLI overrides after --, passed to validate and fit")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for name in args.runs:
        warm = warm_config(args.world, steps=args.warm_steps, label_noise=args.label_noise)
        s = run_one(name, args.out, args.rollouts, args.val_every, args.extra, args.num_iterations, warm, args.max_samples,
                    args.config, args.warm_dir)
        b, a = s["before"]["val/cer_capped_mean"], s["after"]["val/cer_capped_mean"]
        print(f"{name}: held-out capped CER {b:.3f} -> {a:.3f} ({(a - b) / b:+.0%})", flush=True)
    if args.report:
        print(report(args.report_dirs or [args.out], args.markdown, args.plot))
    if args.compare:
        print(compare(args.compare))
    if args.reward_by_contour:
        print(reward_by_contour(args.config))
    if args.compare_prosody:
        print(compare_prosody(args.compare_prosody))


if __name__ == "__main__":
    main()
