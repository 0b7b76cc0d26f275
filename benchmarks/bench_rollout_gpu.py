"""Rollout throughput on one GPU: vLLM (VLLMSampler's engine) vs HF `generate`, LLaSA-1B-shaped model.

The model has Llama-3.2-1B dimensions and LLaSA's 193,800-token vocabulary with random weights, so no
download is needed; lengths are fixed (every row generates exactly --new-tokens: the stop token is
suppressed with min_tokens / min_new_tokens) so both sides do the same work. Prints tokens/s for each,
the speed-up, and the seconds of one in-place weight sync (policy -> engine), as JSON and text.

    python benchmarks/bench_rollout_gpu.py                     # needs CUDA and `pip install -r requirements-gpu.txt`
    python benchmarks/bench_rollout_gpu.py --smoke             # CPU: builds the config, checks arguments
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLASA_VOCAB = 193_800
STOP_ID = 128_261  # <|SPEECH_GENERATION_END|>
SPEECH_START_ID = 128_264  # <|s_0|>


def llasa_1b_config():
    """Llama-3.2-1B dimensions with LLaSA's vocabulary (tied embeddings, as Llama-3.2-1B)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=LLASA_VOCAB,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131_072,
        rope_theta=500_000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128_000,
        eos_token_id=STOP_ID,
        torch_dtype="bfloat16",
    )


def num_params(cfg) -> int:
    d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d  # q, o, k, v, gate/up/down, two norms
    return V * d + L * per_layer + d + (0 if cfg.tie_word_embeddings else V * d)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (original run: 8)")
    p.add_argument("--group-size", type=int, default=16, help="completions per prompt G (original run: 16)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=512, help="generated tokens per row, fixed (512 ~ 10 s of audio)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the GPU")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--sync-repeats", type=int, default=3, help="weight syncs timed (median reported)")
    p.add_argument("--skip-hf", action="store_true", help="only vLLM (HF generate at G=16 x 512 takes minutes)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs in vLLM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    p.add_argument("--smoke", action="store_true", help="CPU check: build the config, validate arguments, exit")
    a = p.parse_args(argv)
    for name in ("prompts", "group_size", "prompt_len", "new_tokens", "sync_repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 1")
    if not 0 < a.gpu_memory_utilization <= 1:
        p.error(f"--gpu-memory-utilization={a.gpu_memory_utilization} must be in (0, 1]")
    if a.temperature <= 0:
        p.error(f"--temperature={a.temperature} must be > 0")
    return a


def make_prompts(a) -> list[list[int]]:
    import torch

    from lightning_grpo.llasa import XCODEC2_CODEBOOK_SIZE

    g = torch.Generator().manual_seed(a.seed)
    # speech-token prompts: any ids work for throughput, these keep the run LLaSA-like
    return (torch.randint(0, XCODEC2_CODEBOOK_SIZE, (a.prompts, a.prompt_len), generator=g) + SPEECH_START_ID).tolist()


def bench_vllm(model, prompts, a) -> dict:
    import torch

    from lightning_grpo.vllm_sampler import SampleRequest, VLLMSampler

    class PL(torch.nn.Module):  # what VLLMSampler.setup reads: .device and the HF config
        def __init__(self, m):
            super().__init__()
            self.model = m
            self.device = torch.device("cuda")

    s = VLLMSampler(
        temperature=a.temperature,
        max_new_tokens=a.new_tokens,
        gpu_memory_utilization=a.gpu_memory_utilization,
        dtype=a.dtype,
        max_model_len=a.prompt_len + a.new_tokens + 8,
        seed=a.seed,
        enforce_eager=a.enforce_eager,
        engine_kwargs={"max_num_seqs": max(256, a.prompts * a.group_size)},
    )
    s.setup(PL(model))
    syncs = [s.sync_weights(model) for _ in range(a.sync_repeats)]
    verify = s.verify_sync(model, prompts[0], [SPEECH_START_ID + i for i in range(32)])
    warm = SampleRequest(a.group_size, a.temperature, 1.0, 0, 8, STOP_ID, min_tokens=8)
    s.engine.generate(prompts, warm)
    req = SampleRequest(a.group_size, a.temperature, 1.0, 0, a.new_tokens, STOP_ID, min_tokens=a.new_tokens)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    groups = s.engine.generate(prompts, req)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.ids) for g in groups for c in g)
    if tokens != a.prompts * a.group_size * a.new_tokens:
        raise RuntimeError(f"vLLM generated {tokens} tokens, expected fixed lengths of {a.new_tokens}")
    return {
        "vllm_seconds": seconds,
        "vllm_tokens_per_s": tokens / seconds,
        "sync_seconds_median": statistics.median(syncs),
        "sync_seconds_all": syncs,
        "engine_build_seconds": s.build_seconds,
        "verify_mean_abs_logprob_diff": verify["sync/logprob_mean_abs_diff"],
        "verify_ok": bool(verify["sync/ok"]),
    }


def bench_hf(model, prompts, a) -> dict:
    import torch

    rows = torch.tensor([p for p in prompts for _ in range(a.group_size)], device="cuda")  # (B*G, P)
    kw = dict(do_sample=True, temperature=a.temperature, top_p=1.0, top_k=0, eos_token_id=STOP_ID, pad_token_id=STOP_ID)
    model.generate(input_ids=rows, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(input_ids=rows, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **kw)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = (out.shape[1] - rows.shape[1]) * rows.shape[0]
    return {"hf_seconds": seconds, "hf_tokens_per_s": tokens / seconds}


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = llasa_1b_config()
    shape = {
        "vocab_size": cfg.vocab_size,
        "params": num_params(cfg),
        "rows": a.prompts * a.group_size,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
    }
    if a.smoke:
        print(json.dumps({"smoke": True, **shape}))
        print(f"smoke ok: LLaSA-1B-shaped config, vocab {cfg.vocab_size}, {shape['params'] / 1e9:.2f} B params")
        return 0
    import torch

    if not torch.cuda.is_available():
        print(
            "bench_rollout_gpu: no CUDA GPU here. Run it on a GPU machine after "
            "`pip install -r requirements-gpu.txt`, or pass --smoke for the CPU argument check.",
            file=sys.stderr,
        )
        return 2
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("bench_rollout_gpu: vllm is not installed: `pip install -r requirements-gpu.txt`", file=sys.stderr)
        return 2
    from transformers import LlamaForCausalLM

    torch.manual_seed(a.seed)
    dtype = getattr(torch, a.dtype)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    prompts = make_prompts(a)
    result = {"device": torch.cuda.get_device_name(), "G": a.group_size, **shape}
    result.update(bench_vllm(model, prompts, a))
    if not a.skip_hf:
        result.update(bench_hf(model, prompts, a))
        result["speedup"] = result["vllm_tokens_per_s"] / result["hf_tokens_per_s"]
    print(json.dumps(result))
    print(
        f"{result['device']}: vLLM {result['vllm_tokens_per_s']:.0f} tok/s"
        + (f", HF generate {result['hf_tokens_per_s']:.0f} tok/s, x{result['speedup']:.1f}" if "speedup" in result else "")
        + f"; weight sync {result['sync_seconds_median']:.3f} s (median of {a.sync_repeats});"
        f" sync check mean |dlogp| {result['verify_mean_abs_logprob_diff']:.4f}"
    )
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
