"""Each benchmark runs end to end at its smallest size, so the published tables stay reproducible.

No timing asserts: only that the scripts run, that the figures they would publish exist, and the
correctness claims behind them (the memory benchmark's variants give the same loss and gradients).
They are `slow` (about 4 minutes together): CI runs them in `.ci/run`'s second pytest step, beside the config
rehearsals; the default suite stays the developer's quick check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), "--smoke", *args], capture_output=True, text=True, timeout=900,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, f"{name} --smoke failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_memory_variants_agree_in_process():
    import bench_memory as bm

    s = bm.SIZES["smoke"]
    x = bm.make_inputs(s)
    out = {v: bm.grpo_loss_and_grads(v, x, s) for v in bm.VARIANTS}
    for v, (impl, _, speech, head_dtype) in bm.VARIANTS.items():
        loss, gh, gw, entropy = out[v]
        ref_loss, ref_gh, ref_gw, _ = out["naive-speech" if speech else "naive"]
        assert (entropy is not None) == (impl == "ours+entropy"), v
        if entropy is not None:  # the entropy path: the same loss and gradients, and the dense entropy
            base = out["ours-speech" if speech else "ours"]
            assert all(torch.equal(a, b) for a, b in zip(out[v][:3], base[:3])), v
            assert torch.allclose(entropy.double(), bm.dense_entropy(x, s, speech), rtol=0, atol=1e-5), v
        if head_dtype == torch.bfloat16:  # the bf16-rounded head is another function: measured for memory only
            assert torch.isfinite(loss) and torch.isfinite(gw).all(), v
            continue
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), v
        assert torch.allclose(gh, ref_gh, rtol=1e-4, atol=1e-6), v
        assert torch.allclose(gw, ref_gw, rtol=1e-4, atol=1e-6), v
        assert gh.abs().sum() > 0 and gw.abs().sum() > 0, f"{v}: the loss must reach hidden and head"
        if speech:  # rows outside the scored range get no gradient
            lo, _ = bm.speech_rows(s)[0]
            assert gw[:lo].abs().sum() == 0, v
    # The speech-row loss is a different loss (renormalised over fewer rows), not a copy of the full one.
    assert not torch.allclose(out["naive"][1], out["naive-speech"][1])


def test_bench_memory_smoke(tmp_path):
    out = tmp_path / "memory.json"
    table = run_script("bench_memory.py", "--json", str(out))
    assert "| naive |" in table and "| ours |" in table and "| ours-speech |" in table
    assert "| ours + entropy |" in table and "| ours-speech + entropy |" in table
    raw = json.loads(out.read_text())
    for name, c in raw["checks"].items():
        assert c["loss_abs"] < 1e-5 and c["grad_hidden_rel"] < 1e-4 and c["grad_weight_rel"] < 1e-4, name
    assert set(raw["entropy_checks"]) == {"ours + entropy", "ours-speech + entropy"}
    for name, c in raw["entropy_checks"].items():
        assert c["entropy_abs"] < 1e-5 and c["loss_and_grads_equal_without"], name


def test_bench_cost_curve_smoke(tmp_path):
    png = tmp_path / "curve.png"
    table = run_script("bench_cost_curve.py", "--png", str(png))
    assert png.stat().st_size > 1000
    assert table.count("| group |") == 2  # the worker itself fails if a completion is not exactly T long


def test_bench_trl_smoke(tmp_path):
    pytest.importorskip("trl", reason="benchmark-only dependency: pip install -r requirements-bench.txt")
    out = tmp_path / "trl.json"
    table = run_script("bench_trl.py", "--json", str(out))
    raw = json.loads(out.read_text())
    assert set(raw) == {"ours (restrict off)", "TRL GRPOTrainer", "ours (default: speech-only)"}
    for name, r in raw.items():
        assert r["step_s"] > 0 and r["cpu_step_s"] > 0 and r["peak_rss_mib"] > r["rss_before_mib"] * 0.5, name
        assert 1 <= r["mean_completion_len"] <= 8, name
    assert "wall / TRL" in table and "CPU / TRL" in table


def test_bench_step_memory_smoke(tmp_path):
    """The budget's check runs the real training step at a tiny size; its parameter count formula matches
    the model (asserted by the script), and both phases are measured."""
    out = tmp_path / "step.json"
    table = run_script("bench_step_memory.py", "--json", str(out))
    assert "**backward phase: AdamW state + the backward terms**" in table and "**step phase" in table
    raw = json.loads(out.read_text())
    assert raw["measured"]["growth_mib"]["backward"] > 0 and raw["measured"]["growth_mib"]["step"] > 0
    assert raw["measured"]["rows"] == 4 and raw["measured"]["completion"] == 16  # 2 micro-batches of 2, C as set


def test_bench_lora_memory_smoke(tmp_path):
    """LoRA trains 2 steps under 2-process DDP (the script fails if the ranks' trained tensors differ); the counted
    bytes are what the layout implies: the frozen bf16 base at 2 bytes per parameter, only the adapters in the
    gradients and AdamW's state."""
    out = tmp_path / "lora.json"
    table = run_script("bench_lora_memory.py", "--json", str(out))
    assert "| LoRA r=16, bf16 base (DDP) |" in table and "| LLaSA-8B |" in table
    raw = json.loads(out.read_text())
    lora = raw["LoRA r=16, bf16 base (DDP)"][0]
    assert lora["bytes"]["frozen parameters"] == 2 * (lora["params"] - lora["trainable"])
    assert lora["bytes"]["trainable parameters"] == lora["bytes"]["gradients"] == 4 * lora["trainable"]
    assert 0 <= lora["bytes"]["AdamW state"] - 8 * lora["trainable"] < 1024  # + AdamW's scalar step counters
    assert all(r["lora_b_abs"] > 0 for r in raw["LoRA r=16, bf16 base (DDP)"])  # the adapters trained
    assert raw["check"]["predicted_mib"] > 0 and raw["sync"]["bytes"] > 0 and raw["sync"]["adapters"] > 0


def test_bench_multireward_smoke(tmp_path):
    """Both tables of BENCHMARKS.md, "Multi-reward" come out, the composite scored every sample, and SIM compared voices."""
    import bench_multireward

    text = bench_multireward.main(["--smoke", "--out", str(tmp_path / "multi.md")])
    assert "| GE2E embed, 4 waveforms in one call |" in text and "| SpeakerSimilarityReward, one sample per call |" in text
    for row in ("WhisperReward alone", "references as recordings", "references as codes (decoded)", "references cached"):
        assert f"| {row}" in text or f"| composite, {row}" in text, row
    assert "reasons ['ok']" in text and (tmp_path / "multi.md").read_text() == text


def test_offload_budget_moves_the_sharded_state_to_the_host():
    """budget() with FSDP2's CPU offload: the GPU loses exactly the sharded weights, gradients and AdamW state (16
    bytes per parameter / W) and gains only the two offload transients; the host holds them instead, the pinned
    shards rounded up to powers of two; the PCIe bytes per step are the hand-counted copies."""
    from bench_step_memory import SIZES, Layout, budget, host_bytes, offload_traffic, pinned_bytes, shard_sizes

    s = SIZES["smoke"]
    layer = {"per_token": 1000.0, "per_row_s2": 2.0, "weight_copies": 0.0}
    w, p = 2, s.params()
    plain, off = (budget(s, Layout(fsdp=w, offload=o), layer) for o in (False, True))
    assert off["resident"]["weights (fp32)"] == off["resident"]["AdamW state (fp32 exp_avg, exp_avg_sq)"] == 0
    assert off["backward"]["gradients (fp32)"] == 0 and sum(off["step"].values()) == 0
    transients = sum(v for k, v in off["backward"].items() if k.startswith("offload:"))
    assert transients > 0
    assert plain["totals"]["update"] - off["totals"]["update"] == pytest.approx(16 * p / w - transients)
    assert off["totals"]["rollout"] == pytest.approx(plain["totals"]["rollout"] - 12 * p / w)  # weights + AdamW left
    assert sum(shard_sizes(s, w)) >= p / w and sum(shard_sizes(s, 1)) == p
    host = host_bytes(s, Layout(fsdp=w, offload=True))
    assert host["AdamW state (fp32, pageable)"] == 8 * sum(shard_sizes(s, w))
    assert 4 * p / w <= host["weights (fp32 shards, pinned)"] < 8 * p / w + 4 * len(shard_sizes(s, w))
    assert [pinned_bytes(n) for n in (0, 1, 5, 8, 9)] == [0, 1, 8, 8, 16]
    layers = s.layers * s.layer_params()
    t = offload_traffic(s, Layout(fsdp=w, offload=True), micro_batches=3)
    assert t["in (host to GPU)"] == (3 * 4 * (p + layers) + 2 * p) / w and t["out (GPU to host)"] == 3 * 4 * p / w
    with pytest.raises(ValueError, match="set fsdp"):
        Layout(offload=True)


def test_bench_sharded_memory_smoke(tmp_path):
    """DDP vs FSDP2 on 2 CPU processes at a tiny size: each rank reports its parameters, gradients and AdamW state,
    and FSDP2's are half of DDP's (the sharding the published table measures)."""
    out = tmp_path / "sharded.json"
    table = run_script("bench_sharded_memory.py", "--json", str(out))
    assert "| DDP | 0 |" in table and "| FSDP2 | 1 |" in table
    raw = json.loads(out.read_text())
    ddp, fsdp = ([sum(r["state"].values()) for r in raw[m]["ranks"]] for m in ("DDP", "FSDP2"))
    assert all(s > 0 for s in ddp + fsdp) and len(ddp) == len(fsdp) == 2
    assert all(abs(f / d - 0.5) < 0.02 for f, d in zip(fsdp, ddp))  # an odd row count pads a shard by one row
def test_bench_overlap_smoke(tmp_path):
    """The overlap benchmark's main part at its smallest size: a calibration run, then sequential and overlapped
    steps with the sleeping reward in an owner process; its figures come from the steps' own timing logs."""
    out = tmp_path / "overlap.json"
    table = run_script("bench_overlap.py", "--part", "overlap", "--json", str(out))
    assert "| sequential |" in table and "| overlapped |" in table and "reward time hidden" in table
    raw = json.loads(out.read_text())["overlap"]
    seq, ovl = raw["runs"]["sequential"][0], raw["runs"]["overlapped"][0]
    for r in (seq, ovl):
        assert r["timing/generate"] > 0 and r["timing/update"] > 0 and r["timing/step"] > r["timing/generate"]
        assert r["timing/reward"] >= raw["per_sample_s"] * 4  # the owner slept its cost for 4 samples
    assert seq["timing/reward_wait"] >= seq["timing/reward"]  # sequential: every call waited for


@pytest.mark.slow
def test_bench_overlap_all_parts_smoke(tmp_path):
    out = tmp_path / "all.json"
    run_script("bench_overlap.py", "--json", str(out))
    raw = json.loads(out.read_text())
    assert raw["transport"]["http"]["two_ranks_ms"] > 0 and raw["transport"]["collective"]["two_ranks_ms"] > 0
    assert set(raw["whisper"]["runs"]) == {"in-process, sequential", "owner, sequential", "owner, overlapped"}
    assert all(r["timing/reward"] > 0 for r in raw["whisper"]["runs"].values())
    assert "configs/tiny_cpu.yaml" in raw["configs"]["runs"]


def test_bench_async_smoke(tmp_path):
    """The one-step-off benchmark at its smallest size with the sleeping generator: a calibration run, then a
    synchronous and a one-step-off run; the one-step-off run's samples are one update stale after its first step."""
    out = tmp_path / "async.json"
    table = run_script("bench_async.py", "--generators", "sleep", "--out", str(out))
    assert "| sleep | synchronous |" in table and "| sleep | one-step-off |" in table
    runs = json.loads(out.read_text())["sleep"]
    assert runs["0"][0]["staleness"] == [0.0] * 4 and runs["1"][0]["staleness"] == [0.0, 1.0, 1.0, 1.0]
    assert all(r[0]["timing/generate"] > 0 and r[0]["step_wall"] > 0 for r in runs.values())
