"""Every key a W&B sweep sets is a valid fit-CLI override, lands on the intended argument, and is a key of
the config every logger receives; a sweep run's W&B config (offline) holds its swept values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lightning_grpo.cli import flatten_config
from test_configs import lookup, parse_args

ROOT = Path(__file__).parents[1]
SWEEPS = [ROOT / "configs" / "sweep.yaml", *sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))]
sys.path.insert(0, str(ROOT / "examples"))


def candidates(spec: dict) -> list:
    """The values a sweep can pick for one parameter: all listed values, or the range's ends."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def command_args(sweep: dict, overrides: dict) -> list[str]:
    """The fit arguments of the agent's command with ${args} as W&B writes it (--key=value).

    `python -m lightning_grpo fit ...` as is; `python examples/small_world/cli.py fit ...` with the
    arguments that launcher adds (its config and prompt files)."""
    words = []
    for w in sweep["command"]:
        if w == "${args}":
            words += [f"--{k}={v}" for k, v in overrides.items()]
        elif not w.startswith("${"):
            words.append(w)
    rest = words[words.index("fit") + 1 :]
    if words[1] == "examples/small_world/cli.py":
        from small_world import config_args

        return [*config_args(), *rest]
    assert words[1:4] == ["-m", "lightning_grpo", "fit"], words
    return rest


def rounds(sweep: dict) -> list[dict]:
    """Every candidate value of every key, all keys together each round."""
    params = sweep["parameters"]
    n = max(len(candidates(s)) for s in params.values())
    return [{k: candidates(s)[r % len(candidates(s))] for k, s in params.items()} for r in range(n)]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_swept_key_is_a_fit_override_that_lands_and_is_logged(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["command"][0] == "${env}" and sweep["command"][1] == "python" and "fit" in sweep["command"]
    assert sweep["metric"]["name"] == "val/reward" or sweep["metric"]["name"].endswith("_mean")
    for chosen in rounds(sweep):
        cfg = parse_args(*command_args(sweep, chosen))
        logged = flatten_config(cfg.as_dict())
        for key, value in chosen.items():
            assert lookup(cfg, key) == pytest.approx(value), key
            assert logged[key] == pytest.approx(value), key  # the W&B run config key is the sweep's key
        assert cfg.trainer.logger.class_path == "lightning.pytorch.loggers.WandbLogger"


def test_the_tiny_sweep_keys_reach_the_built_objects(tmp_path):
    from lightning_grpo.cli import build_cli
    from lightning_grpo.rollout import GRPORollout

    sweep = yaml.safe_load(SWEEPS[0].read_text())
    chosen = rounds(sweep)[-1]
    args = [a for a in command_args(sweep, chosen) if not a.startswith("--trainer.logger")]
    cli = build_cli([*args, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False)
    rollout = next(c for c in cli.trainer.callbacks if isinstance(c, GRPORollout))
    assert rollout.group_size == chosen["rollout.group_size"]
    assert rollout.sampler.temperature == pytest.approx(chosen["rollout.sampler.temperature"])
    assert cli.model.hparams.learning_rate == pytest.approx(chosen["model.learning_rate"])
    assert cli.model.hparams.epsilon_high == chosen["model.epsilon_high"]


def test_a_misspelt_key_is_rejected(capsys):
    sweep = yaml.safe_load(SWEEPS[0].read_text())
    with pytest.raises(SystemExit):
        parse_args(*command_args(sweep, {"rollout.grup_size": 8}))
    assert "grup_size" in capsys.readouterr().err


def test_a_whisper_sweep_run_has_its_swept_values_in_the_wandb_config(tmp_path, monkeypatch):
    """One round of configs/sweeps/whisper_reward.yaml, shortened to one step of the tiny policy, logged
    by the WandbLogger the sweep's command sets, offline: the run config holds every swept key (e.g.
    `rollout.reward.beta_c`) with its value and the rest of the resolved config."""
    from lightning_grpo.cli import build_cli
    from lightning_grpo.reward.short_window import ShortWindowWhisperReward
    from lightning_grpo.rollout import GRPORollout

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sweep = yaml.safe_load(SWEEPS[1].read_text())
    chosen = {**rounds(sweep)[0], "rollout.reward.beta_c": 6.0, "rollout.group_size": 4}
    short = ["--model.model_name_or_path=builtin:tiny-llasa", "--data.prompts_per_step=1", "--trainer.max_steps=1",
             "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}",
             f"--trainer.logger.init_args.save_dir={tmp_path}"]
    cli = build_cli(["fit", *command_args(sweep, chosen), *short])
    rollout = next(c for c in cli.trainer.callbacks if isinstance(c, GRPORollout))
    assert isinstance(rollout.reward, ShortWindowWhisperReward) and rollout.reward.beta_c == 6.0
    run_config = dict(cli.trainer.logger.experiment.config)  # the W&B run's config, as `wandb sync` uploads it
    for key, value in chosen.items():
        assert run_config[key] == pytest.approx(value), key
    assert run_config["rollout.reward.whisper_model"] == "tiny.en-ct2"
    assert run_config["rollout.sampler.class_path"] == "lightning_grpo.sampling.HFSampler"
    assert run_config["model.model_name_or_path"] == "builtin:tiny-llasa" and run_config["trainer.max_steps"] == 1
    cli.trainer.logger.experiment.finish()
