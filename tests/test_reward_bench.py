import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reward_benchmark_smoke_runs_and_reports_all_modes(tmp_path):
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_reward.py", "--smoke", "--threads", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("## Reward throughput")
    for row in ("original server", "WhisperReward, 1 per call", "WhisperReward, batch 1"):
        assert row in text
    assert "Largest reward difference batched vs 1 per call: 0.0e+00" in text


def test_repetition_benchmark_smoke_reports_guard_on_and_off(tmp_path):
    out = tmp_path / "rep.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_repetition.py", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("## Repetition guard")
    assert "| english | on | 2 |" in text and "| english | off | 2 |" in text
    assert re.search(r"english: (\d+) -> \1 decoding steps \(0 saved", text)  # nothing loops: no step differs
