"""The training progress bar of a step-bounded run.

A run is bounded by `--trainer.max_steps` (rollouts), so Lightning sets max_epochs to -1, and its rich bar then
titles the epoch `Epoch 8/-2` (its `max_epochs - 1`). `StepProgressBar` titles it with the step budget instead;
the bar itself already counts the epoch's batches up to the steps left.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """RichProgressBar titled `Epoch 8 of max_steps 100` when the run is bounded by steps, not epochs."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} of max_steps {self.trainer.max_steps}"
        # as the parent: pad to the validation title's width so the bar does not jump between the two
        return f"{description:{len(self.validation_description)}}"


def step_progress_bar(callbacks: list) -> None:
    """Replace Lightning's default rich bar in `callbacks` (a Trainer's list) by a StepProgressBar, in place."""
    for i, callback in enumerate(callbacks):
        if type(callback) is RichProgressBar:
            callbacks[i] = StepProgressBar()
