"""LLaSA vocabulary layout, prompt template and completion parsing."""

from __future__ import annotations

import pytest

from lightning_grpo.llasa import (
    CONTROL_TOKENS,
    LlasaVocab,
    codes_to_ids,
    encode_prompt,
    parse_completion,
    prompt_messages,
)
from lightning_grpo.tiny import build_tiny_tokenizer


def test_tiny_tokenizer_has_llasa_layout(tiny, vocab):
    tok = tiny[1]
    # control tokens in LLaSA's order, directly before <|s_0|>
    ids = [tok.convert_tokens_to_ids(t) for t in CONTROL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + 8))
    assert vocab.speech_start_id == ids[-1] + 1
    assert vocab.speech_gen_start_id == ids[4] and vocab.speech_gen_end_id == ids[5]
    assert vocab.num_speech_tokens == 64 and vocab.speech_end_id == len(tok)
    # added tokens survive decoding with skip_special_tokens, as in the real tokenizer
    assert "<|s_3|>" in tok.decode([vocab.code_to_id(3)], skip_special_tokens=True)


def test_real_llasa_ids_from_a_full_size_layout():
    """A tokenizer with LLaSA-1B's exact layout gives the documented ids (128264, 128260, 128261)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lightning_grpo.llasa import LLAMA3_VOCAB_SIZE, speech_token

    base = {f"<t{i}>": i for i in range(LLAMA3_VOCAB_SIZE)}
    tok = Tokenizer(models.WordLevel(vocab=base, unk_token="<t0>"))
    tok.add_tokens(list(CONTROL_TOKENS) + [speech_token(i) for i in range(65536)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<t1>")
    v = LlasaVocab.from_tokenizer(hf)
    assert len(hf) == 193_800
    assert (v.speech_start_id, v.speech_gen_start_id, v.speech_gen_end_id) == (128264, 128260, 128261)
    assert v.num_speech_tokens == 65536


def test_prompt_is_user_turn_plus_continued_assistant_prefix(tiny, vocab):
    tok = tiny[1]
    ids = encode_prompt(tok, "Hello world.")
    text = tok.decode(ids)
    assert ids[-1] == vocab.speech_gen_start_id  # continued, no <|eot_id|> after the prefix
    assert "Convert the text to speech:<|TEXT_UNDERSTANDING_START|>Hello world.<|TEXT_UNDERSTANDING_END|>" in text
    assert text.count("<|eot_id|>") == 1  # only the user turn is closed
    assert prompt_messages("x")[1] == {"role": "assistant", "content": "<|SPEECH_GENERATION_START|>"}


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_prompt_text_is_an_error(tiny, bad):
    with pytest.raises(ValueError, match="empty"):
        encode_prompt(tiny[1], bad)


def test_prompt_longer_than_limit_names_the_flag(tiny):
    with pytest.raises(ValueError, match="--max_prompt_length=10"):
        encode_prompt(tiny[1], "a rather long sentence", max_prompt_length=10)


def test_parse_completion_cuts_at_stop_and_maps_codes(vocab):
    ids = codes_to_ids([5, 0, 63], vocab) + [vocab.pad_id, vocab.code_to_id(7)]
    parsed = parse_completion(ids, vocab)
    assert parsed.codes == [5, 0, 63] and parsed.stopped and parsed.num_invalid == 0


def test_parse_completion_flags_or_rejects_non_speech_ids(vocab):
    ids = [vocab.code_to_id(1), vocab.text_understanding_start_id, vocab.code_to_id(2)]
    parsed = parse_completion(ids, vocab, on_invalid="flag")
    assert parsed.codes == [1, 2] and parsed.num_invalid == 1 and not parsed.stopped
    with pytest.raises(ValueError, match=f"generated id {vocab.text_understanding_start_id}"):
        parse_completion(ids, vocab, on_invalid="error")


def test_code_range_errors_name_the_value(vocab):
    with pytest.raises(ValueError, match="codec code 64 is outside 0..63"):
        vocab.code_to_id(64)
    with pytest.raises(ValueError, match=r"speech token id 5 is outside <\|s_0\|>"):
        vocab.id_to_code(5)


def test_non_llasa_tokenizer_is_rejected():
    tok = build_tiny_tokenizer(4)
    from transformers import AutoTokenizer  # noqa: F401  (the real path users take)

    class NoSpeech:
        unk_token_id = 0
        unk_token = "<unk>"

        def convert_tokens_to_ids(self, t):
            return 0

        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="not a LLaSA tokenizer"):
        LlasaVocab.from_tokenizer(NoSpeech())
    assert LlasaVocab.from_tokenizer(tok).num_speech_tokens == 4
