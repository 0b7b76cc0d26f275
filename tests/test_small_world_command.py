"""The README's main command: GRPO rewarded by the real Whisper tiny.en on the small world (configs/small_world.yaml),
run as a user runs it, shortened; it prints held-out CER before and after. Its shipped warm start is what
examples/small_world/warm_start.py makes; the progress bar of a step-bounded run names its step budget."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from small_world.unit_codec import NUM_UNITS  # noqa: E402
from small_world.warm_start import WarmStartConfig, warm_start  # noqa: E402

WARM = ROOT / "examples" / "small_world" / "warm_seed0"
CER_LINE = re.compile(r"held-out CER over (\d+) samples: ([0-9.]+) at step 0 -> ([0-9.]+) at step (\d+) \(([+-][0-9.]+)%\)")


def test_main_command_trains_with_whisper_and_prints_held_out_cer_before_and_after(tmp_path):
    args = [sys.executable, "-m", "lightning_grpo", "fit", "--config", "configs/small_world.yaml",
            # shortened: 2 steps of 1 prompt x 2 samples, 8 held-out sentences
            "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.prompts_per_step=1",
            "--rollout.group_size=2", "--model.num_iterations=1", "--data.max_val_samples=8",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    match = CER_LINE.search(output)
    assert match, output[-3000:]
    samples, before, after, step, change = match.groups()
    assert (int(samples), int(step)) == (8, 2)
    assert 0 <= float(before) <= 1 and 0 <= float(after) <= 1  # capped CER of real Whisper transcripts
    relative = 100 * (float(after) - float(before)) / float(before)
    assert float(change) == pytest.approx(relative, abs=0.6)  # computed before rounding to 3 decimals
    assert "Epoch 0 of max_steps 2" in output and "/-2" not in output  # the rich bar, as rendered off a terminal


def test_held_out_cer_without_validation_warns_with_the_flags_to_set():
    from lightning_grpo.held_out_cer import HeldOutCER

    with pytest.warns(UserWarning, match="num_sanity_val_steps -1"):
        HeldOutCER().on_fit_end(None, None)


def test_shipped_warm_start_is_what_warm_start_py_makes():
    """Its stamp holds the default settings (`warm_start.py --seed 0`) and the hash of the weights it wrote, so
    warm_start() reuses it as is; the weights load as the policy of the unit codec's 30 codes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_grpo.llasa import LlasaVocab

    stamp = json.loads((WARM / "warm_start.json").read_text())
    assert stamp["config"] == asdict(WarmStartConfig(seed=0))
    assert hashlib.sha256((WARM / "model.safetensors").read_bytes()).hexdigest() == stamp["sha256"]
    assert warm_start(WARM, WarmStartConfig(seed=0)) == WARM  # cached: not retrained
    model = AutoModelForCausalLM.from_pretrained(WARM)
    assert LlasaVocab.from_tokenizer(AutoTokenizer.from_pretrained(WARM)).num_speech_tokens == NUM_UNITS
    assert model.config.hidden_size == WarmStartConfig.hidden_size
    assert 0.2 < stamp["held_out"]["uer"] < 0.6  # reads, but mispronounces: what GRPO has to fix


@pytest.mark.slow
def test_warm_start_py_remakes_the_shipped_weights(tmp_path):
    """Retrained from scratch (about 2 minutes on one thread): the same weights, bit for bit, on this torch."""
    out = warm_start(tmp_path / "warm", WarmStartConfig(seed=0))
    shipped = json.loads((WARM / "warm_start.json").read_text())
    assert json.loads((out / "warm_start.json").read_text())["sha256"] == shipped["sha256"]


def test_step_bounded_progress_bar_names_the_step_budget():
    from lightning.pytorch.callbacks import RichProgressBar

    from lightning_grpo.cli import build_cli
    from lightning_grpo.progress_bar import StepProgressBar

    cli = build_cli(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--trainer.enable_progress_bar=true",
                     "--trainer.max_steps=40"], run=False)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, RichProgressBar)]
    assert len(bars) == 1 and isinstance(bars[0], StepProgressBar) and cli.trainer.progress_bar_callback is bars[0]
    cli.trainer.fit_loop.max_epochs = -1  # what fit runs with when max_steps bounds the run
    default = RichProgressBar()
    for bar in (bars[0], default):
        bar._trainer = cli.trainer  # as Lightning's setup hook does
    assert default._get_train_description(8).strip() == "Epoch 8/-2"
    assert bars[0]._get_train_description(8).strip() == "Epoch 8 of max_steps 40"
