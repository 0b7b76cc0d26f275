"""scripts/gpu_check.sh's bookkeeping: results.json and gpu_section.md under $OUT, rewritten after every stage.

    python scripts/gpu_results.py init    --out OUT --work WORK --mode gpu|dry-run
    python scripts/gpu_results.py record  --out OUT --work WORK --stage NAME --rc RC --seconds S --limit L
    python scripts/gpu_results.py summary --out OUT

A stage's figures are the JSON its benchmark wrote to WORK/NAME.json (tests: WORK/junit.xml, or the collection
count of a dry run); its markdown section WORK/NAME.md goes into gpu_section.md. Logs over 8 MiB are cut to their
first and last MiBs, since files over 16 MiB do not come back from the GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

STAGES = ("setup", "tests", "reward", "step", "server")
LOG_CAP = 8 * 2**20


def status(rc: int) -> str:
    return {0: "ok", -1: "skipped (no time left)", 124: "timed out", 137: "timed out (killed)"}.get(rc, f"failed (exit {rc})")


def junit_summary(path: Path) -> dict:
    """Counts and names from a pytest junit XML: failures with their message, skips with their reason."""
    root = ET.parse(path).getroot()
    out: dict = {"passed": [], "failed": [], "skipped": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            out["failed"].append({"test": name, "message": (failure.get("message") or "")[:600]})
        elif skipped is not None:
            out["skipped"].append({"test": name, "reason": (skipped.get("message") or "")[:300]})
        else:
            out["passed"].append({"test": name, "seconds": float(case.get("time", 0))})
    out["counts"] = {k: len(v) for k, v in out.items()}
    return out


def collected_summary(log: Path) -> dict:
    """`pytest --collect-only -q` output: the selected test ids and the count line."""
    text = log.read_text(errors="replace") if log.exists() else ""
    ids = [line for line in text.splitlines() if "::" in line and not line.startswith(("ERROR", "FAILED"))]
    m = re.search(r"(\d+)(?:/(\d+))? tests? collected(?: \((\d+) deselected\))?", text)
    return {"selected": ids, "count_line": m.group(0) if m else None, "errors": text.count("ERROR ")}


def cap_log(path: Path) -> None:
    if path.exists() and path.stat().st_size > LOG_CAP:
        data = path.read_bytes()
        path.write_bytes(data[: 2**20] + b"\n\n[... cut by gpu_results.py ...]\n\n" + data[-6 * 2**20 :])


def load(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def save(out: Path, results: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "results.json")


def section(results: dict, work: Path) -> str:
    setup = results["stages"].get("setup", {}).get("figures") or {}
    lines = [f"## GPU acceptance run ({results['mode']}): {results['started_utc']}", "",
             f"`bash scripts/gpu_check.sh` on {setup.get('gpu') or 'no GPU'}, Python {setup.get('python')}, "
             f"torch {(setup.get('versions') or {}).get('torch')}, transformers {(setup.get('versions') or {}).get('transformers')}.",
             "", "| stage | status | seconds | limit s |", "|---|---|---|---|"]
    for name in STAGES:
        s = results["stages"].get(name)
        if s:
            lines.append(f"| {name} | {s['status']} | {s['seconds']} | {s['limit']} |")
    tests = (results["stages"].get("tests") or {}).get("figures") or {}
    if "counts" in tests:
        lines += ["", "Tests (`pytest -m gpu`): " + ", ".join(f"{v} {k}" for k, v in tests["counts"].items()) + "."]
        lines += [f"- FAILED {f['test']}: {f['message'][:200]}" for f in tests["failed"]]
        lines += [f"- skipped {s['test']}: {s['reason'][:120]}" for s in tests["skipped"]]
    elif "count_line" in tests:
        lines += ["", f"Tests (dry run, collected only): {tests['count_line']}."]
    for name in ("reward", "step", "server"):
        md = work / f"{name}.md"
        if md.exists():
            lines += ["", md.read_text().replace("\n## ", "\n### ").replace("## ", "### ", 1).rstrip()]
    return "\n".join(lines) + "\n"


def headline(stage: str, fig: dict | None) -> str:
    """The stage's key figures in one line (the device tool shows the output's tail even if no file comes back)."""
    if not fig:
        return ""
    try:
        if stage == "tests" and "counts" in fig:
            return ", ".join(f"{v} {k}" for k, v in fig["counts"].items())
        if stage == "tests":
            return fig.get("count_line") or ""
        if stage == "reward":
            sp = fig["speedup_wall"]
            return f"batch {fig['settings']['batch_size']}: {sp['per-sample']:.2f}x vs 1 per call, {sp['original']:.2f}x vs original (goal 4x)"
        if stage == "step":
            m = fig["measured"]
            mfu = f", MFU {100 * m['mfu_update']:.1f}%" if m.get("mfu_update") else ""
            return (f"sample {m['sample_s']:.1f} s ({m['sample_tokens_per_s']:.0f} tok/s), update {m['update_s']:.2f} s{mfu}, "
                    f"peak {m['update_peak_gib'] or 0:.1f} GiB")
        if stage == "server":
            return f"{fig['throughput_ratio']:.2f}x micro-batching vs one at a time (goal 3x)"
        if stage == "setup":
            return f"{fig.get('gpu')}, torch {fig['versions'].get('torch')}"
    except (KeyError, TypeError, ZeroDivisionError) as e:  # a partial result: say so, do not fail the summary
        return f"(figures incomplete: {e!r})"
    return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["init", "record", "summary"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path)
    p.add_argument("--mode", choices=["gpu", "dry-run"])
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--rc", type=int)
    p.add_argument("--seconds", type=int)
    p.add_argument("--limit", type=int)
    a = p.parse_args()
    if a.action == "init":
        save(a.out, {"mode": a.mode, "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stages": {}})
        return
    if a.action == "summary":
        results = load(a.out)
        for name in STAGES:
            s = results["stages"].get(name)
            if s:
                print(f"  {name:7s} {s['status']:24s} {s['seconds']:4d} s   {headline(name, s.get('figures'))}")
        return
    with locked(a.work / ".lock"):  # the dry run records its stages concurrently
        record(a)


@contextlib.contextmanager
def locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def record(a: argparse.Namespace) -> None:
    results = load(a.out)
    figures = None
    if a.stage == "tests":
        junit = a.work / "junit.xml"
        if junit.exists():
            figures = junit_summary(junit)
        elif results["mode"] == "dry-run":
            figures = collected_summary(a.out / "tests.log")
    elif (a.work / f"{a.stage}.json").exists():
        figures = json.loads((a.work / f"{a.stage}.json").read_text())
    results["stages"][a.stage] = {"status": status(a.rc), "rc": a.rc, "seconds": a.seconds, "limit": a.limit,
                                  "figures": figures}
    cap_log(a.out / f"{a.stage}.log")
    save(a.out, results)
    (a.out / "gpu_section.md").write_text(section(results, a.work))


if __name__ == "__main__":
    main()
