"""Per-GPU memory of every shipped GPU config, with the vLLM weight sync's own term: does each still fit?

Computed, not measured (no GPU): bench_step_memory.budget() per training GPU, term by term, for the layout of each
shipped config (model, GPUs it shards over, CPU offload, micro-batch, vLLM's gpu_memory_utilization, the card the
config's header names), and bench_lora_memory.llasa8b_budget() for the LoRA config. The rollout phase now counts what
a sync holds beside the engine's pool (bench_step_memory.sync_transient_bytes, from reading vLLM 0.32's layer-wise
reload): the (V, H) tensors it keeps to the sync's end (gathered from FSDP2 shards) and one padded (193,856, H) layer
it materialises, +1.6 GB (LLaSA-1B sharded), +2.4 GB (3B), +4.8 GB (8B); an unsharded policy hands its own tensors
(+0.8 GB for 1B under DDP, +1.6 GB for 8B under LoRA). tests/test_sync_memory.py checks SHIPPED against the configs.

    python benchmarks/bench_sync_memory.py [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_lora_memory import llasa8b_budget  # noqa: E402
from bench_sharded_memory import LLASA  # noqa: E402
from bench_step_memory import GB, Layout, budget, layer_activation_bytes, sync_transient_bytes  # noqa: E402
from common import markdown_table  # noqa: E402

# config -> (model, training GPUs the policy is sharded over (0: DDP), CPU offload, micro-batch rows,
#            gpu_memory_utilization, GB per GPU as the config's header names the card)
SHIPPED = {
    "llasa1b_original.yaml": ("LLaSA-1B", 2, False, 4, 0.6, 48.0),
    "llasa1b_prosody.yaml": ("LLaSA-1B", 2, False, 4, 0.6, 48.0),
    "llasa1b_server.yaml": ("LLaSA-1B", 0, False, 4, 0.3, 48.0),
    "llasa1b_multireward.yaml": ("LLaSA-1B", 0, False, 4, 0.3, 48.0),
    "llasa3b_fsdp.yaml": ("LLaSA-3B", 2, False, 4, 0.3, 48.0),
    "llasa8b_fsdp.yaml": ("LLaSA-8B", 4, False, 4, 0.3, 80.0),
    "llasa8b_fsdp_2nodes.yaml": ("LLaSA-8B", 8, False, 4, 0.3, 80.0),
    "llasa8b_fsdp_offload.yaml": ("LLaSA-8B", 2, True, 16, 0.6, 80.0),
}
LORA = ("llasa8b_lora.yaml", 0.5, 48.0)  # one GPU: LoRA over a bf16 base (bench_lora_memory)


def shipped_budgets() -> dict[str, dict]:
    """{config: {"gpu_gb", "sync", "rollout_without_sync", "rollout", "update"}} in bytes per training GPU."""
    out, layers = {}, {}
    for name, (model, fsdp, offload, rows, fraction, gpu) in SHIPPED.items():
        s = dataclasses.replace(LLASA[model], rows=rows)
        if (model, rows) not in layers:
            layers[model, rows] = layer_activation_bytes(s)
        b = budget(s, Layout(ddp=not fsdp, fsdp=fsdp, offload=offload, engine_fraction=fraction, gpu_gb=gpu),
                   layers[model, rows])
        sync = sync_transient_bytes(s, sharded=bool(fsdp))
        out[name] = {"gpu_gb": gpu, "sync": sync, "rollout_without_sync": b["totals"]["rollout"] - sync, **b["totals"]}
    name, fraction, gpu = LORA
    s = LLASA["LLaSA-8B"]
    _, lora = llasa8b_budget(gpu_gb=gpu, engine_fraction=fraction)
    sync, merged_layer = sync_transient_bytes(s, sharded=False), 6 * s.hidden * s.intermediate
    # the LoRA budget counts the larger of a merged layer (what it counted alone before) and the padded layer
    out[name] = {"gpu_gb": gpu, "sync": sync, "rollout_without_sync": lora["totals"]["rollout"] - sync + merged_layer,
                 **lora["totals"]}
    return out


def table(budgets: dict[str, dict]) -> str:
    rows = []
    for name, b in budgets.items():
        peak = max(b["rollout"], b["update"])
        rows.append([name, f"{b['gpu_gb']:g}", b["sync"] / GB, b["rollout_without_sync"] / GB, b["rollout"] / GB,
                     b["update"] / GB, f"yes ({b['gpu_gb'] - peak / GB:.1f} GB left)" if peak <= b["gpu_gb"] * GB
                     else f"no (+{(peak - b['gpu_gb'] * GB) / GB:.1f} GB)"])
    return markdown_table(["config", "GB per GPU", "sync term (GB)", "rollout peak without it (GB, as budgeted before)",
                           "rollout peak (GB)", "update peak (GB)", "fits"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the budgets (bytes) here")
    args = p.parse_args()
    budgets = shipped_budgets()
    print(table(budgets))
    if args.json:
        Path(args.json).write_text(json.dumps(budgets, indent=1))


if __name__ == "__main__":
    main()
