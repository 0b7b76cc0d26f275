"""Every shipped config parses against the code's signatures; the CPU default runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from lightning_grpo.cli import build_cli
from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy

CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml") if p.name != "sweep.yaml")


class ParseOnly(LightningCLI):
    """Parses and type-checks a config (class_path init_args included) without building anything."""

    def instantiate_classes(self) -> None:
        pass


def parse(path: Path, *overrides: str):
    cli = ParseOnly(GRPOPolicy, PromptDataModule, args=["--config", str(path), *overrides], run=False,
                    parser_kwargs={"parser_mode": "omegaconf"})
    return cli.config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    cfg = parse(path)
    rollout = [c for c in cfg.trainer.callbacks if c.class_path.endswith("GRPORollout")]
    assert len(rollout) == 1, "every fit config needs exactly one GRPORollout callback"
    assert rollout[0].init_args.group_size >= 2


def test_original_recipe_values():
    cfg = parse(Path(__file__).parents[1] / "configs" / "llasa1b_original.yaml")
    r = [c for c in cfg.trainer.callbacks if c.class_path.endswith("GRPORollout")][0].init_args
    assert (cfg.data.prompts_per_step, r.group_size) == (8, 16)
    assert cfg.model.learning_rate == 1e-6 and cfg.model.beta == 0.0
    assert (cfg.model.epsilon_low, cfg.model.epsilon_high, cfg.model.dual_clip) == (0.2, 0.2, 3.0)
    assert cfg.model.loss_aggregation == "token-mean"
    s = r.sampler.init_args
    assert (s.temperature, s.top_p, s.max_new_tokens) == (0.8, 0.9, 2048)
    assert cfg.trainer.devices == 2


def test_bad_override_is_rejected_with_the_key(capsys):
    with pytest.raises(SystemExit):
        parse(CONFIGS[0], "--model.loss_aggregation", "sum")
    assert "loss_aggregation" in capsys.readouterr().err


def test_cpu_default_runs_from_the_cli(tmp_path):
    """The README's main command, shortened to 2 steps."""
    cli = build_cli(["fit", "--config", "configs/tiny_cpu.yaml", "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
                     f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    for key in ("train/reward_mean", "train/loss", "train/kl", "train/clip_fraction",
                "train/completion_length_mean", "train/truncation_rate", "val/reward"):
        assert key in metrics, key
    assert list(tmp_path.rglob("metrics.csv"))
