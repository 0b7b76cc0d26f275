"""Per-GPU memory of the GRPO training step: a budget computed term by term, and its check on the CPU.

`budget()` adds up, in bytes, what one training GPU holds in the two phases of a step: the rollout
(the colocated vLLM engine awake) and the update (engine asleep; micro-batch forwards and backwards,
then the optimizer step). Every term is a formula of the model's shape and the layout (DDP bucket
views, released gradients, fused AdamW, gradient checkpointing, bf16-mixed), except the bytes one
Llama decoder layer saves for backward, which `layer_activation_bytes` counts with saved-tensor hooks
on a real layer of the same width (per token, plus its attention mask and bf16 weight copies).

The check: the same step (GRPOPolicy.training_step under Lightning, bf16-mixed autocast on the CPU,
AdamW, 2 micro-batches per update, 2 steps so AdamW's state exists) runs at a small LLaSA-shaped size
(the real 193,800-row vocabulary, 65,539 scored rows, tied head) in a fresh process; its peak resident
set above the state before training (VmHWM, reset at training start; glibc returns every block of
64 KiB or more to the OS on free, so the peak counts live tensors) is compared with budget() there.

    python benchmarks/bench_step_memory.py           # check at the small size (~3 min), then the LLaSA-1B tables
    python benchmarks/bench_step_memory.py --smoke   # tiny sizes, seconds
    python benchmarks/bench_step_memory.py --device cuda   # the check on a GPU (peak allocated bytes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import emit, machine_info, markdown_table, run_worker  # noqa: E402

import torch  # noqa: E402

GB, MIB = 1e9, 2**20


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama-shaped LLaSA and the rows of one micro-batch."""

    vocab: int  # V: rows of the embedding and the head
    scored: int  # V': head rows scored (stop token, 2 control ids, speech tokens)
    hidden: int  # H
    layers: int
    intermediate: int  # I
    heads: int
    kv_heads: int
    tied: bool  # head shares the embedding (Llama-3.2-1B's config, which LLaSA-1B keeps)
    rows: int  # m: rows per micro-batch
    prompt: int  # P: prompt width
    completion: int  # C: completion length
    chunk: int = 512  # logprob_chunk_size

    @property
    def seq(self) -> int:
        return self.prompt + self.completion

    def layer_params(self) -> int:
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h  # q, o, k, v, MLP, 2 norms

    def params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the gradients live and which kernels run: the original layout before and after the memory changes."""

    ddp: bool = True
    bucket_view: bool = True  # DDP's gradients are views into its all-reduce buckets
    release_grads: bool = True  # gradients freed (or, as bucket views, zeroed) right after the update
    optimizer: str = "fused"  # fused (CUDA) | foreach (torch's CUDA default) | single (torch's CPU default)
    slice_grad: bool = False  # the old head: its (V', H) gradient alive while autograd expands it to (V, H)
    checkpointing: bool = True
    reference_bytes: int = 0  # bytes per parameter of the frozen KL reference (0: beta = 0, none)
    gpu_gb: float = 48.0
    engine_fraction: float = 0.3  # vLLM gpu_memory_utilization, colocated
    context_gb: float = 1.0  # CUDA context, cuBLAS and NCCL workspaces: an estimate, not computed
    fsdp: int = 0  # FSDP2 (ModelParallelStrategy, lightning_grpo/sharding.py) over this many GPUs; 0: not sharded
    offload: bool = False  # FSDP2's CPUOffloadPolicy (--model.fsdp_offload cpu): shards, gradients, AdamW in host RAM

    def __post_init__(self) -> None:
        if self.offload and not self.fsdp:
            raise ValueError("Layout(offload=True) offloads FSDP2's shards: set fsdp to the number of GPUs")


def layer_activation_bytes(s: Shape, rows: int = 3, seq: int = 100) -> dict[str, float]:
    """Bytes one decoder layer of `s`'s width saves for backward under bf16 autocast with the weight
    cache off (Lightning's bf16-mixed), counted on a real HF Llama layer with left padding: per token,
    per row x S^2 (the attention mask sdpa saves as bf16), and the bf16 weight copies of its matmuls."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_attention_heads=s.heads,
                      num_key_value_heads=s.kv_heads, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(cfg, 0).train()
    x = torch.randn(rows, seq, s.hidden, requires_grad=True)
    keep = torch.ones(rows, seq, dtype=torch.bool)
    keep[0, : seq // 4] = False  # one left-padded row: a real mask, as in training
    mask = (torch.ones(seq, seq, dtype=torch.bool).tril() & keep[:, None, :])[:, None]  # (rows, 1, S, S)
    pos = (keep.long().cumsum(-1) - 1).clamp(min=0)
    cos_sin = LlamaRotaryEmbedding(cfg)(x, pos)
    saved: dict[int, tuple[int, torch.dtype, tuple]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        saved[st.data_ptr()] = (st.nbytes(), t.dtype, tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            layer(x, attention_mask=mask, position_embeddings=cos_sin)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    shapes = {tuple(p.shape) for p in layer.parameters()} | {tuple(p.shape[::-1]) for p in layer.parameters()}
    out = {"per_token": 0.0, "per_row_s2": 0.0, "weight_copies": 0.0}
    for ptr, (nbytes, dtype, shape) in saved.items():
        if ptr in params:
            continue
        if dtype == torch.bfloat16 and shape in shapes:
            out["weight_copies"] += nbytes
        elif shape == (rows, 1, seq, seq):
            out["per_row_s2"] += nbytes / (rows * seq * seq)
        else:
            out["per_token"] += nbytes / (rows * seq)
    return out


VLLM_VOCAB_MULTIPLE = 64  # vLLM pads its embedding and head to a multiple of 64 rows: 193,800 -> 193,856


def sync_transient_bytes(s: Shape, sharded: bool, engine_bytes: int = 2) -> float:
    """What a weight sync holds on the GPU beside the engine's own pool, until the sync ends, as read from vLLM 0.32's
    layer-wise reload (not measured: no GPU). The reload buffers a layer's handed tensors until all of its elements
    are loaded; the embedding (and an untied head) never gets all of them, its rows being padded (V -> V_pad), so it
    keeps the handed (V, H) tensors until the sync's end, then materialises each padded (V_pad, H) layer once to
    process it. Handed tensors are new only when gathered from FSDP2 shards (cast to the engine's dtype); an unsharded
    policy (DDP, one GPU, LoRA) hands its own parameters. Sharded: (tensors + 1) x V x H x 2 bytes, tensors = 1 for a
    tied head (LLaSA-1B/3B: 1.6 / 2.4 GB), 2 untied (8B: 4.8 GB); unsharded: one padded layer (0.8 / 1.2 / 1.6 GB)."""
    padded = -(-s.vocab // VLLM_VOCAB_MULTIPLE) * VLLM_VOCAB_MULTIPLE
    handed = (1 if s.tied else 2) * s.vocab * s.hidden * engine_bytes if sharded else 0
    return handed + padded * s.hidden * engine_bytes


def budget(s: Shape, lay: Layout, layer: dict[str, float]) -> dict[str, dict[str, float]]:
    """Bytes per term of the two phases. `layer` is layer_activation_bytes(s).

    Under FSDP2 (`lay.fsdp` GPUs) the weights, AdamW's state, the gradients and the reference are sharded; the
    decoder layers compute in bf16 (their outputs, so the checkpointed inputs, are bf16, and they make no autocast
    weight copies); what is gathered in full is the root unit (the embedding, fp32 when it is the tied head, bf16
    otherwise) for the whole forward and backward, two bf16 layers at a time (the one computing and the one
    prefetched) and an untied head in fp32. A unit's gradient is copied into an fp32 reduce-scatter input after FSDP
    frees the unit's gathered weight: for the untied head the input takes the gathered head's place; for the tied root
    it comes once its two (V, H) gradients are summed into one, within the largest transient counted for DDP.

    With FSDP2's CPU offload (`lay.offload`) the GPU holds no weights, gradients, AdamW state or reference between
    units: the sharded fp32 weights and gradients and AdamW's state are in host RAM (`host_bytes`), and the optimizer
    step runs on the CPU. What the GPU still holds: everything gathered (as above), the activations, the head's fp32
    transients, the reduce-scatter buffers, plus two offload transients counted as alive at the backward's peak
    (conservative): the fp32 shard of the prefetched layer copied in from the host and its bf16 cast (the all-gather
    input), and a reduce-scattered fp32 gradient shard before its copy to the host (the largest unit's: the
    embedding's, or an untied head's)."""
    p, v, h, m, S, C = s.params(), s.vocab, s.hidden, s.rows, s.seq, s.completion
    w = max(lay.fsdp, 1)
    on_gpu = 0 if lay.offload else 1  # the sharded state: on the GPU, or in host RAM
    resident = {
        "weights (fp32)": on_gpu * 4 * p / w,
        "AdamW state (fp32 exp_avg, exp_avg_sq)": on_gpu * 8 * p / w,
        "frozen reference": on_gpu * lay.reference_bytes * p / w,
        "DDP all-reduce buckets (without gradient_as_bucket_view)": 4 * p if lay.ddp and not lay.bucket_view and not lay.fsdp else 0,
        "CUDA context, cuBLAS/NCCL workspaces (estimate)": lay.context_gb * GB,
    }
    grads = on_gpu * 4 * p / w
    grads_through_rollout = grads if not lay.fsdp and (not lay.release_grads or (lay.ddp and lay.bucket_view)) else 0
    one_layer = m * S * layer["per_token"] + m * S * S * layer["per_row_s2"] + (0 if lay.fsdp else layer["weight_copies"])
    act = 2 if lay.fsdp else 4  # bytes per element of the residual stream between layers
    if lay.checkpointing:
        kept = s.layers * m * S * h * act  # each layer's input (fp32 under autocast: the residual stream stays fp32)
        recompute = one_layer + 2 * m * S * h * act  # one layer's saved tensors, its gradient in and out
    else:
        kept, recompute = s.layers * one_layer, 2 * m * S * h * act
    # the head's backward: one (chunk, V') logits block, the (V, H) gradient, and (V', H) where it accumulates
    # apart (grpo._ChunkedLogProbs.backward's rule; before the memory changes always, then autograd expanded it)
    block, full, part = 4 * min(s.chunk, m * C) * s.scored, 4 * v * h, 4 * s.scored * h
    in_place = not lay.slice_grad and (part == full or block < part)
    head = (block + full if in_place else part + max(block, full)) + 4 * m * C * h
    # A tied head's (V, H) gradient waits in autograd's input buffer of the shared weight until the embedding's
    # dense (V, H) gradient arrives at the end of backward: it is alive beside every layer's recompute.
    pending = full if s.tied else 0
    transients = {
        "the head's (logits block, (V, H) gradient, d hidden)": head,
        "one recomputed layer" + (" + the tied head's pending (V, H) gradient" if s.tied else ""): pending + recompute,
        "the embedding's dense (V, H) gradient" + (" + the tied head's" if s.tied else ""): pending + full,
    }
    worst = max(transients, key=transients.get)
    backward = {
        "gradients (fp32)": grads,
        "checkpointed layer inputs" if lay.checkpointing else "all layers' activations": kept,
        "final norm + head input (fp32)": 2 * m * S * h * 4 + 4 * m * C * h,
        f"largest transient: {worst}": transients[worst],
    }
    if lay.fsdp:
        backward.update({
            "FSDP2: the root unit gathered (embedding" + (", the tied head: fp32)" if s.tied else ": bf16)"):
                v * h * (4 if s.tied else 2),
            "FSDP2: an untied head gathered, then its gradient's reduce-scatter input (fp32)": 0 if s.tied else 4 * v * h,
            "FSDP2: two decoder layers gathered (bf16)": 2 * 2 * s.layer_params(),
            "FSDP2: reduce-scatter input of a layer's gradient (fp32)": 4 * s.layer_params(),
        })
    if lay.offload:
        backward.update({
            "offload: the prefetched layer's fp32 shard copied in, and its bf16 cast": (4 + 2) * s.layer_params() / w,
            "offload: a reduce-scattered fp32 gradient shard before its copy out (the embedding's)": 4 * v * h / w,
        })
    largest = v * h / w  # the embedding (and an untied head): the biggest parameter (its shard under FSDP2)
    temp = {"fused": 0, "foreach": 4 * p / w, "single": 2 * 4 * largest}[lay.optimizer] * on_gpu
    step = {"gradients (fp32)": grads, "AdamW step temporaries (fused: none; foreach: one fp32 tensor per parameter)": temp}
    if lay.offload:
        step = {"nothing: AdamW steps on the CPU": 0}
    update_peak = max(sum(backward.values()), sum(step.values()))
    rollout = {
        "gradients kept through the rollout": grads_through_rollout,
        f"vLLM engine awake ({lay.engine_fraction:g} x {lay.gpu_gb:g} GB)": lay.engine_fraction * lay.gpu_gb * GB,
        "vLLM sync: the (V, H) tensors the reload keeps to its end, one padded (V_pad, H) layer":
            sync_transient_bytes(s, sharded=bool(lay.fsdp)),
    }
    return {
        "resident": resident,
        "rollout": rollout,
        "backward": backward,
        "step": step,
        "totals": {"rollout": sum(resident.values()) + sum(rollout.values()),
                   "update": sum(resident.values()) + update_peak},
    }


def shard_sizes(s: Shape, w: int) -> list[int]:
    """Elements of each parameter's shard on rank 0 under FSDP2 over `w` ranks: dim 0 split in `w`, rounded up
    (rank 0 holds the padded chunk), for the embedding, an untied head, each layer's 7 matrices and 2 norms, and the
    final norm."""
    h, kv, i = s.hidden, s.hidden // s.heads * s.kv_heads, s.intermediate
    layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h, 1), (h, 1)]  # q k v o gate up down, norms
    shapes = [(s.vocab, h)] * (1 if s.tied else 2) + layer * s.layers + [(h, 1)]
    return [-(-rows // w) * cols for rows, cols in shapes]


def pinned_bytes(nbytes: int) -> int:
    """What torch's pinned host allocator takes for `nbytes`: the next power of two (CachingHostAllocator's default
    rounding, `pinned_max_round_threshold_mb` unset)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def host_bytes(s: Shape, lay: Layout) -> dict[str, float]:
    """Host RAM per rank that FSDP2's CPU offload holds through training: the fp32 weight shards and gradient
    shards, pinned on CUDA (the gradient's first copy out of each update goes to pinned memory, kept by the pinned
    allocator's cache between updates), each allocation rounded up to a power of two; AdamW's two fp32 states,
    pageable; a frozen reference's pinned shards. Not counted: the process itself (Python, torch, CUDA libraries),
    and the whole fp32 model rank 0 reads while loading (`load_on_rank0`), gone before training."""
    shards = shard_sizes(s, lay.fsdp)
    return {
        "weights (fp32 shards, pinned)": sum(pinned_bytes(4 * n) for n in shards),
        "gradients (fp32 shards, pinned)": sum(pinned_bytes(4 * n) for n in shards),
        "AdamW state (fp32, pageable)": 8 * sum(shards),
        "frozen reference (pinned)": sum(pinned_bytes(lay.reference_bytes * n) for n in shards) if lay.reference_bytes else 0,
    }


def offload_traffic(s: Shape, lay: Layout, micro_batches: int, updates: int = 1, old_logprob_passes: bool = False,
                    sync_bytes: int = 2) -> dict[str, float]:
    """Bytes over PCIe per rank and rollout under FSDP2's CPU offload (FSDP copies the fp32 shards in and casts them
    to bf16 on the GPU): per training micro-batch every unit's shards in for the forward and the decoder layers' again
    for the backward (the root and an untied head stay gathered in between), and every gradient shard out; per
    micro-batch of a no-grad pass every unit's shards in (old log-probs when `old_logprob_passes`: num_iterations > 1
    or importance weights; the reference's at its own bytes per parameter when it exists); the vLLM sync casts each
    shard on the host and copies it in (`sync_bytes` per parameter: the engine's dtype)."""
    w, p, layers = lay.fsdp, s.params(), s.layers * s.layer_params()
    passes = micro_batches * updates
    no_grad = micro_batches * (4 * old_logprob_passes + lay.reference_bytes) * p
    return {"in (host to GPU)": (passes * 4 * (p + layers) + no_grad + sync_bytes * p) / w,
            "out (GPU to host)": passes * 4 * p / w}


# -- the check: the same step measured on the CPU --------------------------------------------------
SIZES = {
    "check": Shape(vocab=193_800, scored=65_539, hidden=256, layers=4, intermediate=1024, heads=4, kv_heads=2,
                   tied=True, rows=4, prompt=0, completion=512),
    "smoke": Shape(vocab=3000, scored=2048 + 3, hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2,
                   tied=True, rows=2, prompt=0, completion=16, chunk=8),
}
LLASA_1B = Shape(vocab=193_800, scored=65_539, hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8,
                 tied=True, rows=4, prompt=512, completion=2048)


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(size: str, device: str) -> dict:
    import lightning as L
    from transformers import LlamaForCausalLM

    from lightning_grpo.data import PromptDataModule
    from lightning_grpo.llasa import LlasaVocab, codes_to_ids
    from lightning_grpo.policy import GRPOPolicy
    from lightning_grpo.reward.rule import RuleReward
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.sampling import Completions
    from lightning_grpo.tiny import build_tiny_tokenizer, tiny_llama_config

    s = SIZES[size]
    tok = build_tiny_tokenizer(num_speech_tokens=s.scored - 3)  # stop + 2 control ids + speech = the scored rows
    cfg = tiny_llama_config(s.vocab, s.hidden, s.layers, intermediate_size=s.intermediate, num_attention_heads=s.heads,
                            num_key_value_heads=s.kv_heads, tie_word_embeddings=s.tied, max_position_embeddings=4096,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    vocab = LlasaVocab.from_tokenizer(tok)

    class FixedLength:  # every completion exactly C tokens: C - 1 speech tokens and the stop token
        temperature, top_p, top_k, max_new_tokens = 1.0, 1.0, 0, s.completion

        def setup(self, pl_module):
            pass

        def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
            ids = codes_to_ids([7] * (s.completion - 1), vocab)
            return Completions(ids=[list(ids) for _ in range(len(prompts) * n)], truncated=[False] * (len(prompts) * n))

    class Peak(L.Callback):
        """Peak memory (MiB) of each phase: rollout + forwards + backwards until the optimizer step, then the
        step. On the CPU the resident set, on CUDA the bytes allocated by tensors."""

        def __init__(self) -> None:
            self.phases: list[tuple[str, float]] = []

        def _close(self, phase: str) -> None:
            if device == "cuda":
                self.phases.append((phase, torch.cuda.max_memory_allocated() / MIB))
                torch.cuda.reset_peak_memory_stats()
            else:
                self.phases.append((phase, _vm_kib("VmHWM") / 1024))
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

        def on_train_start(self, trainer, pl_module):
            self._close("setup")
            self.before = torch.cuda.memory_allocated() / MIB if device == "cuda" else _vm_kib("VmRSS") / 1024

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self._close("backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._close("step")
            r = batch["rollout"]
            self.shape = {"prompt": r.prompt_width, "completion": r.completion_mask.shape[1], "rows": r.input_ids.shape[0]}

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        policy = GRPOPolicy(model_name_or_path=tmp, micro_batch_size=s.rows, gradient_checkpointing=True,
                            learning_rate=1e-6, logprob_chunk_size=s.chunk)
        # from_pretrained can leave weights backed by the mmapped safetensors file, paged in when first
        # read or written (by the forward, by AdamW): copies make them resident before the baseline
        for param in policy.policy.parameters():
            param.data = param.data.clone()
    peak = Peak()
    L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[
                  GRPORollout(FixedLength(), RuleReward(), group_size=s.rows), peak],
              ).fit(policy, PromptDataModule(prompts_per_step=2, val_data=None))
    params = sum(p.numel() for p in policy.policy.parameters())
    last = dict(peak.phases[-2:])  # the second step: AdamW's state exists from its start
    return {"growth_mib": {k: v - peak.before for k, v in last.items()}, "before_mib": peak.before,
            "params": params, **peak.shape}


def check(size: str, threads: int, device: str = "cpu") -> tuple[str, dict]:
    import os

    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # inherited by the worker: large blocks go back on free
    got = run_worker(__file__, ["--worker", size, "--device", device, "--threads", str(threads)], threads)
    s = dataclasses.replace(SIZES[size], prompt=got["prompt"], completion=got["completion"])
    assert got["params"] == s.params(), (got["params"], s.params())
    # GRPOPolicy picks fused AdamW on CUDA; on the CPU torch runs its single-tensor loop
    lay = Layout(ddp=False, optimizer="fused" if device == "cuda" else "single", engine_fraction=0.0, context_gb=0.0)
    b = budget(s, lay, layer_activation_bytes(s))
    # Growth above the state at training start: the weights exist then, AdamW's state does not.
    adam = b["resident"]["AdamW state (fp32 exp_avg, exp_avg_sq)"]
    predicted = {phase: adam + sum(b[phase].values()) for phase in ("backward", "step")}
    rows = [[f"{phase}: {term}", x / MIB, ""] for phase in ("resident", "backward", "step") for term, x in b[phase].items() if x]
    for phase in ("backward", "step"):
        measured = got["growth_mib"][phase]
        rows.append([f"**{phase} phase: AdamW state + the {phase} terms**", predicted[phase] / MIB,
                     f"{measured:.0f} ({measured * MIB / predicted[phase]:.2f}x)"])
    where = "on CUDA, AdamW fused" if device == "cuda" else "on the CPU, AdamW torch's single-tensor loop"
    header = (f"check: {s.params():,} parameters (V={s.vocab:,}, V'={s.scored:,}, H={s.hidden}, {s.layers} layers, I={s.intermediate}, "
              f"tied), micro-batch {s.rows} rows x (P={s.prompt} + C={s.completion}), 2 per update, bf16-mixed {where}, "
              f"gradient checkpointing, no reference; {threads} thread(s)\n"
              f"machine: {json.dumps(machine_info())}")
    measured = "measured peak allocated growth" if device == "cuda" else "measured peak RSS growth"
    table = markdown_table(["term", "predicted growth (MiB)", f"{measured} of step 2 (MiB)"], rows)
    return header + "\n\n" + table, {"measured": got, "budget": b, "predicted": predicted}


def gpu_tables() -> tuple[str, dict]:
    """LLaSA-1B in the original layout (2 training GPUs, DDP, vLLM colocated at 0.3) and on one GPU, before and
    after the memory changes (before: DDP buckets beside the gradients, gradients kept through the rollout, foreach AdamW,
    the head's (V', H) gradient beside its (V, H) expansion)."""
    layer = layer_activation_bytes(LLASA_1B)
    layouts = {
        "2 GPUs DDP, before": dict(bucket_view=False, release_grads=False, optimizer="foreach", slice_grad=True),
        "2 GPUs DDP, now": dict(),
        "1 GPU, before": dict(ddp=False, release_grads=False, optimizer="foreach", slice_grad=True),
        "1 GPU, now": dict(ddp=False),
        # the original's own layout: an FSDP actor over the 2 GPUs, vLLM at 0.6 (configs/llasa1b_original.yaml)
        "2 GPUs DDP, vLLM 0.6": dict(engine_fraction=0.6),
        "2 GPUs FSDP2, vLLM 0.6": dict(fsdp=2, engine_fraction=0.6),
    }
    out, raw = [], {}
    for gpu in (48.0, 80.0):
        budgets = {name: budget(LLASA_1B, Layout(gpu_gb=gpu, **kw), layer) for name, kw in layouts.items()}
        raw[gpu] = budgets
        terms = []
        for phase in ("resident", "rollout", "backward", "step"):
            names = list(dict.fromkeys(t for b in budgets.values() for t in b[phase]))
            for t in names:
                terms.append([f"{phase}: {t}", *[budgets[n][phase].get(t, 0) / GB for n in layouts]])
        for phase in ("rollout", "update"):
            terms.append([f"**{phase} total**", *[budgets[n]["totals"][phase] / GB for n in layouts]])
            terms.append([f"headroom in {phase} of {gpu:g} GB", *[gpu - budgets[n]["totals"][phase] / GB for n in layouts]])
        out.append(f"{gpu:g} GB per GPU\n\n" + markdown_table(["term (GB)", *layouts], terms))
    s = LLASA_1B
    header = (f"LLaSA-1B: {s.params() / 1e9:.3f}B parameters (tied head; untied would add {s.vocab * s.hidden / 1e9:.3f}B), "
              f"micro-batch {s.rows} x (P={s.prompt} + C={s.completion}), chunk {s.chunk}, V'={s.scored:,}; one layer saves "
              f"{layer['per_token'] / 1024:.1f} KiB per token + {layer['per_row_s2']:.0f} B per row x S^2 + "
              f"{layer['weight_copies'] / MIB:.0f} MiB bf16 weight copies (counted)")
    return header + "\n\n" + "\n\n".join(out), raw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write raw results here")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="run the check's step on CUDA (peak allocated bytes instead of the resident set)")
    p.add_argument("--worker", choices=list(SIZES), help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        emit(worker(a.worker, a.device))
        return
    table, raw = check("smoke" if a.smoke else "check", a.threads, a.device)
    print(table)
    if not a.smoke:
        gpu, raw["gpu"] = gpu_tables()
        print("\n" + gpu)
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
