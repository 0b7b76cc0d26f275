"""The `rollout:` group of `dpo fit`: at each validation, sample held-out prompts and score them with a reward.

A preference round trains on labelled pairs and samples nothing; whether it held intelligibility and moved prosody
is read from fresh samples, as GRPO's validation reads it. `ValidationRollout` holds a GRPORollout (the same
sampler, reward, prompt encoding, truncation policy and scoring, from a fork of the RNG so training draws the same
either way) and gives each validation batch of prompts (PreferenceDataModule's `val_prompts`) the rollout GRPO's
validation gives it. The policy logs it as GRPO's validation does (GRPOPolicy.log_rollout_stats): val/reward_mean,
every reward metric as val/<metric>_mean (val/cer_mean; with WhisperReward's or ToneReward's `prosody`,
val/prosody/<stat>_mean and val/prosody/<stat>_group_std_mean), val/completion_length_*, val/truncation_rate and
val/entropy. Pair batches pass through to the DPO statistics. Without a sampler and a reward it does nothing.

    rollout:
      val_group_size: 2
      sampler: {class_path: lightning_grpo.sampling.HFSampler, init_args: {max_new_tokens: 16}}
      reward: {class_path: lightning_grpo.reward.tone.ToneReward, init_args: {prosody: true}}
    data:
      val_prompts: builtin:en
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L

from .reward.base import Reward
from .rollout import GRPORollout, TruncationPolicy
from .sampling import Sampler


class ValidationRollout(L.Callback):
    def __init__(
        self,
        sampler: Optional[Sampler] = None,
        reward: Optional[Reward] = None,
        val_group_size: int = 1,
        max_prompt_length: int = 512,
        truncation: TruncationPolicy = "penalize",
        truncation_reward: float = 0.0,
        restrict_to_speech: bool = True,
    ) -> None:
        """
        Args:
            sampler: who samples the validation prompts (lightning_grpo.sampling.HFSampler, ...), as GRPO's
                `rollout.sampler`; None with reward None: no sampled validation.
            reward: who scores them, any reward GRPO's `rollout.reward` takes (WhisperReward for CER and, with its
                `prosody` on, the prosody statistics; ToneReward in the tone world).
            val_group_size: samples per prompt; >= 2 also gives the prosody statistics' spread within a prompt.
            max_prompt_length, truncation, truncation_reward, restrict_to_speech: as GRPO's `rollout.*`.
        """
        super().__init__()
        if (sampler is None) != (reward is None):
            given, missing = ("sampler", "reward") if reward is None else ("reward", "sampler")
            raise ValueError(
                f"rollout.{given} is set but rollout.{missing} is not: `dpo fit` samples the held-out prompts "
                f"(--data.val_prompts) with rollout.sampler and scores them with rollout.reward; set both, or neither"
            )
        # group_size is GRPO's training G, unused here: validation samples val_group_size per prompt
        self.rollout = None if reward is None else GRPORollout(
            sampler, reward, group_size=2, val_group_size=val_group_size, max_prompt_length=max_prompt_length,
            truncation=truncation, truncation_reward=truncation_reward, restrict_to_speech=restrict_to_speech)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        prompts = getattr(trainer.datamodule, "val_prompts", None)
        if self.rollout is None:
            if prompts:
                raise ValueError(
                    f"--data.val_prompts={prompts} are sampled and scored at each validation, but the `rollout:` "
                    "group has no sampler and reward: set rollout.sampler and rollout.reward (docs/preference.md), "
                    "or drop data.val_prompts"
                )
            return
        if not prompts:
            raise ValueError(
                "rollout.reward scores samples of held-out prompts at each validation, but --data.val_prompts is not "
                "set: name a prompt source (builtin:en, a prompts file), or drop the `rollout:` group"
            )
        self.rollout.setup(trainer, pl_module, stage)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.rollout is not None:
            self.rollout.teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.rollout is not None:
            self.rollout.on_exception(trainer, pl_module, exception)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.rollout is None or "chosen" in batch:  # a batch of pairs: the DPO statistics
            return
        self.rollout.train_rollouts = trainer.global_step  # the sampler's step: the updates made so far
        self.rollout.on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
