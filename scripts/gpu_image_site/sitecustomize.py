"""Dry run of scripts/gpu_check.sh: modules the GPU machine lacks are absent here too (see scripts/gpu_image.py).

On PYTHONPATH only in `gpu_check.sh --dry-run`; reads the blocked modules from $GPU_IMAGE_BLOCKED. Importing one
raises ModuleNotFoundError naming the fix; `importlib.util.find_spec` answers None for it, as for a missing module,
so optional imports probed that way take their "not installed" path, as on the GPU machine. Their distributions'
metadata is hidden the same way (`importlib.metadata.version`/`distribution` raise PackageNotFoundError), since
libraries also probe by metadata (torchmetrics imports librosa when `RequirementCache("librosa")` finds it installed).
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import sys


class _NotOnTheGPUMachine:
    def __init__(self, blocked: dict) -> None:
        self.blocked = blocked

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in self.blocked:
            raise ModuleNotFoundError(
                f"No module named {top!r}: the GPU machine's image lacks {self.blocked[top]} and scripts/gpu_wheels.sh "
                "does not carry it; add it (pinned) to gpu_wheels.sh, or import it lazily where the GPU run never goes",
                name=top,
            )
        return None


def _install(blocked: dict) -> None:
    sys.meta_path.insert(0, _NotOnTheGPUMachine(blocked))
    original = importlib.util.find_spec

    def find_spec(name, package=None):
        if not name.startswith(".") and name.partition(".")[0] in blocked:
            return None
        return original(name, package)

    importlib.util.find_spec = find_spec

    hidden = {_norm(dist) for dist in blocked.values()}
    version, distribution = importlib.metadata.version, importlib.metadata.distribution

    def hide(lookup):
        def wrapped(name):
            if _norm(name) in hidden:
                raise importlib.metadata.PackageNotFoundError(name)
            return lookup(name)
        return wrapped

    importlib.metadata.version, importlib.metadata.distribution = hide(version), hide(distribution)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


if os.environ.get("GPU_IMAGE_BLOCKED"):
    with open(os.environ["GPU_IMAGE_BLOCKED"]) as _f:
        _install(json.load(_f))
