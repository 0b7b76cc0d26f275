"""What the FSDP2 worker (fsdp_worker.py) and its single-process counterpart in test_fsdp.py share."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_grpo.sampling import Completions


class ScriptedSampler:
    """Completions that depend only on the prompt: row j of a prompt has its own length and speech ids, every
    third row runs to max_new_tokens without the stop token. The same rollout on one process or split over ranks."""

    temperature, top_p, top_k, max_new_tokens = 1.0, 1.0, 0, 8

    def setup(self, pl_module) -> None:
        pass

    def sample(self, model, prompts, n, stop_token_id, step, allowed_token_ids=None):
        speech = sorted(set(allowed_token_ids) - {stop_token_id})
        ids, truncated = [], []
        for p in prompts:
            key = sum(p)
            for j in range(n):
                runaway = j % 3 == 2
                length = self.max_new_tokens if runaway else 1 + (key + 3 * j) % 6
                row = [speech[(key * 7 + 13 * j + 5 * t) % len(speech)] for t in range(length)]
                ids.append(row if runaway else row + [stop_token_id])
                truncated.append(runaway)
        return Completions(ids=ids, truncated=truncated)


def scripted_policy_kwargs(beta: float) -> dict:
    """GRPOPolicy settings of the compared step: 2 updates over micro-batches of 3 of each rank's 4 rows, a chunk
    of 4 tokens (many chunks per micro-batch), a clip that acts (grad norm ~0.4)."""
    return dict(learning_rate=1e-2, micro_batch_size=3, num_iterations=2, logprob_chunk_size=4, max_grad_norm=0.1,
                beta=beta)


def save_tied_tiny(path: Path) -> Path:
    """The builtin tiny LLaSA with its head tied to the embedding (as LLaSA-1B/3B), as an HF directory."""
    from lightning_grpo.tiny import build_tiny_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = tiny_llama_config(len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>"),
                               pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
