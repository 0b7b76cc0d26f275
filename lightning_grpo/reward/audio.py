"""Reading reference clips: a wav path -> a 16 kHz mono float32 waveform, resampled in torch.

Voice-cloning rows may name a reference recording (`prompt_wav`) instead of relying on the audio decoded
from its codec codes. The package reads it with soundfile (already a dependency) and resamples with a
windowed-sinc filter of its own, so no librosa, scipy or ffmpeg is needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def resample(wav: torch.Tensor, orig_sr: int, target_sr: int, zeros: int = 16, rolloff: float = 0.95) -> torch.Tensor:
    """Band-limited resampling of a 1-D waveform (Hann-windowed sinc, `zeros` zero crossings per side).

    The ratio is reduced to integers up / down (44,100 -> 16,000 is 160 / 441); output sample j sits at
    input time j * orig_sr / target_sr. The cutoff is `rolloff` times the lower Nyquist frequency.
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
    j = torch.arange(n_out)
    for p in range(up):
        js = j[p::up]
        if js.numel() == 0:
            continue
        starts = (js // up) * down + int(base[p, 0])  # first tap's index into `padded`
        frames = windows[starts]  # (n_p, 2W+1)
        out[js] = frames @ kernel[p]
    return out


def load_wav(path: str | Path, sample_rate: int = 16_000) -> torch.Tensor:
    """A 1-D float32 waveform at `sample_rate` from an audio file soundfile reads (wav, flac, ogg); channels averaged."""
    import soundfile as sf

    path = Path(path)  # no `~` expansion: a scoring server passes client-named paths through request_references
    if not path.is_file():
        raise FileNotFoundError(f"reference audio {path} does not exist (column prompt_wav); fix the path or drop it")
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    wav = torch.from_numpy(data).mean(dim=1)
    return resample(wav, int(sr), sample_rate)
