"""LightningCLI wiring and the extra subcommands; the signatures of the classes are the config."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .data import PromptDataModule
from .policy import GRPOPolicy

EXTRA_COMMANDS = {
    "serve": ("lightning_grpo.reward.server", "main"),
    "prepare": ("lightning_grpo.prepare", "main"),
    "evaluate": ("lightning_grpo.evaluate", "main"),
    "export": ("lightning_grpo.export", "main"),
}


class GRPOCLI(LightningCLI):
    pass


def build_cli(args: list[str] | None = None, run: bool = True) -> GRPOCLI:
    return GRPOCLI(
        GRPOPolicy,
        PromptDataModule,
        args=args,
        run=run,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point; argv None reads sys.argv (as `python -m lightning_grpo` does)."""
    import sys

    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in EXTRA_COMMANDS:
        import importlib

        module, fn = EXTRA_COMMANDS[words[0]]
        getattr(importlib.import_module(module), fn)(words[1:])
        return
    build_cli(argv)
