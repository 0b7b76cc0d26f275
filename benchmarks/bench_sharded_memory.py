"""Per-rank memory of one GRPO step, DDP vs FSDP2 (ModelParallelStrategy), measured on 2 CPU processes, and the
bytes per parameter of LLaSA-1B/3B/8B on 2 and 8 GPUs computed from the same accounting.

Measured: the same GRPO step (GRPOPolicy under Lightning, 2 gloo processes, AdamW, 2 micro-batches per update,
gradient checkpointing, every completion exactly C tokens) at a mid-size Llama with LLaSA's vocabulary, once per mode,
each mode in fresh processes. Per rank: the bytes of the parameters, gradients and AdamW state this rank holds at the
second step's optimizer step (the state exists from the first), counted over unique tensor storages (a DTensor
counts its local shard); the peak resident set of the second step (VmHWM reset at its start) above the process's
resident set after its imports, before the model is built: the state plus what is gathered, the activations and
the communication buffers; and the peak resident set from the imports to fit start: loading (every rank reads the
whole fp32 model, or with `load_on_rank0` rank 0 alone, the others building on the meta device) and sharding.

Computed: bench_step_memory.budget() per GPU, term by term, for LLaSA-1B/3B/8B (real shapes) under DDP and FSDP2 on
2, 4 and 8 GPUs, with the vLLM engine colocated at 0.3 of an 80 GB GPU; for LLaSA-8B on 2 GPUs also with micro-batch 1.
With FSDP2's CPU offload (`--model.fsdp_offload cpu`): LLaSA-3B/8B on 2 x 80 GB and 2 x 48 GB, the host RAM it needs
(bench_step_memory.host_bytes) and the bytes it moves over PCIe per step (offload_traffic), with transfer times
estimated from link rates. Measured beside them: one AdamW step over fp32 tensors on this CPU, torch's fused CPU
kernel (what an offloaded policy steps with) vs its default single-tensor loop, extrapolated to an 8B shard.

A mode is one entry of MODES: the strategy and the policy's arguments. Add a row (LoRA: `policy_kwargs` with
`lora`) without touching the rest.

    python benchmarks/bench_sharded_memory.py           # the measurement (~13 min on 2 cores) and the tables
    python benchmarks/bench_sharded_memory.py --tables  # the computed tables and the AdamW timing only (~1 min)
    python benchmarks/bench_sharded_memory.py --smoke   # tiny model, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_step_memory import (GB, MIB, Layout, Shape, budget, host_bytes, layer_activation_bytes,  # noqa: E402
                               offload_traffic)
from common import current_rss_mib, emit, machine_info, markdown_table, run_worker  # noqa: E402

import torch  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Mode:
    strategy: Callable[[], Any]  # a Lightning strategy for 2 processes
    policy_kwargs: dict = dataclasses.field(default_factory=dict)


def _ddp():
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(gradient_as_bucket_view=True)


def _fsdp2():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


MODES: dict[str, Mode] = {
    "DDP": Mode(_ddp),
    "FSDP2": Mode(_fsdp2),
    "FSDP2, load_on_rank0": Mode(_fsdp2, {"load_on_rank0": True}),
    # on CPU processes FSDP2's copies to and from the host are no-ops: the row shows the offloaded path at this size,
    # its state bytes and AdamW's fused CPU kernel; what it saves on a GPU is computed (offload_table)
    "FSDP2, CPU offload": Mode(_fsdp2, {"fsdp_offload": "cpu"}),
}
SMOKE_MODES = ("DDP", "FSDP2")  # the smoke run (a test of the default suite): tests/test_fsdp.py runs the others

SIZES = {
    # mid-size: LLaSA's 193,800-row vocabulary (tied, as LLaSA-1B/3B) on a 512-wide, 8-layer Llama: 130M parameters
    "mid": Shape(vocab=193_800, scored=65_539, hidden=512, layers=8, intermediate=2048, heads=8, kv_heads=2,
                 tied=True, rows=4, prompt=0, completion=256, chunk=256),
    # loading: layers hold most of the parameters (as in LLaSA-3B/8B: the embedding is 17% / 9% of them), 186M
    "layers": Shape(vocab=3000, scored=2048 + 3, hidden=1024, layers=12, intermediate=4096, heads=8, kv_heads=2,
                    tied=True, rows=2, prompt=0, completion=16, chunk=16),
    "smoke": Shape(vocab=3000, scored=2048 + 3, hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2,
                   tied=True, rows=2, prompt=0, completion=16, chunk=8),
}
LOADING_MODES = ("FSDP2", "FSDP2, load_on_rank0")
LLASA = {  # the real shapes (Llama-3.2-1B/3B, Llama-3.1-8B with LLaSA's vocabulary), micro-batch 4 x (512 + 2048)
    "LLaSA-1B": Shape(vocab=193_800, scored=65_539, hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8,
                      tied=True, rows=4, prompt=512, completion=2048),
    "LLaSA-3B": Shape(vocab=193_800, scored=65_539, hidden=3072, layers=28, intermediate=8192, heads=24, kv_heads=8,
                      tied=True, rows=4, prompt=512, completion=2048),
    "LLaSA-8B": Shape(vocab=193_800, scored=65_539, hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8,
                      tied=False, rows=4, prompt=512, completion=2048),
}


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _state_bytes(policy, optimizer) -> dict[str, int]:
    """Bytes of this rank's parameters, gradients and optimizer state (local shards), unique storages."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            st = local(t).untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total

    params = list(policy.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"parameters": nbytes(params), "gradients": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(state)}


