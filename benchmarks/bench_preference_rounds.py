"""Simulated preference rounds, end to end: pairs -> a scripted rater on the listening page -> export -> DPO.

The world is the tiny model with the tone codec (lightning_grpo/reward/tone.py: codes are pitches, a few are noise
frames, ToneReward's "CER" is the share of noise frames). The scripted rater listens as a person would: through the
page's HTTP API it fetches the two samples of each pair as wavs, measures their pitch movement (reward/prosody.py's
f0_std_st, Praat's pitch: f0 std in semitones) and prefers the livelier one (a tie within `--margin` semitones).
Each round runs the commands a researcher runs:

    pairs --config configs/tiny_preference.yaml --ckpt <round start> --data builtin:en --data.val_split train
    label --pairs ... --db ... --rater script        (the page's app; --serve: a real server process)
    label export ... --out prefs.parquet
    dpo fit --config configs/tiny_dpo.yaml --model.model_name_or_path <round start> --data.train_pairs prefs.parquet
    export --ckpt_path <its checkpoint> --out <next round's start>

Evaluation on the held-out prompts (builtin:en's test split, never in a pairs file), per model: samples from
`pairs --max_cer none` (k per prompt), their mean CER and pitch movement, and the rater's win rate of each model's
samples against the starting model's (sample i of prompt p against sample i of prompt p; a tie counts half).

    python benchmarks/bench_preference_rounds.py --seeds 0 1 2 --out runs/bench_preference  # prints a markdown table
    python benchmarks/bench_preference_rounds.py --smoke                                    # one seed, small
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import soundfile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT)]
from lightning_grpo.cli import main  # noqa: E402
from lightning_grpo.reward.prosody import prosody_stats  # noqa: E402

PAIRS_CONFIG = str(ROOT / "configs/tiny_preference.yaml")
DPO_CONFIG = str(ROOT / "configs/tiny_dpo.yaml")


def movement(wav_bytes: bytes) -> float:
    """Pitch movement (f0 std in semitones) of a wav; 0 for a sample without voiced frames."""
    wave, rate = soundfile.read(io.BytesIO(wav_bytes), dtype="float32")
    value = float(prosody_stats([torch.from_numpy(wave)], [""], rate).values["f0_std_st"][0])
    return 0.0 if math.isnan(value) else value


def prefer(first: float, second: float, margin: float) -> str:
    """The scripted rater's rule: the sample with more pitch movement, a tie within `margin` semitones."""
    if abs(first - second) < margin:
        return "tie"
    return "first" if first > second else "second"


def scripted_rater(client: httpx.Client, margin: float = 0.5) -> int:
    """Judge every pair the page serves to this client's rater, through the HTTP API; returns the judgements made."""
    made = 0
    while not (item := client.get("/api/next").json())["done"]:
        first, second = (movement(client.get(item[place]).content) for place in ("first", "second"))
        r = client.post("/api/judgements", json={"pair_id": item["pair_id"], "choice": prefer(first, second, margin)})
        r.raise_for_status()
        made += 1
    return made


def label_round(pairs: Path, db: Path, margin: float, serve: bool) -> None:
    """The scripted rater labels `pairs`: through a real `label` server process (serve) or the app in-process."""
    if serve:
        from label_fixtures import label_server

        with label_server(pairs, db, "--rater", "script") as (url, tokens, _):
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['script']}"}, timeout=60) as c:
                scripted_rater(c, margin)
        return
    from fastapi.testclient import TestClient

    from lightning_grpo.label_app import build_app

    app = build_app(pairs, db)
    token = app.state.store.add_rater("script")
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
        scripted_rater(c, margin)


def run_round(start: str | None, out: Path, seed: int, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """One round from model `start` (None: the config's); returns (the exported model dir, the round's numbers)."""
    pairs = out / "pairs"
    main(["pairs", "--config", PAIRS_CONFIG, *(["--ckpt", start] if start else []), "--data", "builtin:en",
          "--data.val_split=train", f"--data.max_val_samples={args.train_prompts}", "--out", str(pairs), "--k", str(args.k),
          "--pairs_per_prompt", str(args.k // 2), "--max_cer", str(args.max_cer), "--keep_truncated", f"--seed_everything={seed}",
          "--overwrite"])
    label_round(pairs, out / "labels.sqlite", args.margin, args.serve)
    prefs = out / "prefs.parquet"
    main(["label", "export", "--pairs", str(pairs), "--db", str(out / "labels.sqlite"), "--out", str(prefs)])
    run = out / "dpo"
    main(["dpo", "fit", "--config", DPO_CONFIG, *([f"--model.model_name_or_path={start}"] if start else []),
          f"--data.train_pairs={prefs}", f"--trainer.max_epochs={args.epochs}", f"--seed_everything={seed}",
          f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
          f"--model.dpo_cer_weight={args.cer_weight}", f"--model.learning_rate={args.lr}", f"--model.beta={args.beta}",
          "--trainer.enable_progress_bar=false"])
    ckpt = sorted(run.rglob("*.ckpt"))[-1]
    model = out / "model"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(model)])
    stats = json.loads(Path(f"{prefs}.stats.json").read_text())
    metrics = [line.split(",") for line in next(run.rglob("metrics.csv")).read_text().splitlines()]
    header, rows = metrics[0], metrics[1:]
    val = [r[header.index("val/dpo_accuracy")] for r in rows if r[header.index("val/dpo_accuracy")]]
    return str(model), {"pairs": stats["pairs"], "exported": stats["exported"],
                        "val_dpo_accuracy": float(val[-1]) if val else None}


