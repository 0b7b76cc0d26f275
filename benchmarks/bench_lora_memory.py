"""LoRA vs full fine-tuning: per-rank parameters + gradients + AdamW state, measured; LLaSA-8B on one 48 GB GPU, computed.

Measured: the real GRPO step (`GRPOPolicy.training_step` under Lightning, DDP with `gradient_as_bucket_view` over
gloo on 2 CPU processes, AdamW, 2 micro-batches per update, 2 steps) at a mid-size Llama, once per variant:
full fine-tuning (fp32), LoRA r=16 on the seven projections over an fp32 base, and the same over a bf16 base. At the
second step's optimizer step, when the weights, their gradients and AdamW's state are all alive, each rank adds up
the bytes of the unique storages of the policy's parameters, of their gradients (under DDP's bucket view: the
buckets) and of the optimizer's state. Each rank also reports its peak resident-set growth over the second step
(activations included) and a checksum of its trainable weights (DDP keeps them equal across ranks).

Computed: bytes per parameter and per GPU for LLaSA-1B/3B/8B with and without LoRA, and the two phases of a LLaSA-8B
LoRA step on one 48 GB GPU with vLLM colocated (terms as in bench_step_memory.py; the one counted input is what a
LoRA-wrapped bf16 decoder layer of the model's width saves for backward, by saved-tensor hooks on a real layer).
Also the sync: what a merged-weights sync moves against an adapter-only one, and its CPU time against a plain
(full fine-tuning) sync of the same model.

    python benchmarks/bench_lora_memory.py           # mid-size (~3 min), then the LLaSA tables
    python benchmarks/bench_lora_memory.py --smoke   # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_step_memory import GB, LLASA_1B, MIB, Shape, _vm_kib, sync_transient_bytes  # noqa: E402
from common import emit, machine_info, markdown_table, run_worker  # noqa: E402

import torch  # noqa: E402

RANK, ALPHA = 16, 32.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = {  # name: (lora, base dtype)
    "full fine-tuning (DDP)": (False, "float32"),
    "LoRA r=16, fp32 base (DDP)": (True, "float32"),
    "LoRA r=16, bf16 base (DDP)": (True, "bfloat16"),
}
SIZES = {  # a mid-size Llama (GQA 3:1, untied head) and the smoke size
    "mid": Shape(vocab=32_768, scored=2048 + 3, hidden=768, layers=8, intermediate=3072, heads=12, kv_heads=4,
                 tied=False, rows=4, prompt=0, completion=256),
    "smoke": Shape(vocab=3000, scored=64 + 3, hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2,
                   tied=False, rows=2, prompt=0, completion=8, chunk=8),
}
LLASA_3B = dataclasses.replace(LLASA_1B, hidden=3072, layers=28, intermediate=8192, heads=24, kv_heads=8)
LLASA_8B = dataclasses.replace(LLASA_1B, hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, tied=False)


def adapter_params(s: Shape, rank: int = RANK) -> int:
    """LoRA parameters on the seven projections: rank x (in + out) each."""
    h, kv, i = s.hidden, s.hidden // s.heads * s.kv_heads, s.intermediate
    per_layer = (h + h) * 2 + (h + kv) * 2 + (h + i) * 3  # q, o; k, v; gate, up, down
    return s.layers * rank * per_layer


# -- measured ------------------------------------------------------------------------------------
def worker(variant: str, size: str, model_dir: str) -> None:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_grpo.data import PromptDataModule
    from lightning_grpo.llasa import LlasaVocab, codes_to_ids
    from lightning_grpo.lora import LoRAConfig
    from lightning_grpo.policy import GRPOPolicy
    from lightning_grpo.reward.rule import RuleReward
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.sampling import Completions

    s = SIZES[size]
    lora, dtype = VARIANTS[variant]

    class FixedLength:  # every completion exactly C tokens; alternate rows in and out of the band: every group has an advantage
        temperature, top_p, top_k, max_new_tokens = 1.0, 1.0, 0, s.completion

        def setup(self, pl_module):
            self.vocab = LlasaVocab.from_tokenizer(pl_module.tokenizer)

        def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
            rows = [codes_to_ids([40 * (i % 2)] * (s.completion - 1), self.vocab) for i in range(len(prompts) * n)]
            return Completions(ids=rows, truncated=[False] * len(rows))

    class Count(L.Callback):
        def __init__(self) -> None:
            self.result: dict = {}

        def on_train_start(self, trainer, pl_module):
            self.before = _vm_kib("VmRSS") / 1024

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the second step's own peak
                self.start = _vm_kib("VmRSS") / 1024

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step != 1:
                return
            seen: dict[int, tuple[str, int]] = {}

            def add(kind: str, t: torch.Tensor) -> None:
                st = t.untyped_storage()
                seen.setdefault(st.data_ptr(), (kind, st.nbytes()))

            params = list(pl_module.policy.parameters())
            for p in params:
                add("trainable parameters" if p.requires_grad else "frozen parameters", p)
            for p in params:
                if p.grad is not None:
                    add("gradients", p.grad)
            for state in optimizer.state.values():
                for v in state.values():
                    if torch.is_tensor(v):
                        add("AdamW state", v)
            by_kind: dict[str, int] = {}
            for kind, nbytes in seen.values():
                by_kind[kind] = by_kind.get(kind, 0) + nbytes
            self.result = {"bytes": by_kind, "params": sum(p.numel() for p in params),
                           "trainable": sum(p.numel() for p in params if p.requires_grad)}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                self.result["step2_peak_growth_mib"] = _vm_kib("VmHWM") / 1024 - self.start
                r = batch["rollout"]
                self.result["prompt"], self.result["completion"] = r.prompt_width, r.completion_mask.shape[1]

        def on_train_end(self, trainer, pl_module):
            trained = [p.detach().double() for p in pl_module.policy.parameters() if p.requires_grad]
            self.result["trainable_checksum"] = float(sum((p * (1 + torch.arange(p.numel()).view(p.shape))).sum() for p in trained))
            self.result["lora_b_abs"] = float(sum(p.detach().abs().sum() for n, p in pl_module.policy.named_parameters()
                                                  if ".lora_B." in n))
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, self.result)
            if trainer.global_rank == 0:
                emit({"ranks": gathered})

    torch.manual_seed(0)
    policy = GRPOPolicy(model_name_or_path=model_dir, dtype=dtype, micro_batch_size=s.rows, gradient_checkpointing=True,
                        learning_rate=1e-3, logprob_chunk_size=s.chunk,
                        lora=LoRAConfig(rank=RANK, alpha=ALPHA) if lora else None)
    for param in policy.policy.parameters():  # resident before the baseline (from_pretrained may mmap the file)
        param.data = param.data.clone()
    L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(gradient_as_bucket_view=True, process_group_backend="gloo"),
              precision="bf16-mixed", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[GRPORollout(FixedLength(), RuleReward(codes_per_char=0.3, band=(0, 16)),
                                                                 group_size=s.rows), Count()],
              ).fit(policy, PromptDataModule(prompts_per_step=4, val_data=None))


def measure(size: str, threads: int, variants: list[str]) -> tuple[str, dict]:
    import os

    from transformers import LlamaForCausalLM

    from lightning_grpo.tiny import build_tiny_tokenizer, tiny_llama_config

    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # inherited by the workers: large blocks go back on free
    s = SIZES[size]
    raw = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tiny_tokenizer(num_speech_tokens=s.scored - 3)
        cfg = tiny_llama_config(s.vocab, s.hidden, s.layers, intermediate_size=s.intermediate, num_attention_heads=s.heads,
                                num_key_value_heads=s.kv_heads, tie_word_embeddings=s.tied, max_position_embeddings=4096,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name in variants:
            raw[name] = run_worker(__file__, ["--worker", name, "--size", size, "--model_dir", tmp], threads)["ranks"]
            sums = {r["trainable_checksum"] for r in raw[name]}
            if len(sums) != 1:  # DDP must keep the trained tensors equal on every rank
                raise RuntimeError(f"{name}: the ranks' trainable weights differ after training ({sums})")
    full = raw.get("full fine-tuning (DDP)", [None])[0]
    full_state = sum(full["bytes"].values()) if full else None
    kinds = ["frozen parameters", "trainable parameters", "gradients", "AdamW state"]
    rows = []
    for name, ranks in raw.items():
        r = ranks[0]
        total = sum(r["bytes"].values())
        rows.append([name, f"{r['trainable']:,} / {r['params']:,}", *[r["bytes"].get(k, 0) / MIB for k in kinds],
                     total / MIB, f"{total / full_state:.3f}x" if full else "(not run)", f"{total / r['params']:.2f}",
                     " / ".join(f"{x['step2_peak_growth_mib']:.0f}" for x in ranks)])
    header = (f"measured: {next(iter(raw.values()))[0]['params']:,} parameters (V={s.vocab:,}, H={s.hidden}, {s.layers} layers, I={s.intermediate}, "
              f"{s.heads}:{s.kv_heads} heads, untied), 2 CPU processes (gloo DDP, gradient_as_bucket_view), bf16-mixed, "
              f"gradient checkpointing, micro-batch {s.rows} x C={s.completion}, 2 per update, {threads} thread(s) per rank\n"
              f"machine: {json.dumps(machine_info())}")
    table = markdown_table(["rank 0", "trainable / all parameters", *[f"{k} (MiB)" for k in kinds],
                            "parameters + gradients + AdamW (MiB)", "vs full fine-tuning", "bytes per parameter",
                            "peak RSS growth of step 2, rank 0 / 1 (MiB)"], rows)
    check = ""
    name = "LoRA r=16, bf16 base (DDP)"
    if name in raw:  # the budget's update terms against the measured step, at this size
        r = raw[name][0]
        shape = dataclasses.replace(s, prompt=r["prompt"], completion=r["completion"])
        terms = update_terms(shape, lora_layer_activation_bytes(shape))
        measured = [x["step2_peak_growth_mib"] for x in raw[name]]
        check = ("\n\nThe update terms of the budget (below) at this size, against the bf16-base LoRA run's measured peak RSS "
                 "growth of step 2 (AdamW's state exists before it):\n\n" + markdown_table(
                     ["term", "predicted (MiB)", "measured, rank 0 / 1 (MiB)"],
                     [*[[t, x / MIB, ""] for t, x in terms.items()],
                      ["**sum**", sum(terms.values()) / MIB, " / ".join(f"{x:.0f}" for x in measured)]]))
        raw["check"] = {"predicted_mib": sum(terms.values()) / MIB, "measured_mib": measured}
    return header + "\n\n" + table + check, raw


# -- computed ------------------------------------------------------------------------------------
def lora_layer_activation_bytes(s: Shape, rank: int = RANK, rows: int = 3, seq: int = 64) -> dict[str, float]:
    """Bytes a bf16 Llama decoder layer of `s`'s width with fp32 LoRA adapters on its seven projections saves for
    backward under bf16 autocast, counted with saved-tensor hooks: per token and per row x S^2 (the attention mask)."""
    import peft
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_attention_heads=s.heads,
                      num_key_value_heads=s.kv_heads, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16).train()
    layer = peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=list(PROJECTIONS)), layer)
    for name, p in layer.named_parameters():
        p.requires_grad_(".lora_" in name)
        if ".lora_" in name:
            p.data = p.data.float()
    x = torch.randn(rows, seq, s.hidden, dtype=torch.bfloat16, requires_grad=True)
    keep = torch.ones(rows, seq, dtype=torch.bool)
    keep[0, : seq // 4] = False
    mask = (torch.ones(seq, seq, dtype=torch.bool).tril() & keep[:, None, :])[:, None]
    pos = (keep.long().cumsum(-1) - 1).clamp(min=0)
    cos_sin = LlamaRotaryEmbedding(cfg)(x, pos)
    saved: dict[int, tuple[int, tuple]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        saved[st.data_ptr()] = (st.nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            layer(x, attention_mask=mask, position_embeddings=cos_sin)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    out = {"per_token": 0.0, "per_row_s2": 0.0, "weight_copies": 0.0}
    for ptr, (nbytes, shape) in saved.items():
        if ptr in params:
            continue
        if shape == (rows, 1, seq, seq):
            out["per_row_s2"] += nbytes / (rows * seq * seq)
        elif len(shape) == 2 and rank in shape:  # the adapters' bf16 copies under autocast
            out["weight_copies"] += nbytes
        else:
            out["per_token"] += nbytes / (rows * seq)
    return out


def per_gpu_table() -> tuple[str, dict]:
    """Bytes per parameter and GB per training GPU for parameters + gradients + AdamW, LLaSA-1B/3B/8B."""
    rows, raw = [], {}
    for name, s in (("LLaSA-1B", LLASA_1B), ("LLaSA-3B", LLASA_3B), ("LLaSA-8B", LLASA_8B)):
        p, a = s.params(), adapter_params(s)
        layouts = {"full fine-tuning, DDP (fp32 + grads + AdamW)": 16 * p,
                   "LoRA, fp32 base": 4 * p + 16 * a,
                   "LoRA, bf16 base": 2 * p + 16 * a}
        raw[name] = {"params": p, "adapters": a, **layouts}
        for layout, nbytes in layouts.items():
            rows.append([name, f"{p / 1e9:.2f}B", f"{a / 1e6:.1f}M", layout, nbytes / p, nbytes / GB])
    return markdown_table(["model", "parameters", f"adapters (r={RANK})", "layout", "bytes per parameter",
                           "GB per GPU (any number of DDP ranks)"], rows), raw


def update_terms(s: Shape, layer: dict[str, float]) -> dict[str, float]:
    """What a LoRA step over a bf16 base adds during backward (bf16-mixed, gradient checkpointing): bytes per term."""
    a, m, S, C, h = adapter_params(s), s.rows, s.seq, s.completion, s.hidden
    one_layer = m * S * layer["per_token"] + m * S * S * layer["per_row_s2"] + layer["weight_copies"]
    # the head's backward: the fp32 copy of the bf16 head's scored rows, one logits block, d hidden (fp32)
    head = 4 * s.scored * h + 4 * min(s.chunk, m * C) * s.scored + 4 * m * C * h
    return {
        "adapter gradients (fp32)": 4 * a,
        "checkpointed layer inputs (bf16: the base's residual stream)": s.layers * m * S * h * 2,
        "final norm + head input (bf16)": 2 * m * S * h * 2 + 2 * m * C * h,
        "largest transient: one recomputed layer + its gradient in and out"
        + (" (the head's backward is smaller)" if one_layer + 4 * m * S * h > head else ""): max(one_layer + 4 * m * S * h, head),
    }


def llasa8b_budget(gpu_gb: float = 48.0, engine_fraction: float = 0.5, context_gb: float = 1.0,
                   margin: float | None = None) -> tuple[str, dict]:
    """The two phases of a LLaSA-8B LoRA step on one GPU (bf16 base, fp32 adapters, bf16-mixed, checkpointing,
    vLLM colocated with sleep mode), term by term."""
    s = LLASA_8B
    layer = lora_layer_activation_bytes(s)
    p, a, m, S, C, h = s.params(), adapter_params(s), s.rows, s.seq, s.completion, s.hidden
    resident = {
        "base weights (bf16, frozen)": 2 * p,
        "adapters (fp32)": 4 * a,
        "AdamW state of the adapters": 8 * a,
        "CUDA context, cuBLAS workspaces (estimate)": context_gb * GB,
    }
    rollout = {f"vLLM engine awake ({engine_fraction:g} x {gpu_gb:g} GB; its bf16 weights {2 * p / GB:.1f} GB, "
               f"the rest KV cache and activations)": engine_fraction * gpu_gb * GB,
               # not at once: the merged layers pass one at a time, then vLLM materialises each padded (V_pad, H)
               # layer at the sync's end (the embedding and the frozen head are handed as they are, no copy)
               "the sync's largest transient: a merged layer (fp32 B @ A, the bf16 merged weight) or one padded "
               "(V_pad, H) bf16 layer of vLLM's reload": max(6 * s.hidden * s.intermediate,
                                                             sync_transient_bytes(s, sharded=False))}
    backward = update_terms(s, layer)
    totals = {"rollout": sum(resident.values()) + sum(rollout.values()), "update": sum(resident.values()) + sum(backward.values())}
    rows = [[f"{phase}: {t}", x / GB] for phase, terms in (("resident", resident), ("rollout", rollout), ("update", backward))
            for t, x in terms.items()]
    for phase in ("rollout", "update"):
        rows.append([f"**{phase} total**", totals[phase] / GB])
        rows.append([f"headroom in {phase} of {gpu_gb:g} GB", gpu_gb - totals[phase] / GB])
    if margin is not None:  # what the CPU check measured beyond the counted terms, in proportion
        totals["update_with_margin"] = sum(resident.values()) + margin * sum(backward.values())
        rows.append([f"update total with the update terms x {margin:.2f} (the CPU check's measured / predicted)",
                     totals["update_with_margin"] / GB])
    kv_per_token = 2 * s.layers * s.kv_heads * (h // s.heads) * 2  # K and V, bf16
    kv = engine_fraction * gpu_gb * GB - 2 * p - 1.5 * GB  # minus the engine's weights and ~1.5 GB profile/graphs
    header = (f"LLaSA-8B: {p / 1e9:.3f}B parameters (untied head, V={s.vocab:,}), LoRA r={RANK} on {', '.join(PROJECTIONS)}: "
              f"{a / 1e6:.1f}M adapters; micro-batch {m} x (P={s.prompt} + C={C}), chunk {s.chunk}; one LoRA layer saves "
              f"{layer['per_token'] / 1024:.1f} KiB per token + {layer['per_row_s2']:.0f} B per row x S^2 (counted). "
              f"The engine's KV cache: about {kv / GB:.1f} GB = {kv / kv_per_token / 1e3:.0f}k tokens "
              f"({kv / kv_per_token / S:.0f} sequences of {S} tokens at once)")
    return header + "\n\n" + markdown_table(["term (GB)", f"1 x {gpu_gb:g} GB"], rows), {"totals": totals, "layer": layer}


def sync_cost(size: str) -> tuple[str, dict]:
    """CPU seconds to produce and copy every tensor of one sync into a second model (the engine's part of a sync
    stands in as a copy), full fine-tuning's plain weights vs LoRA's merged ones; and the bytes each moves."""
    import copy

    from transformers import LlamaForCausalLM

    from lightning_grpo.lora import LoRAConfig, apply_lora
    from lightning_grpo.tiny import tiny_llama_config
    from lightning_grpo.vllm_engine import hf_weights

    s = SIZES[size]
    cfg = tiny_llama_config(s.vocab, s.hidden, s.layers, intermediate_size=s.intermediate, num_attention_heads=s.heads,
                            num_key_value_heads=s.kv_heads, tie_word_embeddings=s.tied)
    torch.manual_seed(0)
    full = LlamaForCausalLM(cfg)
    engine = copy.deepcopy(full).requires_grad_(False)
    lora = apply_lora(copy.deepcopy(full), LoRAConfig(rank=RANK, alpha=ALPHA))
    target = dict(engine.state_dict())

    def sync(model) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, t in hf_weights(model):
                target[name].copy_(t)
        return time.perf_counter() - t0

    times = {"full": [], "lora": []}
    for _ in range(3):
        times["full"].append(sync(full))
        times["lora"].append(sync(lora))
    best = {k: min(v) for k, v in times.items()}
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    sent = sum(t.numel() * t.element_size() for t in full.state_dict().values())
    rows = [["full fine-tuning: the weights as they are", best["full"], 1.0, sent / MIB],
            ["LoRA: merged W + scale * B @ A per layer (ours)", best["lora"], best["lora"] / best["full"], sent / MIB],
            ["LoRA: the adapters alone (what vLLM's LoRA path would load, from a file)", float("nan"), float("nan"),
             adapters * 4 / MIB]]
    return markdown_table(["sync of the mid-size model (CPU, best of 3)", "seconds", "vs full", "bytes moved (MiB)"], rows), \
        {"seconds": times, "adapters": adapters, "bytes": sent}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write raw results here")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--size", choices=list(SIZES), default="mid", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        worker(a.worker, a.size, a.model_dir)
        return
    size = "smoke" if a.smoke else "mid"
    # the smoke run: the bf16-base LoRA alone (one 2-process launch); the other variants run the same worker
    variants = ["LoRA r=16, bf16 base (DDP)"] if a.smoke else list(VARIANTS)
    table, raw = measure(size, a.threads, variants)
    print(table)
    sync_table, raw["sync"] = sync_cost(size)
    print("\n" + sync_table)
    per_gpu, raw["per_gpu"] = per_gpu_table()
    print("\n" + per_gpu)
    if not a.smoke:
        check = raw.get("check")
        margin = max(check["measured_mib"]) / check["predicted_mib"] if check else None
        budget, raw["llasa8b"] = llasa8b_budget(margin=margin)
        print("\n" + budget)
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
