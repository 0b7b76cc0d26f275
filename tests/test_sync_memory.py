"""Every shipped GPU config still fits its GPUs with the vLLM sync's own memory term (benchmarks/bench_sync_memory.py),
and that benchmark's layouts are the configs' own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_configs import ROOT, parse

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_step_memory import GB, LLASA_1B, sync_transient_bytes  # noqa: E402
from bench_sync_memory import LORA, SHIPPED, shipped_budgets  # noqa: E402

MODELS = {"HKUSTAudio/Llasa-1B": "LLaSA-1B", "HKUSTAudio/Llasa-3B": "LLaSA-3B", "HKUSTAudio/Llasa-8B": "LLaSA-8B"}


def test_every_shipped_gpu_config_is_budgeted():
    """Every config that trains on GPUs with vLLM beside the policy; the disaggregated layouts (the engine in a
    generator process on GPUs of its own) carry their plans in their headers."""
    import yaml

    gpu_configs = set()
    for p in (ROOT / "configs").glob("*.yaml"):
        raw = yaml.safe_load(p.read_text())
        trainer, rollout = raw.get("trainer") or {}, raw.get("rollout") or {}
        if trainer.get("accelerator") == "gpu" and "GeneratorProcess" not in str(rollout.get("sampler")):
            gpu_configs.add(p.name)
    assert gpu_configs == set(SHIPPED) | {LORA[0]}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_budgeted_layout_is_the_configs(name):
    model, fsdp, offload, rows, fraction, _ = SHIPPED[name]
    cfg = parse(ROOT / "configs" / name)
    assert MODELS[cfg.model.model_name_or_path] == model
    assert cfg.model.micro_batch_size == rows and (cfg.model.fsdp_offload == "cpu") == offload
    assert cfg.rollout.sampler.init_args.gpu_memory_utilization == fraction
    strategy = cfg.trainer.strategy
    sharded = "ModelParallelStrategy" in str(getattr(strategy, "class_path", strategy))
    assert (strategy.init_args.data_parallel_size if sharded else 0) == fsdp


def test_sync_term():
    """(V, H) tensors kept (gathered from shards) plus one padded (193,856, H) layer, in bf16: 1B sharded 1.59 GB."""
    assert sync_transient_bytes(LLASA_1B, sharded=True) == (193_800 + 193_856) * 2048 * 2
    assert sync_transient_bytes(LLASA_1B, sharded=False) == 193_856 * 2048 * 2


@pytest.mark.slow  # ~2.5 min on 2 cores: one real decoder layer of each width counts its saved activations
def test_every_shipped_config_fits_with_the_sync_term():
    budgets = shipped_budgets()
    assert budgets["llasa8b_fsdp.yaml"]["sync"] == (2 * 193_800 + 193_856) * 4096 * 2
    for name, b in budgets.items():
        assert b["rollout"] - b["rollout_without_sync"] > 0.3 * GB, name
        assert max(b["rollout"], b["update"]) <= b["gpu_gb"] * GB, name
