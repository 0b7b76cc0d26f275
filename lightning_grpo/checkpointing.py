"""`StepCheckpoint`: Lightning's ModelCheckpoint that also saves the final step.

`ModelCheckpoint(every_n_train_steps=N, save_last=True)` leaves the steps after the last multiple of
N unsaved when `max_steps` is not a multiple of N; a GRPO run that stops at max_steps then loses its
tail. This subclass saves once more when training ends, so `last.ckpt` is always the final policy
(for `export`, `evaluate` and resuming). Everything else is ModelCheckpoint's, including resume.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    def __init__(self, every_n_train_steps: int = 128, save_last: bool = True, save_top_k: int = -1, **kwargs) -> None:
        """
        Args:
            every_n_train_steps: save every n optimiser steps (the original: 128).
            save_last: keep `last.ckpt` pointing at the newest state (what `--ckpt_path last` resumes).
            save_top_k: how many step checkpoints to keep; -1 keeps all, 1 only the newest.
            kwargs: any other ModelCheckpoint argument (dirpath, filename, ...).
        """
        super().__init__(every_n_train_steps=every_n_train_steps, save_last=save_last, save_top_k=save_top_k, **kwargs)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            if self.save_last:
                self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
