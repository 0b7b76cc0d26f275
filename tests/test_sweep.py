"""Every key a W&B sweep sets is a valid fit-CLI override and lands on the intended argument."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from test_configs import parse

ROOT = Path(__file__).parents[1]
SWEEPS = [ROOT / "configs" / "sweep.yaml", *sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))]


def candidates(spec: dict) -> list:
    """The values a sweep can pick for one parameter: all listed values, or the range's ends."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def command_args(sweep: dict, overrides: dict) -> tuple[Path, list[str]]:
    """The agent's command with ${args} as W&B writes it (--key=value); returns (config, the rest)."""
    words = []
    for w in sweep["command"]:
        if w == "${args}":
            words += [f"--{k}={v}" for k, v in overrides.items()]
        elif not w.startswith("${"):
            words.append(w)
    fit = words.index("fit")
    rest = words[fit + 1 :]
    i = rest.index("--config")
    return ROOT / rest[i + 1], rest[:i] + rest[i + 2 :]


def lookup(cfg, key: str):
    """The parsed value of a dotted override key; `trainer.callbacks.init_args.*` means the GRPORollout."""
    parts = key.split(".")
    if parts[:3] == ["trainer", "callbacks", "init_args"]:
        rollouts = [c for c in cfg.trainer.callbacks if c.class_path.endswith("GRPORollout")]
        assert len(rollouts) == 1 and cfg.trainer.callbacks[-1] is rollouts[0], (
            "`trainer.callbacks.init_args.*` overrides the last callback: keep GRPORollout last in the config")
        node, parts = rollouts[0].init_args, parts[3:]
    else:
        node = cfg
    for p in parts:
        node = getattr(node, p)
    return node


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_swept_key_is_a_fit_override_that_lands(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["command"][:5] == ["${env}", "python", "-m", "lightning_grpo", "fit"]
    assert sweep["metric"]["name"] == "val/reward" or sweep["metric"]["name"].endswith("_mean")
    params = sweep["parameters"]
    rounds = max(len(candidates(s)) for s in params.values())
    for r in range(rounds):  # every candidate value of every key, all keys together each round
        chosen = {k: candidates(s)[r % len(candidates(s))] for k, s in params.items()}
        config, args = command_args(sweep, chosen)
        cfg = parse(config, *args)
        for key, value in chosen.items():
            assert lookup(cfg, key) == pytest.approx(value), key
        assert cfg.trainer.logger.class_path == "lightning.pytorch.loggers.WandbLogger"


def test_a_misspelt_key_is_rejected(capsys):
    sweep = yaml.safe_load(SWEEPS[0].read_text())
    config, args = command_args(sweep, {"trainer.callbacks.init_args.grup_size": 8})
    with pytest.raises(SystemExit):
        parse(config, *args)
    assert "grup_size" in capsys.readouterr().err
