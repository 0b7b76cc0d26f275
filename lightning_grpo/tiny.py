"""A tiny LLaSA-shaped tokenizer and Llama model, built in code (no download).

Same layout as LLaSA: a base text vocabulary (here 256 byte tokens + 5 Llama-3 chat specials instead of
128,256), then the 8 control tokens, then `<|s_0|>` .. `<|s_{K-1}|>`, and a Llama-3 chat template.
It backs the CPU default run, the tests and the benchmarks. `build_tiny_llasa` is deterministic for a seed.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .llasa import CONTROL_TOKENS, speech_token

CHAT_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Llama-3's template, whitespace-trimmed content, one <|eot_id|> per turn.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_tiny_tokenizer(num_speech_tokens: int = 64) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with LLaSA's added-token layout and `num_speech_tokens` speech tokens."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(CHAT_SPECIALS))
    # LLaSA's control and speech tokens are ordinary added tokens, in this order.
    tok.add_tokens(list(CONTROL_TOKENS) + [speech_token(i) for i in range(num_speech_tokens)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, **overrides) -> LlamaConfig:
    """A Llama-3.2-style config scaled down (GQA 4:2 heads, untied head, RoPE)."""
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_llasa(
    num_speech_tokens: int = 64, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """(model, tokenizer) of a tiny random LLaSA; same seed, same weights."""
    tokenizer = build_tiny_tokenizer(num_speech_tokens)
    config = tiny_llama_config(
        len(tokenizer),
        hidden_size,
        num_layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer
