"""LightningCLI wiring and the extra subcommands; the signatures of the classes are the config.

A run's config has four groups, each the `__init__` arguments of one class:

    model:    GRPOPolicy         the policy, its optimiser and the GRPO loss
    data:     PromptDataModule   prompts: sources, prompts per step
    rollout:  GRPORollout        G, truncation, its `sampler:` and its `reward:` (a callback the CLI adds)
    trainer:  lightning.Trainer  steps, devices, precision, logger, other callbacks

so `--rollout.group_size 16`, `--rollout.sampler.temperature 0.9` and `--rollout.reward.beta_c 2` work
as written (a class_path argument's `init_args` level may be left out on the command line). The whole
resolved config is logged to every logger as flat dotted keys, the same keys the command line and W&B
sweeps use (`rollout.reward.beta_c`), and saved as `config.yaml` in the run's log directory.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from .data import PromptDataModule
from .policy import GRPOPolicy
from .progress_bar import step_progress_bar
from .reward.owner import SharedReward
from .reward.spec import owner_rewards_described
from .rollout import GRPORollout

EXTRA_COMMANDS = {
    "serve": ("lightning_grpo.reward.server", "main"),
    "prepare": ("lightning_grpo.prepare", "main"),
    "evaluate": ("lightning_grpo.evaluate", "main"),
    "export": ("lightning_grpo.export", "main"),
    "rehearse": ("lightning_grpo.rehearse", "main"),
    "dpo": ("lightning_grpo.dpo_cli", "main"),
    "pairs": ("lightning_grpo.pairs", "main"),
    "label": ("lightning_grpo.label_app", "main"),
}

ROLLOUT_ARGS = frozenset(inspect.signature(GRPORollout.__init__).parameters) - {"self"}
# keys that were renamed: old -> (new, what changed)
RENAMED_DATA_KEYS = {
    "val_batch_size": ("val_prompts_per_step", "it counts prompts over all ranks, like prompts_per_step: "
                                               "the old value times the number of devices"),
}
# modules that were renamed: old dotted path -> new; a class_path under the old one names the new one
RENAMED_MODULES = {"lightning_grpo.reward.module": "lightning_grpo.reward.whisper"}


def flatten_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """A parsed config as flat dotted keys, the same keys the command line takes.

    `{class_path: C, init_args: {x: 1}}` becomes `prefix.class_path = C, prefix.x = 1`; a list of such
    objects (trainer.callbacks) is keyed by class name (`trainer.callbacks.StepCheckpoint.every_n_train_steps`);
    other lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(node, dict) and "class_path" in node:
        out[f"{prefix}class_path"] = node["class_path"]
        for extra in ("init_args", "dict_kwargs"):
            out.update(flatten_config(node.get(extra) or {}, prefix))
        return out
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "__path__":
                continue
            if isinstance(value, (dict, list)) and value and _is_objects(value):
                out.update(flatten_config(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out
    # a non-empty list of class_path objects
    names = [item["class_path"].rsplit(".", 1)[-1] for item in node]
    for i, (name, item) in enumerate(zip(names, node)):
        key = name if names.count(name) == 1 else f"{name}_{names[:i].count(name)}"
        out.update(flatten_config(item, f"{prefix}{key}."))
    return out


def _is_objects(value: dict | list) -> bool:
    if isinstance(value, dict):
        return True
    return all(isinstance(item, dict) and "class_path" in item for item in value)


class LogRunConfig(SaveConfigCallback):
    """Saves config.yaml in the log dir (Lightning's behaviour) and logs the whole resolved config, every
    nested knob as a flat dotted key, to every logger: W&B's run config, TensorBoard's and CSV's hparams.
    W&B can then filter, group and compare runs by any key, and a sweep's run config holds its swept keys."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        config.pop("config", None)  # the file paths; their content is what follows
        flat = flatten_config(config)
        for logger in trainer.loggers:
            logger.log_hyperparams(flat)


def check_removed_keys(args: list[str]) -> None:
    """Raise naming the new key when the command line or a --config file uses a key this version renamed."""
    for i, word in enumerate(args):
        key, _, inline = word.partition("=")
        value = inline if _ else (args[i + 1] if i + 1 < len(args) else "")
        if key.startswith("--trainer.callbacks.init_args."):
            parts = key[len("--trainer.callbacks.init_args."):].split(".")
            if parts[0] in ROLLOUT_ARGS:
                new = "--rollout." + ".".join(p for p in parts if p != "init_args")
                raise ValueError(
                    f"{key}: the rollout's arguments are a top-level config group; use {new} "
                    "(and `rollout:` in YAML instead of a GRPORollout entry in trainer.callbacks)"
                )
        elif key.startswith("--trainer.callbacks") and "GRPORollout" in value:
            raise ValueError(
                f"{word} {'' if inline else value}: GRPORollout is always added from the top-level `rollout:` "
                "group; set it with --rollout.group_size, --rollout.sampler, --rollout.reward, ..."
            )
        elif key.startswith("--data."):
            old = key[len("--data."):]
            if old in RENAMED_DATA_KEYS:
                new, why = RENAMED_DATA_KEYS[old]
                raise ValueError(f"{key} was renamed --data.{new}: {why}")
        elif key in ("-c", "--config") and value and Path(value).is_file():
            _check_config_file(Path(value))
        _check_class_path(word, "the command line")


def _check_class_path(node: Any, where: str, key: str = "") -> None:
    """Raise naming the new class_path where `node` (a string, or any YAML node below the dotted `key`) names a
    class in a renamed module."""
    if isinstance(node, dict):
        for k, item in node.items():
            _check_class_path(item, where, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _check_class_path(item, where, f"{key}[{i}]")
    elif isinstance(node, str):
        for old, new in RENAMED_MODULES.items():
            if old + "." in node:
                fixed = node.replace(old + ".", new + ".")
                raise ValueError(f"{where}{' ' + key if key else ''}: {node!r} names the module {old}, which was "
                                 f"renamed {new}; use {fixed!r}")


def _check_config_file(path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--config {path} is not a YAML text file (byte {e.object[e.start]:#04x} at offset {e.start} is not "
            "UTF-8); pass a YAML config such as configs/tiny_cpu.yaml"
        ) from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # the parser reports it
    if not isinstance(config, dict):
        return
    _check_class_path(config, str(path))
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("GRPORollout"):
            keys = ", ".join(f"rollout.{k}" for k in (cb.get("init_args") or {}))
            raise ValueError(
                f"{path}: GRPORollout is listed in trainer.callbacks; it is a top-level config group. "
                f"Move its init_args to `rollout:` beside model/data/trainer ({keys or 'rollout.sampler, rollout.reward'})"
            )
    data = config.get("data") or {}
    for old, (new, why) in RENAMED_DATA_KEYS.items():
        if isinstance(data, dict) and old in data:
            raise ValueError(f"{path}: data.{old} was renamed data.{new}: {why}")


class GRPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # A Callback class added as a group is instantiated from `rollout:` and appended to the
        # trainer's callbacks by LightningCLI (its `callback_keys`), wherever trainer.callbacks lists others.
        parser.add_lightning_class_args(GRPORollout, "rollout")

    def instantiate_classes(self) -> None:
        # a reward owner gets its reward as the parsed description, built in the owner and in no training rank
        with owner_rewards_described(self.parser, self.config, SharedReward):
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        step_progress_bar(trainer.callbacks)  # Lightning's default bar reads `Epoch 8/-2` in a max_steps run
        return trainer

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, list):
            check_removed_keys(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)


def build_cli(args: list[str] | None = None, run: bool = True, cli_class: type[LightningCLI] = GRPOCLI,
              datamodule_class: type = PromptDataModule) -> LightningCLI:
    """The run's CLI; `evaluate` and `dpo` pass their own classes (evaluate.py, dpo_cli.py)."""
    return cli_class(
        GRPOPolicy,
        datamodule_class,
        args=args,
        run=run,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=LogRunConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        # GRPOPolicy builds its own AdamW and schedule (`--model.learning_rate`, `--model.lr_schedule`)
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point; argv None reads sys.argv (as `python -m lightning_grpo` does)."""
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in EXTRA_COMMANDS:
        import importlib

        module, fn = EXTRA_COMMANDS[words[0]]
        getattr(importlib.import_module(module), fn)(words[1:])
        return
    build_cli(argv)
