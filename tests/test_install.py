"""`pip install .` (not editable) gives a package that runs on its own: `python -m lightning_grpo fit` and
the small world's commands work from another directory, importing the installed copy, not this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def run(args: list[str], cwd: Path, site: Path, timeout: int = 300) -> str:
    # Only the installed copy is importable: PYTHONPATH is the install target, cwd is outside the checkout.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_a_non_editable_install_runs_fit_and_the_small_world_from_any_directory(tmp_path):
    # build from a copy: an in-place build would write build/ and *.egg-info into the checkout
    src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    shutil.copytree(ROOT / "lightning_grpo", src / "lightning_grpo", ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere.mkdir()
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)], cwd=tmp_path, site=site)
    assert (site / "lightning_grpo" / "assets" / "prompts_en_train.jsonl").is_file()  # package data travels
    assert not (site / "lightning_grpo" / "demo").exists() and not (site / "small_world").exists()

    imported = run([sys.executable, "-c", "import lightning_grpo; print(lightning_grpo.__file__)"], cwd=elsewhere, site=site)
    assert Path(imported.strip()).resolve() == (site / "lightning_grpo" / "__init__.py").resolve()

    # the CPU default, one step, from another directory (the config is the only file of the checkout it reads)
    run([sys.executable, "-m", "lightning_grpo", "fit", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
         "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
         "--data.prompts_per_step=2", "--rollout.group_size=2"], cwd=elsewhere, site=site)
    assert list((elsewhere / "runs" / "tiny_cpu").rglob("metrics.csv"))

    # the small world: a (tiny) warm start, then one GRPO step with the real Whisper tiny.en reward
    example = ROOT / "examples" / "small_world"
    run([sys.executable, str(example / "warm_start.py"), "--out", "runs/demo/warm_seed0", "--steps", "2",
         "--hidden_size", "16", "--num_layers", "1", "--num_train", "8", "--num_test", "4"], cwd=elsewhere, site=site)
    run([sys.executable, str(example / "cli.py"), "fit", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
         "--data.prompts_per_step=1", "--rollout.group_size=2", "--model.num_iterations=1"], cwd=elsewhere, site=site)
    config = yaml.safe_load(next((elsewhere / "runs" / "demo").rglob("config.yaml")).read_text())
    assert config["model"]["model_name_or_path"] == "runs/demo/warm_seed0"
    assert config["data"]["train_data"] == str(example / "prompts_train.jsonl")
    assert list((elsewhere / "runs" / "demo").rglob("metrics.csv"))
