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
    assert text.startswith("## Reward throughput (issue 3)")
    for row in ("original server", "WhisperReward, 1 per call", "WhisperReward, batch 1"):
        assert row in text
    assert "Largest reward difference batched vs 1 per call: 0.0e+00" in text
