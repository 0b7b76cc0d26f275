"""Prosody statistics as a user sees them: a tiny CPU fit and `evaluate` through the CLI, with the real Whisper
tiny.en reward scoring audio from a tone codec (tests/prosody_codec.py)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("parselmouth", reason="prosody statistics need praat-parselmouth (requirements.txt)")
REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "lightning_grpo", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prosody_cli")
    cfg = yaml.safe_load((REPO / "configs/tiny_cpu.yaml").read_text())
    cfg["data"].update(prompts_per_step=2, val_prompts_per_step=2)
    cfg["rollout"].update(group_size=4, val_group_size=2)
    cfg["rollout"]["sampler"]["init_args"]["max_new_tokens"] = 40  # <= 2.6 s of tones: inside the 5 s window
    cfg["rollout"]["reward"] = {
        "class_path": "lightning_grpo.reward.short_window.ShortWindowWhisperReward",
        "init_args": {"whisper_model": "tiny.en-ct2", "window_s": 5.0, "codebook_size": 64, "batch_size": 16,
                      "max_transcript_tokens": 8, "codec": {"class_path": "prosody_codec.ToneCodec"}},
    }
    cfg["trainer"].update(max_steps=1, val_check_interval=1, default_root_dir=str(root), enable_progress_bar=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root)
    cfg["trainer"]["callbacks"] = []
    cfg["trainer"]["enable_checkpointing"] = False
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_logs_train_and_val_prosody_every_step(config):
    run_cli("fit", "--config", str(config))
    rows = list(csv.DictReader(next(config.parent.rglob("metrics.csv")).open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and "prosody" in k}
    for prefix in ("train", "val"):
        for stat in ("f0_std_st", "f0_range_st", "voiced_fraction", "energy_std_db", "speaking_rate", "pause_fraction"):
            assert f"{prefix}/prosody/{stat}_mean" in logged, f"{prefix}/prosody/{stat}_mean missing from {sorted(logged)}"
        assert f"{prefix}/prosody/f0_std_st_group_std_mean" in logged
    assert all(math.isfinite(v) for v in logged.values())
    assert logged["train/prosody/f0_std_st_mean"] > 0.5  # the tones move: a real contour was measured
    assert logged["train/prosody/voiced_fraction_mean"] > 0.5


def test_evaluate_reports_prosody_columns(config, tmp_path):
    run_cli("evaluate", "--config", str(config), "--out_dir", str(tmp_path))
    overall = json.loads((tmp_path / "metrics.json").read_text())["overall"]
    assert overall["prosody/f0_std_st"] > 0.5 and overall["prosody/speaking_rate"] > 0
    assert "prosody/f0_std_st" in (tmp_path / "metrics.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    for r in rows:  # not measured (null) only with a named prosody reason
        flagged = [k for k in r if k.startswith("prosody/reason_") and r[k] == 1.0]
        assert (r["prosody/f0_std_st"] is None) == bool(flagged), r
