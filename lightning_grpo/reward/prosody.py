"""Prosody statistics of decoded speech: how much the pitch moves, how loud and fast it is, how it pauses.

`prosody_stats(wavs, texts)` gives, per waveform (all of them through one batched pitch track, reward/pitch.py):

    f0_std_st        std of voiced-frame F0 in semitones (12 log2 f0); flat, monotone speech is near 0
    f0_range_st      5th-95th percentile range of voiced-frame F0, semitones
    voiced_fraction  voiced frames / frames of the active span (first to last frame within `voicing_db` of loud)
    energy_std_db    std of frame RMS (dB) over the non-pause frames of the active span
    speaking_rate    non-space characters of the target text per second of speech (active span minus pauses)
    pause_fraction   share of the active span in pauses: quiet runs of at least `min_pause_s`

`add_group_spreads` (called by the rollout, which knows the groups) gives each sample the std of a statistic over
the measured members of its prompt's group, so `<stat>_group_std` logged as a mean says how varied a prompt's G
renderings are; GRPO's advantage is blind to a spread that collapses while every sample still reads well.

Bad input gets a reason and NaN statistics (NaN is "not measured" in RewardResult.metrics: excluded from
logged means, never part of a reward):
    nonfinite   NaN or inf samples
    too_short   under `min_duration_s` (0.5 s): too few frames for a spread
    silent      RMS below `silence_rms`
    unvoiced    fewer than `min_voiced_frames` voiced frames: the energy, rate and pause statistics are still
                measured, the F0 ones are not
Clipped audio is measured clamped to [-1, 1], as the Whisper reward scores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .pitch import HOP_S, PitchTrack, track_pitch

STATS = ("f0_std_st", "f0_range_st", "voiced_fraction", "energy_std_db", "speaking_rate", "pause_fraction")
REASONS = ("nonfinite", "too_short", "silent", "unvoiced")


@dataclass
class ProsodyStats:
    """values: stat name -> (N,) float32, NaN where not measured; reasons: N entries, "ok", one of REASONS, or
    None for a sample not looked at (e.g. not decoded); tracks: the pitch tracks (None where not tracked)."""

    values: dict[str, torch.Tensor]
    reasons: list[str | None]
    tracks: list[PitchTrack | None]

    @staticmethod
    def empty(n: int) -> "ProsodyStats":
        return ProsodyStats({name: torch.full((n,), math.nan) for name in STATS}, [None] * n, [None] * n)

    def put(self, idx: Sequence[int], part: "ProsodyStats") -> None:
        """Write `part` (statistics of len(idx) samples) into rows `idx`."""
        for name, value in part.values.items():
            self.values[name][list(idx)] = value
        for j, i in enumerate(idx):
            self.reasons[i], self.tracks[i] = part.reasons[j], part.tracks[j]


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(F,) bool -> [(start, end)) runs of True."""
    edges = torch.diff(torch.nn.functional.pad(mask.int(), (1, 1)))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def _measure(
    track: PitchTrack, text: str, voicing_db: float, min_pause_s: float, min_voiced_frames: int
) -> dict[str, float]:
    db = track.rms_db
    active = db > db.quantile(0.95) - voicing_db
    span = active.nonzero().flatten()
    lo, hi = int(span[0]), int(span[-1]) + 1
    quiet = ~active[lo:hi]
    pause = torch.zeros_like(quiet)
    min_frames = max(1, round(min_pause_s / HOP_S))
    for start, end in _runs(quiet):
        if end - start >= min_frames:
            pause[start:end] = True
    frames = hi - lo
    speech_s = max(int((~pause).sum()), 1) * HOP_S
    talk = db[lo:hi][~pause]
    out = {
        "voiced_fraction": float(track.voiced[lo:hi].float().mean()),
        "energy_std_db": float(talk.std()) if talk.numel() > 1 else 0.0,
        "speaking_rate": sum(not c.isspace() for c in text) / speech_s,
        "pause_fraction": float(pause.float().mean()) if frames else 0.0,
        "f0_std_st": math.nan,
        "f0_range_st": math.nan,
    }
    f0 = track.f0[track.voiced]
    if f0.numel() >= min_voiced_frames:
        st = 12 * torch.log2(f0)
        out["f0_std_st"] = float(st.std())
        out["f0_range_st"] = float(st.quantile(0.95) - st.quantile(0.05))
    return out


