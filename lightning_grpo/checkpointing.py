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
A file checkpoint is written atomically on its own filesystem (`atomic_save`: a temporary file in the same
directory, fsync, rename), so a full disk or a kill mid-write leaves the previous file and no partial one;
Lightning's own writer stages the file under /tmp and copies it across filesystems, which a full disk cuts
short. A temporary file a killed run left is removed when the next run starts. `--ckpt_path last` also skips,
naming them, files that are not readable checkpoints (truncated by an earlier writer, or by hand) and resumes
from the newest intact one.

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
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

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


def atomic_save(obj: Any, path: str | Path, write: Callable[[Any, Any], None] | None = None) -> None:
    """`write(obj, file)` (default torch.save) into a temporary file beside `path`, fsync it, then rename it over `path`: a reader
    sees the old file or the whole new one. A failed write removes the temporary file and re-raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer with `atomic_save` for local paths (module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a readable checkpoint (a file torch.save wrote, or a complete sharded directory), else
    None. Reads only a file's zip directory, which sits at its end: a truncated file has none."""
    path = Path(path)
    if path.is_dir():
        return None if is_sharded_checkpoint(path) else f"a directory without {SHARDED_METADATA} (an unfinished sharded checkpoint)"
    if not path.is_file():
        return "no such file"
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a torch checkpoint ({type(e).__name__}: {e}; truncated, or not written by torch.save)"
    return None


class StepCheckpoint(ModelCheckpoint):
    def __init__(self, every_n_train_steps: int = 128, save_last: bool = True, save_top_k: int = -1, **kwargs) -> None:
        """
        Args:
            every_n_train_steps: save every n steps, i.e. rollouts (the original: 128).
            save_last: keep `last.ckpt` pointing at the newest state (what `--ckpt_path last` resumes).
            save_top_k: how many step checkpoints to keep; -1 keeps all, 1 only the newest, k the k newest.
            kwargs: any other ModelCheckpoint argument (dirpath, filename, monitor, ...); dirpath defaults to
                `<default_root_dir>/checkpoints`, the same for every resumed run.
        """
        if save_top_k not in (-1, 0, 1) and kwargs.get("monitor") is None:
            # ModelCheckpoint keeps k > 1 files only by ranking a monitored value (without one it refuses to start);
            # for step checkpoints that value is the step: the k newest
            kwargs.update(monitor="step", mode="max")
        super().__init__(every_n_train_steps=every_n_train_steps, save_last=save_last, save_top_k=save_top_k, **kwargs)

    def _default_dirpath(self, trainer) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._default_dirpath(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a writer the user configured stays
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and Path(self.dirpath).is_dir():  # a run killed mid-write left its temporary file
            for stale in Path(self.dirpath).glob(f".*{self.FILE_EXTENSION}.*.tmp"):
                stale.unlink(missing_ok=True)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:  # `ckpt_path="last"` asks before setup
        self._default_dirpath(trainer)
        if not self._fs.exists(self.dirpath):
            return set()
        # last.ckpt and every step checkpoint: Lightning picks the newest by modification time, which for a
        # sharded directory is not its completion time (module docstring), so only the newest is offered
        found = [os.path.normpath(p) for p in self._fs.ls(self.dirpath, detail=False) if str(p).endswith(self.FILE_EXTENSION)]
        problems = {p: why for p in found if not Path(p).is_dir() and (why := checkpoint_problem(p)) is not None}
        if problems:
            listed = "; ".join(f"{p}: {why}" for p, why in sorted(problems.items()))
            intact = [p for p in found if p not in problems]
            if not intact:
                raise RuntimeError(
                    f'--ckpt_path last: no checkpoint in {self.dirpath} is readable ({listed}); pass an intact one '
                    "with --ckpt_path PATH, or move that directory away to start from scratch"
                )
            rank_zero_warn(f"--ckpt_path last skips unreadable checkpoints: {listed}")
            found = intact
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
