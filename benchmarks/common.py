"""Shared plumbing of the benchmarks: fresh-subprocess runs, peak RSS, medians, markdown tables.

Every measurement that reports a peak runs in its own Python process, because the high-water mark
of a process's resident set never goes down: two variants measured in one process would share one peak. The worker prints one JSON line prefixed with `RESULT ` on stdout; the parent
parses it, so the rest of stdout/stderr (warnings, progress bars) can be anything.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

RESULT_PREFIX = "RESULT "
REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set, in MiB: /proc's VmHWM. Not ru_maxrss, which in a
    spawned worker also holds the parent's resident set at the spawn (Linux keeps the pre-exec memory's
    high-water mark in it), so a parent holding earlier results would raise a worker's figure."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def current_rss_mib() -> float:
    """Resident set right now, in MiB (from /proc; falls back to the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mib()


def emit(result: dict[str, Any]) -> None:
    """Worker side: hand one result dict to the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script: str, args: Sequence[str], threads: int, timeout: float = 3600) -> dict[str, Any]:
    """Run `python script args...` in a fresh process with `threads` intra-op threads; return its result."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(
        f"benchmark worker {' '.join(cmd)} exited with {proc.returncode} and no result;\n"
        f"stdout tail:\n{proc.stdout[-3000:]}\nstderr tail:\n{proc.stderr[-3000:]}"
    )


def median_after_warmup(stamps: Sequence[float], warmup: int) -> tuple[float, list[float]]:
    """Step durations from end-of-step timestamps, dropping the first `warmup` steps; (median, durations)."""
    durations = [b - a for a, b in zip(stamps[:-1], stamps[1:])][max(warmup - 1, 0) :]
    if not durations:
        raise ValueError(f"{len(stamps)} step timestamps leave no step after {warmup} warm-up steps; run more steps")
    return statistics.median(durations), durations


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (goes into the table header)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
