"""Peak memory and time of resampling a long reference to 16 kHz: one gather of every window versus blocks.

Variants, each in a fresh subprocess (common.run_worker), on a random waveform of `--seconds` at `--rate`:

    gather-all   the windowed-sinc resampler that gathers the (n_out / up, 2W+1) windows of each output
                 phase at once (reward/audio.py before blocks; kept here, verbatim, as the baseline)
    blocks       reward/audio.resample: the same filter over blocks of 16,384 outputs
    load_wav     reward/audio.load_wav of the same clip written to a float WAV by the parent: refused by
                 the duration cap (MAX_REFERENCE_SECONDS) from the header, before any sample is read

Memory is the growth of the resident set over the worker's baseline after its input exists (VmHWM minus
the RSS before the call); the output (n_out floats) is included. The two resamplers' outputs are compared
(max absolute difference) on the long clip and on 3.3 s clips at 8, 22.05, 24, 44.1 and 48 kHz.

    python benchmarks/bench_resample_memory.py            # 10 minutes at 48 kHz (gather-all peaks near 4 GB)
    python benchmarks/bench_resample_memory.py --smoke    # 20 s
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import current_rss_mib, emit, machine_info, markdown_table, peak_rss_mib, run_worker  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_grpo.reward import audio  # noqa: E402


def gather_all(wav: torch.Tensor, orig_sr: int, target_sr: int, zeros: int = 16, rolloff: float = 0.95) -> torch.Tensor:
    """The baseline: every window of an output phase gathered at once."""
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    cutoff = rolloff * min(1.0, up / down)
    width = math.ceil(zeros / cutoff)
    phase = torch.arange(up, dtype=torch.float64)[:, None] * down / up
    base = torch.floor(phase)
    taps = torch.arange(-width, width + 1, dtype=torch.float64)[None, :]
    t = taps - (phase - base)
    window = torch.where(t.abs() <= width, torch.cos(t * math.pi / width / 2).square(), torch.zeros_like(t))
    kernel = (cutoff * torch.sinc(cutoff * t) * window).to(wav.dtype)
    n_out = math.ceil(wav.numel() * up / down)
    padded = F.pad(wav[None, None], (width, width + down + 1))[0, 0]
    windows = padded.unfold(0, 2 * width + 1, 1)
    out = torch.empty(n_out, dtype=wav.dtype)
    j = torch.arange(n_out)
    for p in range(up):
        js = j[p::up]
        if js.numel() == 0:
            continue
        starts = (js // up) * down + int(base[p, 0])
        out[js] = windows[starts] @ kernel[p]
    return out


def clip(seconds: float, rate: int) -> torch.Tensor:
    return torch.randn(int(seconds * rate), generator=torch.Generator().manual_seed(0))


def worker(variant: str, seconds: float, rate: int, out_file: str) -> None:
    result = {"variant": variant}
    if variant == "load_wav":  # the parent wrote the clip to `out_file`
        before = current_rss_mib()
        t0 = time.perf_counter()
        try:
            audio.load_wav(out_file, 16_000)
            result["outcome"] = "read"
        except ValueError as e:
            result["outcome"] = "refused: " + str(e).split("is ", 1)[1].split(";")[0]
        result["seconds"] = time.perf_counter() - t0
    else:
        wav = clip(seconds, rate)
        fn = gather_all if variant == "gather-all" else audio.resample
        before = current_rss_mib()
        t0 = time.perf_counter()
        out = fn(wav, rate, 16_000)
        result["seconds"] = time.perf_counter() - t0
        torch.save(out, out_file)
    result["peak_growth_mib"] = peak_rss_mib() - before
    emit(result)


def agreement(seconds: float, rate: int, outs: dict[str, str]) -> dict[str, float]:
    diffs = {}
    a, b = torch.load(outs["gather-all"]), torch.load(outs["blocks"])
    diffs[f"{seconds:g} s at {rate} Hz"] = (a - b).abs().max().item()
    g = torch.Generator().manual_seed(1)
    for sr in (8_000, 22_050, 24_000, 44_100, 48_000):
        x = torch.randn(int(3.3 * sr), generator=g)
        diffs[f"3.3 s at {sr} Hz"] = (gather_all(x, sr, 16_000) - audio.resample(x, sr, 16_000)).abs().max().item()
    return diffs


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--rate", type=int, default=48_000)
    p.add_argument("--smoke", action="store_true", help="20 s instead of --seconds")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    seconds = 20.0 if args.smoke else args.seconds
    if args.worker:
        worker(args.worker, seconds, args.rate, args.out)
        return ""
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        outs = {v: str(Path(tmp) / f"{v}.pt") for v in ("gather-all", "blocks")}
        outs["load_wav"] = str(Path(tmp) / "clip.wav")
        import soundfile as sf

        sf.write(outs["load_wav"], (0.1 * clip(seconds, args.rate)).numpy(), args.rate, subtype="FLOAT")
        results = [run_worker(__file__, ["--worker", v, "--seconds", str(seconds), "--rate", str(args.rate), "--out", outs[v]], threads=1)
                   for v in outs]
        diffs = agreement(seconds, args.rate, outs)
    rows = [[r["variant"], r["peak_growth_mib"], r["seconds"], r.get("outcome", "resampled")] for r in results]
    table = markdown_table(["variant", "peak RSS growth (MiB)", "time (s)", "outcome"], rows)
    table += "\n\n" + markdown_table(["clip", "max abs difference, gather-all vs blocks"], [[k, v] for k, v in diffs.items()])
    header = f"{seconds:g} s at {args.rate} Hz -> 16 kHz, 1 thread; {info['cpu']}, torch {info['torch']}, {info['date_utc']}"
    text = header + "\n\n" + table
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results, "agreement": diffs}, indent=1))
    return text


if __name__ == "__main__":
    main()
