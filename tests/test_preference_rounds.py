"""A simulated preference study end to end, small: the tone world's tiny model, a scripted rater that listens
through the listening page's HTTP API and prefers more pitch movement, two DPO rounds from the commands a researcher
runs (pairs, label export, dpo fit, export). Small, so it checks what a small run can show: each round learns the
rater's preference on held-out pairs, the rater does not prefer the starting model on held-out prompts, and CER stays
within bounds. benchmarks/bench_preference_rounds.py is the measured version (BENCHMARKS.md, "Preference rounds")."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_two_dpo_rounds_raise_the_raters_preference_while_cer_holds(tmp_path):
    import bench_preference_rounds as bench

    rows = bench.main_bench(["--seeds", "0", "--rounds", "2", "--train_prompts", "24", "--k", "4", "--epochs", "4",
                             "--eval_k", "2", "--out", str(tmp_path)])
    base, first, second = rows
    for r in (first, second):
        assert r["exported"] > 0
        # held-out pairs the rater judged: after the round the model itself prefers the rater's choice
        assert r["val_dpo_accuracy"] > 0.5
    assert second["win_rate_vs_round0"] >= 0.5  # the rater does not prefer the starting model's held-out samples
    assert second["cer"] <= base["cer"] + 0.1  # the gate keeps noisy samples out of the pairs
