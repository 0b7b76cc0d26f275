"""Peak memory of the GRPO loss + backward at LLaSA's vocabulary: chunked log-probs versus full logits.

One micro-batch of N rows x T completion tokens with hidden size H is scored against an LM head of
V = 193,800 rows (LLaSA's vocabulary), the clipped GRPO loss is token-mean aggregated and
back-propagated to the hidden states and the head (both trainable, as in training). Variants:

    naive          logits = hidden @ W.T as one (N, T, V) tensor, log_softmax, gather (what a plain
                   `model(...).logits` + log_softmax GRPO implementation does)
    ours           lightning_grpo.grpo.token_logprobs (chunks of 512 tokens, recomputed in backward)
    *-speech       the same over LLaSA's sampled rows only: vocab_range [128261, 193800) = the stop
                   token + 65,536 speech tokens (+2 control ids in between, masked with -inf), which
                   is what `GRPORollout(restrict_to_speech=True)` makes the trainer score
    *, bf16 autocast       forward and backward inside torch.autocast(bf16), as under bf16-mixed: the
                           head still runs in fp32 (an fp32 head is used as is, no copy)
    *, bf16 head, ...      the head's weights in bf16 (a bf16 KL reference): cast to fp32 once per call
    * + entropy            grpo.token_logprobs_and_entropy: the same pass also returns each position's entropy
                           (what training logs as train/entropy); same loss and gradients, entropy checked
                           against a dense log_softmax

Memory is measured as the growth of the process's resident set: each variant runs in a fresh
subprocess; the worker builds its inputs, records its current RSS, runs forward + backward once and
reads VmHWM (the kernel's high-water mark of its resident pages; not ru_maxrss, which in a spawned worker
also holds the parent's resident set: the published figure of `ours-speech` before 2026-11-30 was 13 MiB high). Blocks of 64 KiB or more are served
by mmap and unmapped on free (MALLOC_MMAP_THRESHOLD_), so the high-water mark sees every transient
tensor, including those that live only inside autograd; no sampling interval can miss a spike. The figures include the (V, H) head
gradient that any implementation must hold. Loss values and gradients are compared across variants
(ours vs naive at the same vocabulary rows) from tensors the workers save; the entropy of the `+ entropy` variants
against a dense log_softmax computed here, in blocks of positions.

    python benchmarks/bench_memory.py          # N=1, T=2048, H=128, V=193,800 (naive peaks near 6 GiB)
    python benchmarks/bench_memory.py --smoke  # tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import current_rss_mib, emit, machine_info, markdown_table, peak_rss_mib, run_worker  # noqa: E402

import torch  # noqa: E402

from lightning_grpo import grpo  # noqa: E402

LLASA_VOCAB = 193_800
LLASA_STOP_ID = 128_261  # <|SPEECH_GENERATION_END|>
LLASA_SPEECH_START = 128_264  # <|s_0|>
SIZES = {
    "full": dict(rows=1, length=2048, hidden=128, vocab=LLASA_VOCAB, stop=LLASA_STOP_ID, speech_start=LLASA_SPEECH_START),
    "smoke": dict(rows=2, length=64, hidden=16, vocab=1000, stop=661, speech_start=664),
}
# name -> (implementation, chunk size, speech rows only, head dtype under bf16 autocast or None: no autocast)
VARIANTS = {
    "naive": ("naive", 0, False, None),
    "ours": ("ours", 512, False, None),
    "ours chunk=128": ("ours", 128, False, None),
    "naive-speech": ("naive", 0, True, None),
    "ours-speech": ("ours", 512, True, None),
    "ours-speech, bf16 autocast": ("ours", 512, True, torch.float32),
    "ours-speech, bf16 head, bf16 autocast": ("ours", 512, True, torch.bfloat16),
    "ours + entropy": ("ours+entropy", 512, False, None),
    "ours-speech + entropy": ("ours+entropy", 512, True, None),
}


def make_inputs(s: dict, seed: int = 0) -> dict:
    """Deterministic inputs: hidden (N, T, H), head (V, H), speech targets (N, T), advantages (N,), mask (N, T)."""
    g = torch.Generator().manual_seed(seed)
    n, t, h, v = s["rows"], s["length"], s["hidden"], s["vocab"]
    targets = torch.randint(s["speech_start"], v, (n, t), generator=g)
    targets[:, -1] = s["stop"]
    mask = torch.ones(n, t)
    mask[:, int(0.9 * t) :] = 0.0  # a padded tail the loss must ignore
    return dict(
        hidden=torch.randn(n, t, h, generator=g),
        weight=torch.randn(v, h, generator=g) / h**0.5,
        targets=targets,
        advantages=torch.randn(n, generator=g),
        mask=mask,
        old_noise=0.15 * torch.randn(n, t, generator=g),  # old = current - noise: some ratios leave the clip range
    )


def naive_logprobs(hidden, weight, targets, vocab_range=None, disallowed=()):
    """Full (N, T, V') logits, log_softmax, gather: the memory baseline."""
    lo, hi = vocab_range if vocab_range is not None else (0, weight.shape[0])
    logits = hidden @ weight[lo:hi].T  # (N, T, V')
    if disallowed:
        bias = torch.zeros(hi - lo)
        bias[torch.tensor(disallowed) - lo] = float("-inf")
        logits = logits + bias
    return torch.log_softmax(logits, dim=-1).gather(-1, (targets - lo)[..., None]).squeeze(-1)


def speech_rows(s: dict) -> tuple[tuple[int, int], tuple[int, ...]]:
    """vocab_range and disallowed ids of LLaSA's sampled rows: the stop token and the speech tokens."""
    return (s["stop"], s["vocab"]), tuple(range(s["stop"] + 1, s["speech_start"]))


def dense_entropy(x: dict, s: dict, speech: bool, block: int = 128) -> torch.Tensor:
    """(N, T) entropy of softmax(hidden @ W.T) over the variant's rows from plain log_softmax, `block` positions at a
    time (float64; the reference the `+ entropy` variants are checked against)."""
    (lo, hi), disallowed = speech_rows(s) if speech else ((0, s["vocab"]), ())
    flat = x["hidden"].reshape(-1, s["hidden"]).double()
    w = x["weight"][lo:hi].double()
    out = torch.empty(flat.shape[0], dtype=torch.float64)
    for a in range(0, flat.shape[0], block):
        z = flat[a : a + block] @ w.T
        if disallowed:
            z[:, [d - lo for d in disallowed]] = float("-inf")
        logp = torch.log_softmax(z, -1)
        out[a : a + block] = -torch.where(logp.isfinite(), logp.exp() * logp, torch.zeros((), dtype=z.dtype)).sum(-1)
    return out.view(x["hidden"].shape[:2])


def grpo_loss_and_grads(variant: str, x: dict, s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward + backward of one variant on inputs x; (loss, d loss/d hidden, d loss/d weight, entropy (N, T) or
    None)."""
    impl, chunk, speech, head_dtype = VARIANTS[variant]
    hidden = x["hidden"].clone().requires_grad_(True)
    weight = x["weight"].clone().to(head_dtype or torch.float32).requires_grad_(True)
    vocab_range, disallowed = speech_rows(s) if speech else (None, ())
    entropy = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=head_dtype is not None):
        if impl == "naive":
            logp = naive_logprobs(hidden, weight, x["targets"], vocab_range, disallowed)
        elif impl == "ours+entropy":
            logp, entropy = grpo.token_logprobs_and_entropy(hidden, weight, x["targets"], chunk_size=chunk,
                                                            vocab_range=vocab_range, disallowed=disallowed)
        else:
            logp = grpo.token_logprobs(hidden, weight, x["targets"], chunk_size=chunk, vocab_range=vocab_range,
                                       disallowed=disallowed)
        old = logp.detach() - x["old_noise"]
        tok_loss, _ = grpo.clipped_policy_loss(logp, old, x["advantages"], 0.2, 0.2, dual_clip=3.0)
        loss = grpo.aggregate(tok_loss, x["mask"], "token-mean")
        loss.backward()
    return loss.detach(), hidden.grad, weight.grad.float(), entropy


def worker(variant: str, size: str, out: str) -> dict:
    s = SIZES[size]
    # Warm-up at a tiny size: the first checkpointed call imports and initialises modules (about
    # 150 MiB of RSS, 3 s) that belong to the process, not to the loss.
    grpo_loss_and_grads(variant, make_inputs(SIZES["smoke"]), SIZES["smoke"])
    x = make_inputs(s)
    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    loss, gh, gw, entropy = grpo_loss_and_grads(variant, x, s)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mib()
    torch.save({"loss": loss, "grad_hidden": gh, "grad_weight": gw, "entropy": entropy}, out)
    return dict(variant=variant, peak_growth_mib=peak - rss_before, rss_before_mib=rss_before, seconds=seconds,
                loss=float(loss))


def compare(a: dict, b: dict) -> dict:
    """Largest differences between two variants' loss and gradients (relative to the gradient scale)."""
    def rel(x, y):
        return float((x - y).abs().max() / y.abs().max().clamp(min=1e-30))

    return dict(loss_abs=float((a["loss"] - b["loss"]).abs()), grad_hidden_rel=rel(a["grad_hidden"], b["grad_hidden"]),
                grad_weight_rel=rel(a["grad_weight"], b["grad_weight"]))


def ratio(a: float, b: float) -> float:
    """a / b, NaN where b is not positive (at smoke sizes a variant's peak growth can round to 0 MiB)."""
    return a / b if b > 0 else float("nan")


def run(size: str, threads: int) -> tuple[str, dict]:
    s = SIZES[size]
    # Inherited by the workers: glibc serves every block of 64 KiB or more by mmap and returns it on free. Its
    # default threshold rises up to 32 MiB as blocks are freed, and blocks under it then stay in the heap:
    # whether a (V', H) buffer of ~32 MiB is returned would depend on what ran before.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    results, saved = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(VARIANTS):
            path = str(Path(tmp) / f"{i}.pt")
            results[v] = run_worker(__file__, ["--worker", v, "--size", size, "--out", path, "--threads", str(threads)], threads)
            saved[v] = torch.load(path)
        checks = {f"{v} vs {ref}": compare(saved[v], saved[ref])
                  for v, (impl, _, speech, head_dtype) in VARIANTS.items()
                  if impl != "naive" and head_dtype != torch.bfloat16  # a bf16 head is another function
                  for ref in ["naive-speech" if speech else "naive"]}
        x = make_inputs(s)
        entropy_rows, entropy_checks = [], {}
        for v, (impl, _, speech, _) in VARIANTS.items():
            if impl != "ours+entropy":
                continue
            base = "ours-speech" if speech else "ours"
            err = float((saved[v]["entropy"].double() - dense_entropy(x, s, speech)).abs().max())
            same = all(torch.equal(saved[v][k], saved[base][k]) for k in ("loss", "grad_hidden", "grad_weight"))
            entropy_checks[v] = {"entropy_abs": err, "loss_and_grads_equal_without": same}
            entropy_rows.append([v, ratio(results[v]["peak_growth_mib"], results[base]["peak_growth_mib"]),
                                 ratio(results[v]["seconds"], results[base]["seconds"]), f"{err:.1e}", same])
    naive = results["naive"]["peak_growth_mib"]
    logits_mib = s["rows"] * s["length"] * s["vocab"] * 4 / 2**20
    rows = []
    for v in VARIANTS:
        r = results[v]
        rows.append([v, r["peak_growth_mib"], r["peak_growth_mib"] / naive, r["seconds"], f"{r['loss']:.6f}"])
    table = markdown_table(["variant", "peak RSS growth (MiB)", "/ naive (full vocab)", "fwd+bwd (s)", "loss"], rows)
    check_rows = [[k, f"{c['loss_abs']:.2e}", f"{c['grad_hidden_rel']:.2e}", f"{c['grad_weight_rel']:.2e}"] for k, c in checks.items()]
    table += "\n\n" + markdown_table(["agreement", "|loss diff|", "max rel diff d/d hidden", "max rel diff d/d head"], check_rows)
    table += "\n\n" + markdown_table(["with entropy", "peak / without", "fwd+bwd time / without",
                                        "max abs diff of the entropy vs dense (nats)", "loss and gradients bit-equal"],
                                       entropy_rows)
    header = (
        f"settings: N={s['rows']} rows x T={s['length']} tokens, H={s['hidden']}, V={s['vocab']:,} (speech rows: "
        f"[{s['stop']}, {s['vocab']}) = {s['vocab'] - s['stop']:,}), fp32, chunk 512, clipped loss + dual clip 3, token-mean; "
        f"one (N, T, V) fp32 logits tensor = {logits_mib:.0f} MiB; {threads} thread(s)\nmachine: {json.dumps(machine_info())}"
    )
    return header + "\n\n" + table, {"results": results, "checks": checks, "entropy_checks": entropy_checks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write raw results here")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--size", default="full", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        emit(worker(a.worker, a.size, a.out))
        return
    table, raw = run("smoke" if a.smoke else "full", a.threads)
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
