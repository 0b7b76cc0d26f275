"""`StepCheckpoint`: Lightning's ModelCheckpoint that also saves the final step.

`ModelCheckpoint(every_n_train_steps=N, save_last=True)` leaves the steps after the last multiple of
N unsaved when `max_steps` is not a multiple of N; a GRPO run that stops at max_steps then loses its
tail. This subclass saves once more when training ends, so `last.ckpt` is always the final policy
(for `export`, `evaluate` and resuming). Everything else is ModelCheckpoint's, including resume.

Without `dirpath` it writes to `<trainer.default_root_dir>/checkpoints`, not into the logger's
`version_N/` directory: a resumed run gets a new logger version, and `--ckpt_path last` looks for
`last.ckpt` in the checkpoint directory of the *new* run, so a per-version directory never resumes.

`--ckpt_path last` resumes from the newest checkpoint of that directory, `last.ckpt` or a step
checkpoint: Lightning writes `step=N.ckpt` before it rewrites `last.ckpt`, so a run killed between
the two would otherwise resume from an older `last.ckpt`, or from scratch before the first one.
Each file is complete when it appears (Lightning writes through a temporary file).

Under ModelParallelStrategy (FSDP2) a checkpoint is a directory (`last.ckpt/`, `step=N.ckpt/`): every rank
writes its shards with torch.distributed.checkpoint, then rank 0 writes `meta.pt` (the step, loops,
callbacks, data position, LR schedule). A directory counts only once its `meta.pt` exists, and its age is
that file's: a directory's own modification time does not change when files inside it are rewritten
(`last.ckpt/` every step), and a run killed while rewriting `last.ckpt/` leaves its old `meta.pt`, so the
complete `step=N.ckpt/` written just before it is the newer one. All ranks must see the same filesystem.
`python -m lightning_grpo export` turns either form into an HF directory.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

SHARDED_METADATA = "meta.pt"  # what Lightning's ModelParallelStrategy writes last into a sharded checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A complete sharded (distributed) checkpoint directory."""
    return Path(path).is_dir() and (Path(path) / SHARDED_METADATA).is_file()


def completed_at(path: str | Path) -> float | None:
    """When a checkpoint was completed: a file's modification time, a sharded directory's `meta.pt`'s; None for an
    incomplete directory."""
    path = Path(path)
    if path.is_dir():
        return (path / SHARDED_METADATA).stat().st_mtime if is_sharded_checkpoint(path) else None
    return path.stat().st_mtime if path.is_file() else None


class StepCheckpoint(ModelCheckpoint):
    def __init__(self, every_n_train_steps: int = 128, save_last: bool = True, save_top_k: int = -1, **kwargs) -> None:
        """
        Args:
            every_n_train_steps: save every n steps, i.e. rollouts (the original: 128).
            save_last: keep `last.ckpt` pointing at the newest state (what `--ckpt_path last` resumes).
            save_top_k: how many step checkpoints to keep; -1 keeps all, 1 only the newest.
            kwargs: any other ModelCheckpoint argument (dirpath, filename, ...); dirpath defaults to
                `<default_root_dir>/checkpoints`, the same for every resumed run.
        """
        super().__init__(every_n_train_steps=every_n_train_steps, save_last=save_last, save_top_k=save_top_k, **kwargs)

    def _default_dirpath(self, trainer) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:  # `ckpt_path="last"` asks before setup
        self._default_dirpath(trainer)
        if not self._fs.exists(self.dirpath):
            return set()
        # last.ckpt and every step checkpoint: Lightning picks the newest by modification time, which for a
        # sharded directory is not its completion time (module docstring), so only the newest is offered
        found = [os.path.normpath(p) for p in self._fs.ls(self.dirpath, detail=False) if str(p).endswith(self.FILE_EXTENSION)]
        if not any(Path(p).is_dir() for p in found):
            return set(found)
        done = {p: t for p in found if (t := completed_at(p)) is not None}
        return {max(done, key=done.get)} if done else set()

    def on_train_batch_end(self, *args, **kwargs) -> None:
        # Lightning warns that with manual optimisation the checkpoint holds the weights after the
        # step's update; with global_step = steps done, that is exactly the state a resume needs.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(*args, **kwargs)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            if self.save_last:
                self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
