"""One full GRPO step of a LLaSA-1B-shaped policy on one GPU: HFSampler rollout, reward, update; per-stage times,
tokens per second, peak memory and the update's MFU.

Policy: Llama-3.2-1B's dimensions (hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, tied
embeddings) with LLaSA's 193,800-row vocabulary and random weights, so nothing is downloaded; fp32 weights under
bf16-mixed, gradient checkpointing, micro-batch 4, 8 prompts x G = 16, one update per rollout, beta 0, sampling at
temperature 0.8 / top-p 0.9 over the speech tokens: configs/llasa1b_original.yaml's step, with HFSampler instead of
vLLM and --new-tokens (512, about 10 s of audio) instead of 2,048. The tokenizer is the builtin tiny LLaSA's layout
with all 65,536 speech tokens: its ids differ from LLaSA's, the scored head rows (65,539) do not; its text is byte
level, so prompts are about 3x longer than Llama-3's tokenizer makes them (the widths used are reported).
Random weights almost never sample the stop token (1 in 65,537 per token), so completions run to --new-tokens.
Reward: the rule reward's band score (share of codes in the codebook's lower half), cheap and varied, so advantages
are non-zero and the update is a real one; truncated rows keep their reward. bench_reward.py times the Whisper
reward itself on the GPU.

A real `lightning.Trainer` fit of --steps steps; the first warms kernels and the caching allocator, and the last
is the measurement (every step is reported). Stages: sample (HFSampler.sample, prefill included), reward
(Reward.score), rollout (both plus building the batch), update (GRPOPolicy.training_step: advantages, micro-batch
forwards and backwards, clipping, fused AdamW). Peak memory is torch.cuda.max_memory_allocated per stage.
MFU of the update: model FLOPs / (update seconds x peak bf16 dense FLOP/s; 989 TFLOP/s for an H100/H200 SXM,
--peak-tflops otherwise). Model FLOPs = 3 x forward (backward = 2 x forward; checkpointing's recompute is not
counted, as MFU conventionally does not): 2 x decoder-layer parameters per computed position (prompt, padding and
completion), 2 x H x V' per completion position for the head's scored rows, and causal attention 2 x S^2 x H per
row and layer.

    python benchmarks/bench_gpu_step.py --json step.json     # CUDA, LLaSA-1B shape (about a minute on an H200)
    python benchmarks/bench_gpu_step.py --smoke              # CPU, toy size, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import torch  # noqa: E402

GIB = 2**30
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16 dense, SXM; the matmul ceiling seen on this H200: ~790


def build_policy_parts(smoke: bool, device: str):
    """(model, tokenizer): LLaSA-1B-shaped (smoke: toy) random model built on `device`, tiny-layout tokenizer."""
    from transformers import LlamaForCausalLM

    from bench_rollout_gpu import llasa_1b_config
    from lightning_grpo.tiny import build_tiny_tokenizer, tiny_llama_config

    tok = build_tiny_tokenizer(num_speech_tokens=64 if smoke else 65_536)
    stop = tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    if smoke:
        cfg = tiny_llama_config(len(tok), 64, 2, tie_word_embeddings=True)
    else:
        cfg = llasa_1b_config()  # vocabulary 193,800: the rows past the tokenizer's are never sampled
        if len(tok) > cfg.vocab_size:
            raise RuntimeError(f"tokenizer of {len(tok)} ids > vocabulary {cfg.vocab_size}")
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, stop, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: seconds on a GPU, a minute of CPU for 1.2B
        model = LlamaForCausalLM(cfg)
    return model, tok


def update_flops(cfg, rows: int, seq: int, completion: int, scored_rows: int) -> float:
    """Model FLOPs of one update (forward + backward) over `rows` x `seq` positions, `completion` of them scored."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size
    forward = (2 * cfg.num_hidden_layers * layer * rows * seq
               + 2 * h * scored_rows * rows * completion
               + cfg.num_hidden_layers * rows * 2 * seq * seq * h)
    return 3.0 * forward


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (the original: 8)")
    p.add_argument("--group-size", type=int, default=16, help="G (the original: 16)")
    p.add_argument("--new-tokens", type=int, default=512, help="max_new_tokens (random weights run to it)")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per forward/backward (the original: 4)")
    p.add_argument("--steps", type=int, default=2, help="trainer steps; the first warms up, the last is measured")
    p.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off (the original: on)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 dense TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here (rewritten after every step)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown section here")
    p.add_argument("--smoke", action="store_true", help="CPU, toy model and sizes: checks the script runs")
    a = p.parse_args(argv)
    if a.smoke:
        a.device, a.prompts, a.group_size, a.new_tokens, a.micro_batch = "cpu", 2, 2, 8, 2
    for name in ("prompts", "new_tokens", "micro_batch", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.group_size < 2:
        p.error("--group-size must be >= 2 (GRPO compares samples of one prompt)")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --smoke for the CPU check)")
    if a.threads:
        torch.set_num_threads(a.threads)

    import lightning as L

    import lightning_grpo.policy as policy_module
    from common import machine_info
    from lightning_grpo.data import PromptDataModule
    from lightning_grpo.reward.rule import RuleReward
    from lightning_grpo.rollout import GRPORollout
    from lightning_grpo.sampling import HFSampler

    cuda = a.device == "cuda"
    gpu = torch.cuda.get_device_name(0) if cuda else None
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak_gib() -> float | None:
        return torch.cuda.max_memory_allocated() / GIB if cuda else None

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    model, tok = build_policy_parts(a.smoke, a.device)
    build_s = time.perf_counter() - t0
    real_shape = build_policy_parts(False, "meta")[0]  # the run's model as the smoke builds it, allocated nowhere
    real_shape_params = sum(p.numel() for p in real_shape.parameters())
    del real_shape
    # GRPOPolicy loads by name; this benchmark hands it the random model built above instead.
    policy_module.load_model_and_tokenizer = lambda *args, **kwargs: (model, tok)
    policy = policy_module.GRPOPolicy(model_name_or_path="bench:llasa-1b-shape", micro_batch_size=a.micro_batch,
                                      gradient_checkpointing=not a.no_checkpointing, learning_rate=1e-6, beta=0.0)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    stages: dict[str, float] = {}

    class TimedSampler(HFSampler):
        def sample(self, *args, **kwargs):
            sync()
            start = time.perf_counter()
            out = super().sample(*args, **kwargs)
            sync()
            stages["sample_s"] = time.perf_counter() - start
            stages["generated_tokens"] = sum(len(r) for r in out.ids)
            return out

    class TimedReward(RuleReward):
        def score(self, samples):
            start = time.perf_counter()
            out = super().score(samples)
            stages["reward_s"] = time.perf_counter() - start
            return out

    steps: list[dict] = []
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    info = {**machine_info(), "gpu": gpu}

    def write() -> None:
        if a.json:
            a.json.write_text(json.dumps({"settings": settings, "machine": info, "parameters": params,
                                          "llasa_1b_shape_parameters": real_shape_params,
                                          "build_s": build_s, "peak_tflops": peak, "steps": steps,
                                          "measured": steps[-1] if steps else None}, indent=1))

    class RolloutStart(L.Callback):  # before GRPORollout in the list: its hook runs first
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            reset_peak()
            stages.clear()
            stages["t0"] = time.perf_counter()

    class Clock(L.Callback):  # after GRPORollout: the rollout is in the batch
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            stages["rollout_s"] = time.perf_counter() - stages["t0"]
            stages["rollout_peak_gib"] = peak_gib()
            reset_peak()
            stages["t1"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            update_s = time.perf_counter() - stages["t1"]
            r = batch["rollout"]
            rows, seq = r.input_ids.shape
            completion = r.completion_mask.shape[1]
            scored = r.vocab_range[1] - r.vocab_range[0] if r.vocab_range else cfg.vocab_size
            flops = update_flops(cfg, rows, seq, completion, scored)
            m = trainer.callback_metrics
            steps.append({
                "step": len(steps) + 1, "rows": rows, "prompt_width": r.prompt_width, "completion_width": completion,
                "completion_tokens": int(r.completion_mask.sum().item()), "truncated": int(r.truncated.sum().item()),
                "sample_s": stages["sample_s"], "reward_s": stages["reward_s"], "rollout_s": stages["rollout_s"],
                "update_s": update_s, "step_s": stages["rollout_s"] + update_s,
                "sample_tokens_per_s": stages["generated_tokens"] / stages["sample_s"],
                "update_tokens_per_s": rows * seq / update_s,
                "rollout_peak_gib": stages["rollout_peak_gib"], "update_peak_gib": peak_gib(),
                "reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
                "update_tflops": flops / 1e12, "update_tflop_per_s": flops / update_s / 1e12,
                "mfu_update": flops / update_s / (peak * 1e12) if peak else None,
                "loss": float(m.get("train/loss", float("nan"))), "grad_norm": float(m.get("train/grad_norm", float("nan"))),
                "reward_std": float(r.rewards.std().item()),
            })
            print(f"step {len(steps)}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                          for k, v in steps[-1].items()}), flush=True)
            write()

    sampler = TimedSampler(temperature=0.8, top_p=0.9, max_new_tokens=a.new_tokens)
    speech_codes = 64 if a.smoke else 65_536
    reward = TimedReward(codes_per_char=1.0, band=(0, speech_codes // 2), length_weight=0.0)
    rollout = GRPORollout(sampler, reward, group_size=a.group_size, truncation="keep", max_prompt_length=512)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed", max_steps=a.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[RolloutStart(), rollout, Clock()])
    before = {k: v.detach().clone() for k, v in list(model.state_dict().items())[:4]}
    trainer.fit(policy, PromptDataModule(prompts_per_step=a.prompts, val_data=None))
    moved = any(not torch.equal(before[k], v) for k, v in list(model.state_dict().items())[:4] if k in before)
    if not moved:
        raise RuntimeError("the update left the first weights unchanged: not a real step")
    write()
    s = steps[-1]
    lines = [
        "## One GRPO step, LLaSA-1B shape" + (" (smoke)" if a.smoke else ""),
        "",
        f"`python benchmarks/bench_gpu_step.py{' --smoke' if a.smoke else ''}` — {params / 1e9:.3f}B parameters "
        f"(vocabulary {cfg.vocab_size:,}, tied), random weights, fp32 weights + bf16-mixed, "
        f"{'no ' if a.no_checkpointing else ''}gradient checkpointing; {a.prompts} prompts x G={a.group_size} = {s['rows']} rows, "
        f"prompt width {s['prompt_width']}, {s['completion_width']} new tokens (HFSampler, T 0.8, top-p 0.9, speech tokens), "
        f"micro-batch {a.micro_batch}; step {s['step']} of {a.steps} (the first warms up).",
        f"Machine: {gpu or info['cpu']}, torch {info['torch']}, {info['date_utc']}.",
        "",
        "| stage | seconds | tokens/s | peak allocated GiB |",
        "|---|---|---|---|",
        f"| sample (HF generate) | {s['sample_s']:.2f} | {s['sample_tokens_per_s']:.0f} | "
        f"{s['rollout_peak_gib'] if s['rollout_peak_gib'] is None else round(s['rollout_peak_gib'], 2)} |",
        f"| reward (rule) | {s['reward_s']:.3f} | | |",
        f"| rollout (sample + reward + batch) | {s['rollout_s']:.2f} | | |",
        f"| update (forward + backward + AdamW) | {s['update_s']:.2f} | {s['update_tokens_per_s']:.0f} | "
        f"{s['update_peak_gib'] if s['update_peak_gib'] is None else round(s['update_peak_gib'], 2)} |",
        f"| step | {s['step_s']:.2f} | | |",
        "",
        f"Update: {s['update_tflops']:.1f} TFLOP of model FLOPs in {s['update_s']:.2f} s = {s['update_tflop_per_s']:.1f} TFLOP/s"
        + (f", **MFU {100 * s['mfu_update']:.1f}%** of {peak:g} TFLOP/s" if s["mfu_update"] is not None else " (no peak known: MFU not computed)")
        + f"; loss {s['loss']:.4g}, grad norm {s['grad_norm']:.3g}.",
        "",
    ]
    print("\n".join(lines))
    if a.out:
        a.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