def prosody_stats(
    wavs: Sequence[torch.Tensor],
    texts: Sequence[str],
    sample_rate: int = 16_000,
    min_duration_s: float = 0.5,
    silence_rms: float = 1e-3,
    min_voiced_frames: int = 10,
    min_pause_s: float = 0.15,
    voicing_db: float = 35.0,
    min_strength: float = 0.45,
) -> ProsodyStats:
    """Statistics (module docstring) of N 1-D waveforms at `sample_rate` speaking `texts`; one pitch-tracking pass.
    min_strength: Praat voicing strength a frame needs to count as voiced (reward/pitch.py)."""
    if len(wavs) != len(texts):
        raise ValueError(f"prosody_stats got {len(wavs)} waveforms but {len(texts)} texts")
    n = len(wavs)
    reasons = ["ok"] * n
    todo = []
    for i, wav in enumerate(wavs):
        if not torch.isfinite(wav).all():
            reasons[i] = "nonfinite"
        elif wav.numel() < min_duration_s * sample_rate:
            reasons[i] = "too_short"
        elif wav.float().square().mean().sqrt().item() < silence_rms:
            reasons[i] = "silent"
        else:
            todo.append(i)
    out = ProsodyStats.empty(n)
    out.reasons = reasons
    clamped = [wavs[i].clamp(-1.0, 1.0) for i in todo]
    found = track_pitch(clamped, sample_rate, min_strength=min_strength, voicing_db=voicing_db) if todo else []
    for i, track in zip(todo, found):
        if not track.f0.numel():  # shorter than the tracker's window (only with min_duration_s below 0.05 s)
            reasons[i] = "too_short"
            continue
        out.tracks[i] = track
        for name, value in _measure(track, texts[i], voicing_db, min_pause_s, min_voiced_frames).items():
            out.values[name][i] = value
        if math.isnan(out.values["f0_std_st"][i]):
            reasons[i] = "unvoiced"
    return out


def group_spread(values: torch.Tensor, groups: Sequence[int | None]) -> torch.Tensor:
    """values: (N,) with NaN = not measured, groups: N ids -> (N,) each sample's group std (unbiased) over the
    group's measured members; NaN where the group has fewer than two measured members or no id."""
    out = torch.full_like(values, math.nan)
    ids = [g for g in dict.fromkeys(groups) if g is not None]
    for g in ids:
        idx = torch.tensor([i for i, x in enumerate(groups) if x == g])
        x = values[idx]
        x = x[torch.isfinite(x)]
        if x.numel() >= 2:
            out[idx] = x.std()
    return out


def prosody_metrics(stats: ProsodyStats, prefix: str = "prosody/") -> dict[str, torch.Tensor]:
    """RewardResult metrics: each statistic and one 0/1 indicator per reason (`reason_<r>`, so its logged mean is
    the share of samples with that reason; NaN for samples not looked at)."""
    out = {prefix + name: value.float() for name, value in stats.values.items()}
    for reason in REASONS:
        flags = [math.nan if r is None else float(r == reason) for r in stats.reasons]
        out[prefix + "reason_" + reason] = torch.tensor(flags)
    return out


def add_group_spreads(metrics: dict[str, torch.Tensor], group_size: int) -> None:
    """Add `<key>_group_std` beside every prosody statistic in `metrics` (under any component prefix, e.g.
    `whisper/prosody/f0_std_st`), for rows in group order (row // group_size = prompt). The rollout calls it,
    not the reward: behind a reward owner or a server the reward never sees which samples share a prompt."""
    for key in [k for k in metrics if any(k == f"prosody/{s}" or k.endswith(f"/prosody/{s}") for s in STATS)]:
        n = metrics[key].shape[0]
        metrics[key + "_group_std"] = group_spread(metrics[key].float().cpu(), [i // group_size for i in range(n)])
