"""Shared helpers for the reward tests: espeak-ng speech and a decoder that returns stored audio."""

from __future__ import annotations

import functools
import io
import math
import shutil
import subprocess
from typing import Sequence

import torch

SAMPLE_RATE = 16_000
HOP = 320  # X-codec2 samples per code

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A rainbow is a division of white light into many beautiful colors.",
    "She sells sea shells by the sea shore.",
)


@functools.lru_cache(maxsize=None)
def espeak(text: str, voice: str = "en-us", speed: int = 130) -> torch.Tensor:
    """16 kHz mono float32 speech of `text` from espeak-ng (resampled from 22.05 kHz by sox)."""
    return espeak_ng(text, voice, speed)


@functools.lru_cache(maxsize=None)
def espeak_ng(text: str, voice: str = "en-us", speed: int = 130, extra: tuple[str, ...] = ()) -> torch.Tensor:
    """`espeak` with extra espeak-ng arguments: ("-p", "80") sets the pitch, ("-m",) reads `text` as SSML."""
    import soundfile as sf  # here, not at import: the GPU run collects these tests without it

    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: `apt-get install -y espeak-ng sox` (.ci/run does this)")
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), *extra, "--stdout", text], check=True, capture_output=True
    ).stdout
    out = subprocess.run(
        ["sox", "-t", "wav", "-", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-t", "wav", "-"],
        input=wav, check=True, capture_output=True,
    ).stdout
    audio, sr = sf.read(io.BytesIO(out), dtype="float32")
    assert sr == SAMPLE_RATE
    return torch.from_numpy(audio)


class StoredAudioDecoder:
    """A SpeechDecoder that maps each registered code sequence to a stored waveform.

    `add(audio)` returns codes of realistic length (one per 320 samples), unique to that waveform.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self) -> None:
        self._audio: dict[tuple[int, ...], torch.Tensor] = {}

    def add(self, audio: torch.Tensor) -> list[int]:
        k = len(self._audio)
        codes = [k] * max(1, math.ceil(audio.numel() / HOP))
        self._audio[tuple(codes)] = audio.float()
        return codes

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return [self._audio[tuple(c)].clone() for c in codes]
