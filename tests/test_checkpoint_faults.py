"""Checkpoints under faults: a write that fails (a full disk) leaves the previous checkpoints whole and no partial
file, and `--ckpt_path last` skips unreadable checkpoints, naming them, to resume from the newest intact one."""

from __future__ import annotations

import csv
import errno
import io
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_checkpoint import run

try:
    from lightning_grpo.checkpointing import atomic_save, checkpoint_problem
except ImportError:  # BEFORE-FIX PROBE
    import zipfile
    atomic_save = None
    def checkpoint_problem(p):
        try:
            zipfile.ZipFile(p).namelist()
        except Exception as e:
            return str(e)


def logged_steps(root: Path) -> list[int]:
    newest = sorted((root / "run").glob("version_*/metrics.csv"))[-1]
    with newest.open() as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def disk_fills_after(limit: int):
    """A torch.save whose file write stops with ENOSPC after `limit` bytes, as a full disk does."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:limit])
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, target)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"step": 2, "big": torch.zeros(10_000)}, target, write=disk_fills_after(1000))
    assert torch.load(target)["step"] == 1 and os.listdir(tmp_path) == ["last.ckpt"]


def test_a_full_disk_during_training_leaves_a_resumable_directory(tmp_path, monkeypatch):
    """The step-4 checkpoint fails halfway: step 2's files stay whole, nothing partial is left, and `last`
    resumes from step 2."""
    run(tmp_path, 2, 2)
    monkeypatch.setattr(torch, "save", disk_fills_after(4096))
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path, 4, 2, ckpt_path="last")
    monkeypatch.undo()
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert all(checkpoint_problem(p) is None for p in ckpt.iterdir())
    (ckpt / ".last.ckpt.x1y2.tmp").write_bytes(b"PK cut")  # what a SIGKILL mid-write leaves
    trainer, _, _ = run(tmp_path, 4, 2, ckpt_path="last")
    assert logged_steps(tmp_path) == [2, 3] and trainer.global_step == 4
    assert not list(ckpt.glob("*.tmp"))  # removed at the start of the resumed run


def test_resume_last_skips_a_truncated_newest_checkpoint_and_names_it(tmp_path):
    run(tmp_path, 4, 2)
    ckpt = tmp_path / "ckpt"
    for path in (ckpt / "last.ckpt", next(ckpt.glob("*step=4.ckpt"))):  # what a copy cut short by a full disk leaves
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"skips unreadable checkpoints: .*step=4.ckpt: not a torch checkpoint.*last.ckpt: not a torch checkpoint"):
        trainer, _, _ = run(tmp_path, 6, 2, ckpt_path="last")
    assert logged_steps(tmp_path) == [2, 3, 4, 5] and trainer.global_step == 6


def test_resume_last_with_no_readable_checkpoint_stops_naming_them(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(RuntimeError, match=r"no checkpoint in .*ckpt is readable .*last.ckpt: not a torch checkpoint"):
        run(tmp_path, 2, 2, ckpt_path="last")


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs (needs root and mount): room for three checkpoints of the tiny policy (1.4 MB each)."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_real_full_disk_leaves_the_newest_intact_checkpoint_resumable(tmp_path, small_disk):
    """Checkpoints every step fill the disk. Lightning's own writer staged each file on another filesystem and
    copied it, so the copy cut short left a truncated newest file that `last` then failed to read."""
    root = tmp_path / "run_root"
    with pytest.raises((OSError, RuntimeError)):  # torch's zip writer reports the short write as a RuntimeError
        run(root, 40, 1, ckpt_dir=small_disk)
    saved = sorted(small_disk.iterdir())
    assert all(checkpoint_problem(p) is None for p in saved), [(p.name, checkpoint_problem(p)) for p in saved]
    assert all(p.name.endswith(".ckpt") for p in saved)  # no temporary file left behind
    newest = max(torch.load(p, weights_only=True)["global_step"] for p in saved)
    assert newest >= 2
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)  # the operator frees space
    trainer, _, _ = run(root, newest + 1, 100, ckpt_path="last", ckpt_dir=small_disk)
    assert logged_steps(root) == [newest] and trainer.global_step == newest + 1
