"""Reading reference clips: a wav path -> a 16 kHz mono float32 waveform, resampled in torch.

Voice-cloning rows may name a reference recording (`prompt_wav`) instead of relying on the audio decoded
from its codec codes. The package reads it with soundfile (already a dependency) and resamples with a
windowed-sinc filter of its own, so no librosa, scipy or ffmpeg is needed. The filter runs over blocks of
output samples, so its memory stays a few megabytes whatever the clip's length (BENCHMARKS.md, "Resampling a
long reference"); a reference longer than MAX_REFERENCE_SECONDS is refused before it is read.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..llasa import MAX_REFERENCE_SECONDS

RESAMPLE_BLOCK = 16_384  # output samples per filter block: (block, 2W+1) floats, 6.8 MB at 48 -> 16 kHz


def resample(wav: torch.Tensor, orig_sr: int, target_sr: int, zeros: int = 16, rolloff: float = 0.95,
             block: int = RESAMPLE_BLOCK) -> torch.Tensor:
    """Band-limited resampling of a 1-D waveform (Hann-windowed sinc, `zeros` zero crossings per side).

    The ratio is reduced to integers up / down (44,100 -> 16,000 is 160 / 441); output sample j sits at
    input time j * orig_sr / target_sr. The cutoff is `rolloff` times the lower Nyquist frequency. Output
    phase p = j mod up uses filter row p on the input window starting at (j // up) * down; the windows of
    `block` outputs are gathered at a time, so memory is O(block * taps) besides the input and output.
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be > 0, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return wav
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    cutoff = rolloff * min(1.0, up / down)  # relative to the input's Nyquist, in units of input samples
    width = math.ceil(zeros / cutoff)  # half-width of the filter in input samples
    # kernel[p, k]: weight of input sample (base + k - width) for output phase p = j mod up
    phase = torch.arange(up, dtype=torch.float64)[:, None] * down / up  # (up, 1) fractional positions
    base = torch.floor(phase)
    taps = torch.arange(-width, width + 1, dtype=torch.float64)[None, :]  # (1, 2W+1)
    t = taps - (phase - base)  # distance from the output instant, in input samples
    window = torch.where(t.abs() <= width, torch.cos(t * math.pi / width / 2).square(), torch.zeros_like(t))
    kernel = (cutoff * torch.sinc(cutoff * t) * window).to(wav.dtype)  # (up, 2W+1)
    n_out = math.ceil(wav.numel() * up / down)
    padded = F.pad(wav[None, None], (width, width + down + 1))[0, 0]
    windows = padded.unfold(0, 2 * width + 1, 1)  # (len, 2W+1) view: windows[s] = padded[s : s + 2W+1]
    out = torch.empty(n_out, dtype=wav.dtype)
    for p in range(min(up, n_out)):
        of_phase = out[p::up]  # outputs j = p + k * up, k = 0 .. n_p - 1 (a view)
        for k0 in range(0, of_phase.numel(), block):
            k = torch.arange(k0, min(k0 + block, of_phase.numel()))
            frames = windows[k * down + int(base[p, 0])]  # (block, 2W+1)
            of_phase[k0 : k0 + k.numel()] = frames @ kernel[p]
    return out


def load_wav(path: str | Path, sample_rate: int = 16_000, max_seconds: float = MAX_REFERENCE_SECONDS) -> torch.Tensor:
    """A 1-D float32 waveform at `sample_rate` from an audio file soundfile reads (wav, flac, ogg); channels averaged.
    A recording longer than `max_seconds` is a ValueError (read nothing of it)."""
    import soundfile as sf

    path = Path(path)  # no `~` expansion: a scoring server passes client-named paths through request
    if not path.is_file():
        raise FileNotFoundError(f"reference audio {path} does not exist (column prompt_wav); fix the path or drop it")
    info = sf.info(str(path))
    if info.frames > max_seconds * info.samplerate:
        raise ValueError(f"reference audio {path} (column prompt_wav) is {info.frames / info.samplerate:.1f} s long, "
                         f"more than the {max_seconds:g} s a reference may last; cut a shorter clip")
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    wav = torch.from_numpy(data).mean(dim=1)
    return resample(wav, int(sr), sample_rate)