def worker(mode: str, size: str, model_dir: str) -> None:
    import lightning as L
    import torch.distributed as dist

    from lightning_grpo.data import PromptDataModule
    from lightning_grpo.llasa import LlasaVocab, codes_to_ids
    from lightning_grpo.policy import GRPOPolicy
    from lightning_grpo.reward.rule import RuleReward
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.sampling import Completions

    s = SIZES[size]
    baseline = current_rss_mib()  # after the imports, before the model

    class FixedLength:  # every completion exactly C tokens: C - 1 speech tokens and the stop token
        temperature, top_p, top_k, max_new_tokens = 1.0, 1.0, 0, s.completion

        def setup(self, pl_module):
            self.vocab = LlasaVocab.from_tokenizer(pl_module.tokenizer)

        def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
            ids = codes_to_ids([7] * (s.completion - 1), self.vocab)
            return Completions(ids=[list(ids) for _ in range(len(prompts) * n)], truncated=[False] * (len(prompts) * n))

    class Measure(L.Callback):
        def on_fit_start(self, trainer, pl_module):  # the model is built, loaded and sharded
            self.load_peak = _vm_kib("VmHWM") / 1024 - baseline

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of this step only

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.state = _state_bytes(pl_module.policy, optimizer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.peak = _vm_kib("VmHWM") / 1024 - baseline

        def on_train_end(self, trainer, pl_module):
            mine = {"rank": trainer.global_rank, "state": self.state, "peak_step_mib": self.peak, "load_peak_mib": self.load_peak,
                    "params": sum(p.numel() for p in pl_module.policy.parameters())}
            everyone = [None] * trainer.world_size
            dist.all_gather_object(everyone, mine)
            if trainer.global_rank == 0:
                emit({"mode": mode, "ranks": everyone})

    L.seed_everything(0)
    m = MODES[mode]
    policy = GRPOPolicy(model_name_or_path=model_dir, micro_batch_size=s.rows // 2, gradient_checkpointing=True,
                        learning_rate=1e-6, logprob_chunk_size=s.chunk, **m.policy_kwargs)
    L.Trainer(accelerator="cpu", devices=2, strategy=m.strategy(), max_steps=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=[GRPORollout(FixedLength(), RuleReward(), group_size=s.rows), Measure()],
              ).fit(policy, PromptDataModule(prompts_per_step=2, val_data=None))


def save_model(s: Shape, path: str) -> None:
    from transformers import LlamaForCausalLM

    from lightning_grpo.tiny import build_tiny_tokenizer, tiny_llama_config

    tok = build_tiny_tokenizer(num_speech_tokens=s.scored - 3)
    cfg = tiny_llama_config(s.vocab, s.hidden, s.layers, intermediate_size=s.intermediate, num_attention_heads=s.heads,
                            num_key_value_heads=s.kv_heads, tie_word_embeddings=s.tied, max_position_embeddings=4096,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def run_modes(size: str, modes, threads: int) -> dict[str, dict]:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # inherited: blocks of 64 KiB or more go back on free
    with tempfile.TemporaryDirectory() as tmp:
        save_model(SIZES[size], tmp)
        return {mode: run_worker(__file__, ["--worker", mode, "--size", size, "--model_dir", tmp], threads)
                for mode in modes}


def measure(size: str, threads: int) -> tuple[str, dict]:
    s = SIZES[size]
    got = run_modes(size, MODES if size != "smoke" else SMOKE_MODES, threads)
    params = got["DDP"]["ranks"][0]["params"]
    assert params == s.params(), (params, s.params())
    rows, ddp_state = [], None
    for mode, r in got.items():
        for rank in r["ranks"]:
            st = rank["state"]
            total = sum(st.values())
            ddp_state = total if mode == "DDP" and ddp_state is None else ddp_state
            rows.append([mode, rank["rank"], st["parameters"] / MIB, st["gradients"] / MIB, st["optimizer"] / MIB,
                         total / MIB, f"{total / ddp_state:.3f}x", total / params, rank["peak_step_mib"],
                         rank["load_peak_mib"]])
    header = (f"measured: {params:,} parameters (V={s.vocab:,}, H={s.hidden}, {s.layers} layers, I={s.intermediate}, "
              f"tied), 2 CPU processes (gloo), micro-batch {s.rows // 2} rows x C={s.completion}, 2 per update, fp32 "
              f"(32-true), gradient checkpointing, AdamW, no reference\nmachine: {json.dumps(machine_info())}")
    table = markdown_table(["mode", "rank", "parameters (MiB)", "gradients (MiB)", "AdamW state (MiB)",
                            "parameters + gradients + AdamW (MiB)", "vs DDP", "bytes / parameter",
                            "peak RSS of the step above the imports (MiB)",
                            "peak RSS while loading, up to fit start (MiB)"], rows)
    return header + "\n\n" + table, got


def loading(threads: int) -> tuple[str, dict]:
    """Peak resident set up to fit start, every rank loading the whole model vs rank 0 alone (load_on_rank0), at a
    size where the layers, not the embedding, hold the parameters."""
    s = SIZES["layers"]
    got = run_modes("layers", LOADING_MODES, threads)
    model_mib = 4 * s.params() / MIB
    rows = [[mode, rank["rank"], rank["load_peak_mib"], f"{rank['load_peak_mib'] / model_mib:.2f}x"]
            for mode, r in got.items() for rank in r["ranks"]]
    header = (f"loading: {s.params():,} parameters ({model_mib:.0f} MiB in fp32; the largest tensor, a layer's MLP "
              f"matrix, {4 * s.hidden * s.intermediate / MIB:.0f} MiB; V={s.vocab:,}, H={s.hidden}, {s.layers} layers, "
              f"I={s.intermediate}), 2 CPU processes, FSDP2")
    table = markdown_table(["mode", "rank", "peak RSS from the imports to fit start (MiB)", "vs the fp32 model"], rows)
    return header + "\n\n" + table, got


def llasa_table() -> tuple[str, dict]:
    """Per GPU, from budget(): the sharded state in bytes per parameter and GB, the update and rollout peaks with
    vLLM at 0.3 of 80 GB, for DDP and FSDP2 on 2 and 8 GPUs."""
    rows, raw = [], {}
    for name, s in LLASA.items():
        layer = layer_activation_bytes(s)
        for gpus in (2, 4, 8):
            for mode, kw in (("DDP", {}), ("FSDP2", {"fsdp": gpus})):
                b = budget(s, Layout(gpu_gb=80.0, engine_fraction=0.3, **kw), layer)
                state = sum(b["resident"][t] for t in ("weights (fp32)", "AdamW state (fp32 exp_avg, exp_avg_sq)"))
                state += b["backward"]["gradients (fp32)"]
                peak = max(b["totals"].values())
                raw[f"{name}/{gpus}/{mode}"] = b
                rows.append([name, f"{s.params() / 1e9:.2f}B", gpus, mode, s.rows, state / s.params(), state / GB,
                             b["totals"]["update"] / GB, b["totals"]["rollout"] / GB, _fits(peak)])
    s = dataclasses.replace(LLASA["LLaSA-8B"], rows=1)  # the smallest micro-batch: what activations can still give
    b = budget(s, Layout(gpu_gb=80.0, engine_fraction=0.3, fsdp=2), layer_activation_bytes(s))
    raw["LLaSA-8B/2/FSDP2/micro-batch 1"] = b
    state = 16 * s.params() / 2
    rows.append(["LLaSA-8B", f"{s.params() / 1e9:.2f}B", 2, "FSDP2", 1, state / s.params(), state / GB,
                 b["totals"]["update"] / GB, b["totals"]["rollout"] / GB, _fits(max(b["totals"].values()))])
    header = ("computed per GPU (bench_step_memory.budget, term by term): bf16-mixed, fp32 weights and AdamW, gradient "
              "checkpointing, micro-batch 4 rows x (512 + 2048) tokens, logprob chunk 512, no reference, vLLM colocated "
              "at 0.3 x 80 GB (asleep during the update), 1 GB CUDA context (estimate)")
    table = markdown_table(["model", "parameters", "GPUs", "mode", "micro-batch rows", "state bytes / parameter / GPU",
                            "parameters + gradients + AdamW (GB)", "update peak (GB)", "rollout peak (GB)",
                            "fits 80 GB"], rows)
    return header + "\n\n" + table, raw


# the original recipe's step on 2 GPUs: 8 prompts x 16 completions, 64 rows per rank, one update, no KL, no IS
ROWS_PER_RANK = 64
LINKS_GB_S = {"PCIe 4.0 x16": 25.0, "PCIe 5.0 x16": 50.0}  # usable rates per direction, assumed, not measured


def offload_table() -> tuple[str, dict]:
    """Per GPU, from budget() with FSDP2's CPU offload: LLaSA-3B/8B on 2 GPUs of 80 and 48 GB, vLLM at 0.6 (asleep
    during the update), micro-batches of 4 and 16 rows; per rank the host RAM (host_bytes) and the PCIe bytes of one
    step of the original recipe (offload_traffic), with their time at assumed link rates."""
    rows, raw = [], {}
    for name in ("LLaSA-3B", "LLaSA-8B"):
        for micro in (4, 16):
            s = dataclasses.replace(LLASA[name], rows=micro)
            layer = layer_activation_bytes(s)
            for gpu in (80.0, 48.0):
                lay = Layout(gpu_gb=gpu, engine_fraction=0.6, fsdp=2, offload=True)
                b = budget(s, lay, layer)
                host = host_bytes(s, lay)
                traffic = offload_traffic(s, lay, ROWS_PER_RANK // micro)
                on_gpu = sum(b["resident"][t] for t in ("weights (fp32)", "AdamW state (fp32 exp_avg, exp_avg_sq)"))
                raw[f"{name}/2x{gpu:g}/offload/micro-batch {micro}"] = {"budget": b, "host": host, "traffic": traffic}
                seconds = [max(traffic.values()) / GB / rate for rate in LINKS_GB_S.values()]
                rows.append([name, f"2 x {gpu:g} GB", micro, on_gpu / GB, b["totals"]["update"] / GB,
                             b["totals"]["rollout"] / GB, _fits(max(b["totals"].values()), gpu),
                             16 * s.params() / 2 / GB, sum(host.values()) / GB, 2 * sum(host.values()) / GB,
                             traffic["in (host to GPU)"] / GB, traffic["out (GPU to host)"] / GB,
                             " / ".join(f"{t:.1f}" for t in seconds)])
    header = ("computed per GPU with FSDP2's CPU offload (`--model.fsdp_offload cpu`; bench_step_memory.budget, "
              "Layout(fsdp=2, offload=True)): bf16-mixed, gradient checkpointing, micro-batches of (512 + 2048) tokens, "
              "no reference, vLLM colocated at 0.6 of the GPU (asleep during the update), 1 GB CUDA context (estimate). "
              "Host RAM per rank: fp32 weight and gradient shards pinned (each allocation rounded up to a power of two "
              f"by torch's pinned allocator), AdamW's state pageable; per node: 2 ranks. PCIe per rank and step of the "
              f"original recipe ({ROWS_PER_RANK} rows per rank, one update, weights synced to vLLM in bf16); its time at "
              f"{' / '.join(f'{k} ({v:g} GB/s)' for k, v in LINKS_GB_S.items())}, the larger direction, an estimate "
              "from link rates (the two directions overlap each other and, mostly, compute)")
    table = markdown_table(["model", "GPUs", "micro-batch rows", "state on the GPU (GB)", "update peak (GB)",
                            "rollout peak (GB)", "fits", "16 bytes x parameters / 2 (GB)", "host RAM per rank (GB)",
                            "host RAM per node (GB)", "PCIe in per step (GB)", "PCIe out per step (GB)",
                            "transfer time per step (s, estimate)"], rows)
    return header + "\n\n" + table, raw


def adamw_cpu(threads: int, numel: int = 2**25, steps: int = 5) -> tuple[str, dict]:
    """One AdamW step over `numel` fp32 parameters (16 tensors, a layer's matrices' scale) on this CPU: torch's fused
    CPU kernel vs its default single-tensor loop; median of `steps` steps after a warm-up; extrapolated to the
    4.29B-parameter shard a rank holds for LLaSA-8B on 2 GPUs, at this machine's speed per core."""
    import statistics
    import time

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel // 16)) for _ in range(16)]
    for q in params:
        q.grad = torch.randn_like(q)
    shard = LLASA["LLaSA-8B"].params() / 2
    got, rows = {}, []
    for label, fused in (("fused (CPU kernel)", True), ("torch's CPU default (single-tensor loop)", None)):
        opt = torch.optim.AdamW(params, lr=1e-6, fused=fused)
        opt.step()  # creates the state
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        got[label] = statistics.median(times)
    base = got["torch's CPU default (single-tensor loop)"]
    for label, t in got.items():
        rows.append([label, t, t / numel * 1e9, f"{base / t:.1f}x", t / numel * shard])
    header = (f"AdamW step on this CPU: {numel:,} fp32 parameters in 16 tensors, {threads} thread(s), median of {steps} "
              f"steps; the last column scales the time per parameter to LLaSA-8B's shard on 2 GPUs "
              f"({shard / 1e9:.2f}B parameters per rank), an extrapolation at this VM's speed\nmachine: "
              f"{json.dumps(machine_info())}")
    table = markdown_table(["AdamW", "step (s)", "ns per parameter", "speed vs the default",
                            "LLaSA-8B shard on 2 GPUs (s, extrapolated)"], rows)
    return header + "\n\n" + table, got


def _fits(peak: float, gpu_gb: float = 80.0) -> str:
    return f"yes ({gpu_gb - peak / GB:.1f} GB left)" if peak <= gpu_gb * GB else f"no (+{(peak - gpu_gb * GB) / GB:.1f} GB)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model (seconds); no LLaSA table")
    p.add_argument("--tables", action="store_true", help="only the computed tables and the AdamW timing (no 2-process runs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write raw results here")
    p.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        worker(a.worker, a.size, a.model_dir)
        return
    raw = {}
    if not a.tables:
        table, raw = measure("smoke" if a.smoke else "mid", a.threads)
        print(table)
    if not a.smoke and not a.tables:
        load, raw["loading"] = loading(a.threads)
        print("\n" + load)
    if not a.smoke:
        for key, part in (("llasa", llasa_table), ("offload", offload_table), ("adamw", lambda: adamw_cpu(a.threads))):
            text, raw[key] = part()
            print("\n" + text)
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