def held_out_samples(model: str | None, out: Path, seed: int, k: int) -> list[dict[str, Any]]:
    """k samples per held-out prompt (no gate), in order, with their CER and pitch movement."""
    main(["pairs", "--config", PAIRS_CONFIG, *(["--ckpt", model] if model else []), "--data", "builtin:en",
          "--out", str(out), "--k", str(k), "--pairs_per_prompt", str(k // 2), "--max_cer", "none",
          "--keep_truncated", f"--seed_everything={seed + 1000}", "--overwrite"])
    samples = []
    for line in (out / "manifest.jsonl").read_text().splitlines():
        pair = json.loads(line)
        for side in "ab":
            s = pair[side]
            samples.append({"text": pair["text"], "cer": s["cer"],
                            "movement": movement((out / s["wav"]).read_bytes())})
    return samples


def win_rate(samples: list[dict], base: list[dict], margin: float) -> float:
    """The scripted rater's preference for `samples` over `base`: the i-th sample of a prompt against the base
    model's i-th sample of the same prompt (a tie counts half)."""
    by_text: dict[str, list[dict]] = {}
    for b in base:
        by_text.setdefault(b["text"], []).append(b)
    seen: dict[str, int] = {}
    score = []
    for s in samples:
        i = seen[s["text"]] = seen.get(s["text"], -1) + 1
        if i < len(by_text.get(s["text"], [])):
            other = by_text[s["text"]][i]
            score.append({"first": 1.0, "tie": 0.5, "second": 0.0}[prefer(s["movement"], other["movement"], margin)])
    return sum(score) / len(score)


def simulate(seed: int, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rounds 0..args.rounds for one seed: a row per model with its held-out numbers."""
    models: list[str | None] = [None]
    rounds: list[dict[str, Any]] = [{}]
    for r in range(1, args.rounds + 1):
        model, info = run_round(models[-1], out / f"round{r}", seed, args)
        models.append(model)
        rounds.append(info)
    evaluated = [held_out_samples(m, out / f"eval{i}", seed, args.eval_k) for i, m in enumerate(models)]
    return [{"seed": seed, "round": i, **rounds[i], "cer": statistics.mean(s["cer"] for s in ev),
             "pitch_movement_st": statistics.mean(s["movement"] for s in ev),
             "win_rate_vs_round0": win_rate(ev, evaluated[0], args.margin), "samples": len(ev)}
            for i, ev in enumerate(evaluated)]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train_prompts", type=int, default=48, help="training prompts per round (builtin:en train: 48)")
    p.add_argument("--k", type=int, default=8, help="samples per training prompt; k // 2 pairs per prompt")
    p.add_argument("--epochs", type=int, default=4, help="DPO epochs over each round's pairs")
    p.add_argument("--lr", type=float, default=3e-3, help="--model.learning_rate of the DPO rounds")
    p.add_argument("--beta", type=float, default=0.1, help="--model.beta, the DPO temperature")
    p.add_argument("--max_cer", type=float, default=0.15, help="the pairs gate")
    p.add_argument("--margin", type=float, default=0.5, help="the rater's tie margin in semitones")
    p.add_argument("--cer_weight", type=float, default=0.0, help="--model.dpo_cer_weight")
    p.add_argument("--eval_k", type=int, default=8, help="held-out samples per prompt per model")
    p.add_argument("--serve", action="store_true", help="label through a real `label` server process")
    p.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--smoke", action="store_true", help="one seed, one small round: seconds, for the smoke test")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.rounds, args.train_prompts, args.epochs, args.eval_k, args.k = [0], 1, 8, 1, 2, 4
    return args


def main_bench(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_preference_"))
    rows = [row for seed in args.seeds for row in simulate(seed, out / f"seed{seed}", args)]
    keys = ["seed", "round", "pairs", "exported", "val_dpo_accuracy", "cer", "pitch_movement_st", "win_rate_vs_round0"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row.get(k):.3f}" if isinstance(row.get(k), float) else str(row.get(k, ""))
                                for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main_bench()
