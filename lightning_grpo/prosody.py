"""Prosody statistics of a waveform, for pair manifests and scripted raters: pitch (f0) and energy movement.

Pure torch. `pitch_track` is a plain autocorrelation pitch tracker (Rabiner 1977): per 40 ms frame, the lag of the
highest normalised autocorrelation between fmax and fmin; a frame is voiced when that peak is at least
`voicing_threshold` and the frame is within 40 dB of the loudest one. It is no Praat (no octave-jump cost, no
interpolation: at 16 kHz one lag step is about 0.2 semitone at 200 Hz; the shortest strong
period wins, against octave errors), which suits statistics over an utterance,
not pitch-accurate analysis.
"""

from __future__ import annotations

import math

import torch


def pitch_track(wav: torch.Tensor, sample_rate: int, frame_s: float = 0.04, hop_s: float = 0.01, fmin: float = 60.0,
                fmax: float = 500.0, voicing_threshold: float = 0.6) -> torch.Tensor:
    """f0 in Hz per frame of a mono waveform (T,): (F,) float32, 0 for unvoiced frames."""
    wav = wav.detach().float().reshape(-1)
    frame, hop = int(frame_s * sample_rate), int(hop_s * sample_rate)
    if wav.numel() < frame:
        return torch.zeros(0)
    frames = wav.unfold(0, frame, hop)  # (F, L)
    frames = frames - frames.mean(-1, keepdim=True)
    spec = torch.fft.rfft(frames, n=2 * frame)
    ac = torch.fft.irfft(spec.abs() ** 2, n=2 * frame)[:, :frame]  # (F, L) autocorrelation by lag
    # normalise each lag by the energy of the overlapping parts, so long lags are not penalised
    energy = frames.pow(2).cumsum(-1)
    total = energy[:, -1:]
    lags = torch.arange(frame)
    head = total - torch.cat([torch.zeros_like(total), energy[:, :-1]], -1)[:, lags]  # energy of x[lag:]
    tail = energy[:, (frame - 1 - lags).clamp(min=0)]  # energy of x[:L-lag]
    norm = ac / (head * tail).clamp(min=1e-12).sqrt()
    lo, hi = int(sample_rate / fmax), min(int(sample_rate / fmin), frame - 1)
    window = norm[:, lo - 1: hi + 2]  # one lag either side, for the local-maximum test
    inner = window[:, 1:-1]
    peak = inner.max(-1).values
    # the shortest lag whose local maximum is within 10% of the highest: a periodic frame also peaks at 2x, 3x its
    # period, and taking the highest of those would halve f0 (the octave error)
    local = (inner >= window[:, :-2]) & (inner >= window[:, 2:]) & (inner >= 0.9 * peak[:, None])
    lag = local.int().argmax(-1)
    loud = 10 * torch.log10(total.squeeze(-1).clamp(min=1e-12))
    voiced = (peak >= voicing_threshold) & (loud >= loud.max() - 40)
    return torch.where(voiced, sample_rate / (lag + lo).float(), torch.zeros(()))


def prosody_stats(wav: torch.Tensor, sample_rate: int) -> dict[str, float]:
    """duration_s, voiced_fraction, f0_mean_hz, f0_std_semitones (pitch movement: the std of voiced frames' f0 in
    semitones around their mean), f0_range_semitones (5th to 95th percentile), energy_std_db (loudness movement
    over frames within 40 dB of the loudest). Statistics of no voiced frame are NaN."""
    wav = wav.detach().float().reshape(-1)
    f0 = pitch_track(wav, sample_rate)
    voiced = f0[f0 > 0]
    stats = {"duration_s": wav.numel() / sample_rate,
             "voiced_fraction": float((f0 > 0).float().mean()) if f0.numel() else 0.0}
    if voiced.numel():
        semitones = 12 * torch.log2(voiced / voiced.mean())
        q = torch.quantile(semitones, torch.tensor([0.05, 0.95])) if voiced.numel() > 1 else torch.zeros(2)
        stats.update(f0_mean_hz=float(voiced.mean()), f0_std_semitones=float(semitones.std(unbiased=False)),
                     f0_range_semitones=float(q[1] - q[0]))
    else:
        stats.update(f0_mean_hz=math.nan, f0_std_semitones=math.nan, f0_range_semitones=math.nan)
    frame = int(0.04 * sample_rate)
    if wav.numel() >= frame:
        db = 10 * torch.log10(wav.unfold(0, frame, frame // 4).pow(2).mean(-1).clamp(min=1e-12))
        db = db[db >= db.max() - 40]
        stats["energy_std_db"] = float(db.std(unbiased=False))
    else:
        stats["energy_std_db"] = math.nan
    return stats
