"""`python -m lightning_grpo dpo {fit,validate} --config configs/tiny_dpo.yaml`: a preference round.

The same LightningCLI as GRPO's `fit` (model: GRPOPolicy, the same trainer, strategies, loggers and logged config),
with `data:` a PreferenceDataModule of labelled pairs instead of prompts and `--model.objective dpo` by default.
Nothing is sampled to train; the optional `rollout:` group (validation_rollout.ValidationRollout: a sampler and a
reward, as GRPO's) samples `--data.val_prompts` at each validation and logs them as GRPO's validation does. The
round's starting model is `--model.model_name_or_path` (an exported checkpoint: `python -m lightning_grpo export`),
which is also the frozen DPO reference.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .cli import build_cli
from .preference_data import PreferenceDataModule
from .reward.owner import SharedReward
from .reward.spec import owner_rewards_described
from .validation_rollout import ValidationRollout


class DPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ValidationRollout, "rollout")
        parser.set_defaults({"model.objective": "dpo", "model.beta": 0.1})

    def instantiate_classes(self) -> None:
        # as GRPO's fit: a SharedReward's reward is built from its description in the owner, not in every rank
        with owner_rewards_described(self.parser, self.config, SharedReward):
            super().instantiate_classes()

    def before_fit(self) -> None:
        if self.model.hparams.objective != "dpo":
            raise ValueError(f"`dpo fit` trains on preference pairs: --model.objective must be dpo, got "
                             f"{self.model.hparams.objective!r} (GRPO runs are `python -m lightning_grpo fit`)")


def build_dpo_cli(args: list[str] | None = None, run: bool = True) -> DPOCLI:
    return build_cli(args, run, DPOCLI, PreferenceDataModule)


def main(argv: list[str] | None = None) -> None:
    build_dpo_cli(argv)
