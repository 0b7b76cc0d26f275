"""LLaSA specifics: vocabulary layout, prompt template, and parsing generated ids into codec codes.

LLaSA (arXiv 2502.04128) is a Llama-3.2 model whose vocabulary is the 128,256 Llama tokens, then
8 control tokens, then one token per X-codec2 code: `<|s_0|>` .. `<|s_65535|>`. A prompt is the base
model's chat template with the user turn
`Convert the text to speech:<|TEXT_UNDERSTANDING_START|>{text}<|TEXT_UNDERSTANDING_END|>` and the
assistant turn *continued* from `<|SPEECH_GENERATION_START|>`; the model then emits speech tokens and
stops with `<|SPEECH_GENERATION_END|>`, which we always pass as the explicit stop token.

Everything here is pure: it takes a tokenizer (anything with `convert_tokens_to_ids`,
`apply_chat_template` and `__len__`) and lists of ids. The tiny tokenizer in `tiny.py` has the same
layout with a smaller base vocabulary and fewer speech tokens, so the same code serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

CONTROL_TOKENS = (
    "<|TEXT_GENERATION_START|>",
    "<|TEXT_GENERATION_END|>",
    "<|TEXT_UNDERSTANDING_START|>",
    "<|TEXT_UNDERSTANDING_END|>",
    "<|SPEECH_GENERATION_START|>",
    "<|SPEECH_GENERATION_END|>",
    "<|SPEECH_UNDERSTANDING_START|>",
    "<|SPEECH_UNDERSTANDING_END|>",
)
LLAMA3_VOCAB_SIZE = 128_256
XCODEC2_CODEBOOK_SIZE = 65_536
TOKENS_PER_SECOND = 50  # X-codec2 frame rate at 16 kHz
SAMPLE_RATE = 16_000
USER_INSTRUCTION = "Convert the text to speech:"


def speech_token(code: int) -> str:
    """The token string of codec code `code`: 5 -> '<|s_5|>'."""
    return f"<|s_{code}|>"


@dataclass(frozen=True)
class LlasaVocab:
    """Ids of the LLaSA-specific tokens in one tokenizer.

    Real LLaSA: speech_start_id = 128264 (`<|s_0|>`), num_speech_tokens = 65536,
    speech_gen_start_id = 128260, speech_gen_end_id = 128261.
    """

    speech_start_id: int
    num_speech_tokens: int
    speech_gen_start_id: int
    speech_gen_end_id: int
    text_understanding_start_id: int
    text_understanding_end_id: int
    pad_id: int

    @property
    def speech_end_id(self) -> int:
        """One past the last speech token id."""
        return self.speech_start_id + self.num_speech_tokens

    def is_speech(self, token_id: int) -> bool:
        return self.speech_start_id <= token_id < self.speech_end_id

    def code_to_id(self, code: int) -> int:
        if not 0 <= code < self.num_speech_tokens:
            raise ValueError(
                f"codec code {code} is outside 0..{self.num_speech_tokens - 1}; "
                "codes must come from the X-codec2 codebook this vocabulary was built for"
            )
        return self.speech_start_id + code

    def id_to_code(self, token_id: int) -> int:
        if not self.is_speech(token_id):
            raise ValueError(
                f"speech token id {token_id} is outside <|s_0|>..<|s_{self.num_speech_tokens - 1}|> "
                f"(ids {self.speech_start_id}..{self.speech_end_id - 1})"
            )
        return token_id - self.speech_start_id

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "LlasaVocab":
        """Read the layout off a tokenizer and check it is LLaSA-shaped (contiguous speech ids)."""

        def tid(token: str) -> int:
            i = tokenizer.convert_tokens_to_ids(token)
            unk = getattr(tokenizer, "unk_token_id", None)
            if i is None or (unk is not None and i == unk and token != getattr(tokenizer, "unk_token", None)):
                raise ValueError(
                    f"tokenizer has no token {token!r}: it is not a LLaSA tokenizer "
                    "(use HKUSTAudio/Llasa-1B or lightning_grpo.tiny.build_tiny_tokenizer)"
                )
            return int(i)

        start = tid(speech_token(0))
        n = len(tokenizer) - start
        if n <= 0 or tid(speech_token(n - 1)) != start + n - 1:
            raise ValueError(
                f"speech tokens of this tokenizer are not contiguous from <|s_0|> (id {start}) "
                f"to the end of the vocabulary ({len(tokenizer)} tokens)"
            )
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        return cls(
            speech_start_id=start,
            num_speech_tokens=n,
            speech_gen_start_id=tid("<|SPEECH_GENERATION_START|>"),
            speech_gen_end_id=tid("<|SPEECH_GENERATION_END|>"),
            text_understanding_start_id=tid("<|TEXT_UNDERSTANDING_START|>"),
            text_understanding_end_id=tid("<|TEXT_UNDERSTANDING_END|>"),
            pad_id=int(pad),
        )


def prompt_messages(text: str) -> list[dict[str, str]]:
    """The chat messages of one TTS prompt; the assistant message is continued, not closed."""
    return [
        {
            "role": "user",
            "content": f"{USER_INSTRUCTION}<|TEXT_UNDERSTANDING_START|>{text}<|TEXT_UNDERSTANDING_END|>",
        },
        {"role": "assistant", "content": "<|SPEECH_GENERATION_START|>"},
    ]


def encode_prompt(tokenizer, text: str, max_prompt_length: int | None = None) -> list[int]:
    """Token ids of the prompt for `text`, ending with <|SPEECH_GENERATION_START|>.

    Raises a ValueError naming the text for an empty text or one longer than `max_prompt_length`.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"prompt text {text!r} is empty: every prompt row needs a non-empty 'text' "
            "(drop empty rows when preparing the data)"
        )
    ids = tokenizer.apply_chat_template(
        prompt_messages(text), tokenize=True, continue_final_message=True, add_generation_prompt=False
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    ids = [int(i) for i in ids]
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        raise ValueError(
            f"prompt for text {text[:60]!r} has {len(ids)} tokens, more than "
            f"--max_prompt_length={max_prompt_length}; raise the limit or shorten/drop the text"
        )
    return ids


InvalidTokenPolicy = Literal["error", "drop", "flag"]


@dataclass(frozen=True)
class ParsedSpeech:
    """The speech part of one completion.

    codes: codec codes in order (non-speech ids removed); stopped: the completion ended with
    <|SPEECH_GENERATION_END|>; num_invalid: non-speech ids found inside the speech span.
    """

    codes: list[int]
    stopped: bool
    num_invalid: int


def parse_completion(
    completion_ids: Sequence[int], vocab: LlasaVocab, on_invalid: InvalidTokenPolicy = "flag"
) -> ParsedSpeech:
    """Cut a completion at the first <|SPEECH_GENERATION_END|> and map speech ids to codes.

    Padding after the stop token is ignored. A non-speech id before the stop token is an
    invalid token: `error` raises, `drop` and `flag` skip it and count it in `num_invalid`
    (the reward module turns a non-zero count into a per-sample reason).
    """
    codes: list[int] = []
    invalid = 0
    stopped = False
    for t in completion_ids:
        t = int(t)
        if t == vocab.speech_gen_end_id:
            stopped = True
            break
        if vocab.is_speech(t):
            codes.append(t - vocab.speech_start_id)
        elif on_invalid == "error":
            raise ValueError(
                f"generated id {t} inside the speech span is not a speech token "
                f"(<|s_0|>..<|s_{vocab.num_speech_tokens - 1}|> = ids {vocab.speech_start_id}.."
                f"{vocab.speech_end_id - 1}); set on_invalid='flag' to score it as invalid instead"
            )
        else:
            invalid += 1
    return ParsedSpeech(codes=codes, stopped=stopped, num_invalid=invalid)


def codes_to_ids(codes: Sequence[int], vocab: LlasaVocab, add_stop: bool = True) -> list[int]:
    """Inverse of parse_completion for valid codes (used for teacher forcing and tests)."""
    ids = [vocab.code_to_id(int(c)) for c in codes]
    return ids + [vocab.speech_gen_end_id] if add_stop else ids
