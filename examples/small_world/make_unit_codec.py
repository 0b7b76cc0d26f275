"""Regenerate the unit codec's data file with espeak-ng and sox.

    python examples/small_world/make_unit_codec.py                   # writes examples/small_world/units_en.npz
    python examples/small_world/make_unit_codec.py --world prosody   # every word at 3 pitches x 2 rates

Each word of `small_world.unit_codec.WORDS` is spoken alone by espeak-ng (voice en-us,
150 words/min), resampled to 16 kHz by sox, its leading/trailing silence trimmed, and stored as
int16 (`--world prosody`: each word at every pitch `-p` and rate `-s` of small_world.prosody_world).
The non-speech units (silence, noise, hum) are generated in numpy with a fixed seed.
espeak-ng output differs slightly between versions; the file records the version it was made with.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `small_world` importable from any directory
from small_world.unit_codec import DEFAULT_UNITS_PATH, JUNK_UNITS, SAMPLE_RATE, WORDS  # noqa: E402


def speak(word: str, workdir: Path, voice: str, speed: int, pitch: int = 50) -> np.ndarray:
    """`word` spoken alone by espeak-ng (`-s speed` words/min, `-p pitch` 0..99, 50 its default), 16 kHz int16, trimmed."""
    raw, wav = workdir / "raw.wav", workdir / "out.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), word], check=True)
    # Trim: drop leading silence, reverse, drop leading (= trailing) silence, reverse back.
    subprocess.run(
        ["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(wav),
         "silence", "1", "0.01", "0.5%", "reverse", "silence", "1", "0.01", "0.5%", "reverse"],
        check=True,
    )
    data = wav.read_bytes()
    # A canonical 44-byte PCM header from sox; find the 'data' chunk to be safe.
    at = data.index(b"data") + 8
    return np.frombuffer(data[at:], dtype="<i2").copy()


def junk(name: str, rng: np.random.Generator) -> np.ndarray:
    n = int(0.25 * SAMPLE_RATE)
    if name == "<sil>":
        return np.zeros(n, dtype=np.int16)
    if name == "<noise>":
        return (rng.standard_normal(n) * 0.1 * 32767).clip(-32767, 32767).astype(np.int16)
    if name == "<hum>":
        t = np.arange(n) / SAMPLE_RATE
        return (0.2 * 32767 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    raise ValueError(f"unknown junk unit {name!r}")


def record(out: Path, units: list[tuple[str, str, int, int]], voice: str, note: str = "") -> None:
    """Write the codec file `out`: `units` are (name, word, speed, pitch) spoken by espeak-ng, then the junk units."""
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    rng = np.random.default_rng(0)
    waves = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, word, speed, pitch in units:
            waves.append(speak(word, Path(tmp), voice, speed, pitch))
    waves += [junk(name, rng) for name in JUNK_UNITS]
    names = [name for name, *_ in units] + list(JUNK_UNITS)
    lengths = np.array([len(w) for w in waves], dtype=np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, names=np.array(names), audio=np.concatenate(waves), lengths=lengths,
        sample_rate=np.array(SAMPLE_RATE), source=np.array(f"{version}; voice {voice}; {note}"),
    )
    print(f"wrote {out}: {len(names)} units, {lengths.sum() / SAMPLE_RATE:.1f} s, {out.stat().st_size} bytes")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=("words", "prosody"), default="words",
                   help="words: one recording per word (units_en.npz); prosody: every word at each pitch x rate "
                        "of small_world.prosody_world (its cache file)")
    p.add_argument("--out", type=Path, help="default: units_en.npz, or the prosody world's cache file")
    p.add_argument("--voice", default="en-us")
    p.add_argument("--speed", type=int, default=150, help="words/min of the words world")
    args = p.parse_args(argv)
    if args.world == "words":
        record(args.out or DEFAULT_UNITS_PATH, [(w, w, args.speed, 50) for w in WORDS], args.voice, f"speed {args.speed}")
    else:
        from small_world.prosody_world import PITCHES, RATES, default_units_path, recordings

        note = f"pitches {list(PITCHES.values())}; speeds {list(RATES.values())}"
        record(args.out or default_units_path(), recordings(), args.voice, note)


if __name__ == "__main__":
    main()
