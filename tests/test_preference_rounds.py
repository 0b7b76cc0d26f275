"""A simulated preference study end to end, small: the tone world's tiny model, a scripted rater that listens
through the listening page's HTTP API and prefers more pitch movement, two DPO rounds from the commands a researcher
runs (pairs, label export, dpo fit, export); the rater's preference on held-out prompts rises while CER holds.
benchmarks/bench_preference_rounds.py is the measured version (BENCHMARKS.md, "Preference rounds")."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_two_dpo_rounds_raise_the_raters_preference_while_cer_holds(tmp_path):
    import bench_preference_rounds as bench

    rows = bench.main_bench(["--seeds", "0", "--rounds", "2", "--train_prompts", "24", "--epochs", "3",
                             "--eval_k", "4", "--out", str(tmp_path)])
    base, first, second = rows
    assert first["exported"] > 0 and second["exported"] > 0
    assert second["win_rate_vs_round0"] > 0.6  # the rater prefers the round-2 model's samples to the start's
    assert second["pitch_movement_st"] > base["pitch_movement_st"]
    assert second["cer"] <= base["cer"] + 0.05  # the gate keeps noisy samples out of the pairs: CER holds
