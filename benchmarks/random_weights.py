"""Real-size reward models with random weights, for timing where no weights can travel (the GPU acceptance run).

The GPU machine has no network and takes 64 MiB of carried files, so neither Whisper's nor X-codec2's weights
reach it. Their cost depends on their shapes, not their values, with two exceptions this module removes:
  - what Whisper transcribes decides how many decoding steps run. `fixed_length_decoding(n)` makes every greedy
    decoding (WhisperReward's batched one and `whisper.transcribe`'s) emit exactly n text tokens, then
    <|endoftext|>, whatever the random weights would have said;
  - what the codec outputs decides whether Whisper runs at all: a random decoder's audio may be silent or
    clipping, which the reward's guards score before Whisper. `NoiseSpeechCodec` runs the real-size X-codec2
    decoder on the codes for its cost and hands Whisper speech-level noise of the same length instead.
Whisper itself comes from `WhisperReward(whisper_model="random:large-v3")` (reward/whisper_weights.py).
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Iterator, Sequence

import torch
from whisper.decoding import DecodingTask, LogitFilter

HOP = 320  # X-codec2: 16 kHz samples per code
CODES_PER_SECOND = 50


class FixedLength(LogitFilter):
    """Forbids every special token (<|endoftext|>, timestamps, ...) for the first n sampled tokens, then forces
    <|endoftext|>: each row decodes exactly n text tokens. Runs after the other filters."""

    def __init__(self, n: int, sample_begin: int, eot: int) -> None:
        self.n, self.sample_begin, self.eot = n, sample_begin, eot

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """logits: (B, V), modified in place; tokens: (B, L) decoded so far, prompt included."""
        if tokens.shape[1] - self.sample_begin < self.n:
            logits[:, self.eot :] = -torch.inf  # every id from <|endoftext|> up is special in Whisper's vocabulary
        else:
            logits[:] = -torch.inf
            logits[:, self.eot] = 0.0


_ORIGINAL_RUN = DecodingTask.run


def install_fixed_length_decoding(n: int | None) -> None:
    """From now on in this process every Whisper DecodingTask (and so `whisper.transcribe`) decodes n text
    tokens per row; None restores openai-whisper's own behaviour."""
    if n is None:
        DecodingTask.run = _ORIGINAL_RUN
        return
    if n < 1:
        raise ValueError(f"--decode-tokens={n} must be >= 1")

    def run(self: DecodingTask, mel: torch.Tensor):
        if n > self.sample_len:
            raise ValueError(f"--decode-tokens={n} exceeds the decoding cap sample_len={self.sample_len}")
        self.logit_filters.append(FixedLength(n, self.sample_begin, self.tokenizer.eot))
        try:
            return _ORIGINAL_RUN(self, mel)
        finally:
            self.logit_filters.pop()

    DecodingTask.run = run


@contextlib.contextmanager
def fixed_length_decoding(n: int | None) -> Iterator[None]:
    install_fixed_length_decoding(n)
    try:
        yield
    finally:
        install_fixed_length_decoding(None)


class NoiseSpeechCodec:
    """SpeechDecoder: runs `xcodec2` (if given) on the codes for its cost; returns Gaussian noise at `rms`
    (speech level), 320 samples per code, the same for the same codes."""

    sample_rate = 16_000

    def __init__(self, xcodec2=None, rms: float = 0.1) -> None:
        self.xcodec2, self.rms = xcodec2, rms

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        if self.xcodec2 is not None:
            self.xcodec2.decode(codes)
        out = []
        for c in codes:
            g = torch.Generator().manual_seed(zlib.crc32(repr(list(c)).encode()))
            out.append(self.rms * torch.randn(HOP * len(c), generator=g))
        return out


def speech_lengths(n: int) -> list[int]:
    """Code counts of n utterances of 2.0 .. 4.0 s (as the espeak Harvard sentences of bench_reward.py)."""
    return [int(CODES_PER_SECOND * (2.0 + 0.25 * (i % 9))) for i in range(n)]


def mean_text_tokens(texts: Sequence[str], multilingual: bool = True) -> int:
    """Mean count of Whisper text tokens of `texts`: the length a correct transcript would decode."""
    from whisper.tokenizer import get_tokenizer

    tok = get_tokenizer(multilingual)
    return round(sum(len(tok.encode(" " + t.strip())) for t in texts) / len(texts))
