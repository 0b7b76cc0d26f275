"""LLaSA specifics: vocabulary layout, prompt template, and parsing generated ids into codec codes.

LLaSA (arXiv 2502.04128) is a Llama-3.2 model whose vocabulary is the 128,256 Llama tokens, then
8 control tokens, then one token per X-codec2 code: `<|s_0|>` .. `<|s_65535|>`. A prompt is the base
model's chat template with the user turn
`Convert the text to speech:<|TEXT_UNDERSTANDING_START|>{text}<|TEXT_UNDERSTANDING_END|>` and the
assistant turn *continued* from `<|SPEECH_GENERATION_START|>`; the model then emits speech tokens and
stops with `<|SPEECH_GENERATION_END|>`, which we always pass as the explicit stop token. A voice-cloning
(zero-shot) prompt puts the reference clip's transcript before the target text inside the text markers and
the reference's codes, as speech tokens, after `<|SPEECH_GENERATION_START|>`: the model continues that
speaker's speech, and only the continuation is sampled, scored and trained on.

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
MAX_REFERENCE_SECONDS = 30.0  # a voice-cloning reference clip: a speaker embedding needs seconds, not minutes
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


_CJK_RANGES = ((0x3000, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF))


def _is_cjk(ch: str) -> bool:
    """Han, kana and CJK punctuation: scripts written without spaces between words."""
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES)


def join_texts(prompt_text: str, text: str) -> str:
    """The reference transcript followed by the target text, as LLaSA's zero-shot prompt holds them.

    One space between them, none where either side of the join is Chinese or Japanese (written without spaces).
    """
    prompt_text, text = prompt_text.strip(), text.strip()
    sep = "" if _is_cjk(prompt_text[-1]) or _is_cjk(text[0]) else " "
    return f"{prompt_text}{sep}{text}"


def prompt_messages(
    text: str, prompt_text: str | None = None, prompt_codes: Sequence[int] | None = None
) -> list[dict[str, str]]:
    """The chat messages of one TTS prompt; the assistant message is continued, not closed.

    With a voice-cloning reference (LLaSA's zero-shot format), the reference transcript `prompt_text` is joined
    to the target text inside the text markers and the reference's codes follow <|SPEECH_GENERATION_START|> as
    `<|s_N|>` tokens, so the model continues the reference speaker's speech with the target text.
    """
    check_reference(prompt_text, prompt_codes)
    full = join_texts(prompt_text, text) if prompt_text else text
    return _chat(full, "".join(speech_token(int(c)) for c in prompt_codes) if prompt_codes else "")


def _chat(text: str, speech: str) -> list[dict[str, str]]:
    return [
        {
            "role": "user",
            "content": f"{USER_INSTRUCTION}<|TEXT_UNDERSTANDING_START|>{text}<|TEXT_UNDERSTANDING_END|>",
        },
        {"role": "assistant", "content": f"<|SPEECH_GENERATION_START|>{speech}"},
    ]


def check_reference(prompt_text: str | None, prompt_codes: Sequence[int] | None) -> None:
    """A voice-cloning reference needs both its transcript and its codes, or neither."""
    has_text = isinstance(prompt_text, str) and bool(prompt_text.strip())
    has_codes = prompt_codes is not None and len(prompt_codes) > 0
    if has_text != has_codes:
        given, absent = ("prompt_text", "prompt_codes") if has_text else ("prompt_codes", "prompt_text")
        raise ValueError(
            f"a voice-cloning prompt has {given} but no {absent}: LLaSA's zero-shot prompt needs the reference "
            "clip's transcript and its X-codec2 codes together; give both or neither"
        )


def encode_prompt(
    tokenizer,
    text: str,
    max_prompt_length: int | None = None,
    prompt_text: str | None = None,
    prompt_codes: Sequence[int] | None = None,
) -> list[int]:
    """Token ids of the prompt for `text`, ending with <|SPEECH_GENERATION_START|> and, with a voice-cloning
    reference, the reference's speech tokens (`prompt_messages` says the layout).

    The reference's speech ids are appended to the template's ids rather than rendered as 250 `<|s_N|>` strings
    and tokenised: the same ids (tests check it), without tokenising every code. Raises a ValueError naming the
    text for an empty text, a reference with only one of its two parts, a code outside the speech vocabulary,
    or a prompt longer than `max_prompt_length`.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"prompt text {text!r} is empty: every prompt row needs a non-empty 'text' "
            "(drop empty rows when preparing the data)"
        )
    check_reference(prompt_text, prompt_codes)
    full = join_texts(prompt_text, text) if prompt_text else text
    ids = tokenizer.apply_chat_template(
        _chat(full, ""), tokenize=True, continue_final_message=True, add_generation_prompt=False
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    ids = [int(i) for i in ids]
    if prompt_codes:
        ids += codes_to_ids(prompt_codes, LlasaVocab.from_tokenizer(tokenizer), add_stop=False)
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        reference = f" (of which {len(prompt_codes)} reference codes)" if prompt_codes else ""
        raise ValueError(
            f"prompt for text {text[:60]!r} has {len(ids)} tokens{reference}, more than "
            f"--max_prompt_length={max_prompt_length}; raise the limit or shorten/drop the text"
            + (" or use a shorter reference clip" if prompt_codes else "")
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
