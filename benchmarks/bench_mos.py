"""Which MOS model the naturalness reward uses: rank agreement on degraded espeak-ng speech, and cost.

Candidates whose weights ship inside PyPI packages: DNSMOS (speechmos 0.0.1.1's ONNX files; P.835 OVRL / SIG /
BAK from `sig_bak_ovr.onnx` and P.808 from `model_v8.onnx`, run as speechmos runs them) and DistillMOS
(distillmos 0.9.1, a 16 MB torch model distilled from XLS-R SQA). Each of 4 espeak-ng sentences is rendered as

    clean > band-limited (sox sinc 300-3400 Hz, telephone) > noisy (white noise, 5 dB SNR) >
    clipped (gain x30, clamped to [-1, 1]) > monotone (SSML prosody range x-low, robotic)

and the score's Kendall tau against that order is averaged over the sentences (1 = the expected order every
time). "contour" is the share of sentences where the natural rendering (espeak-ng's default contour) outscores
the monotone one and the wide-range one (`range="x-high"`) outscores the monotone one (pairs won / pairs).
Cost: CPU seconds per second of audio, 1 torch / onnxruntime thread.

    python benchmarks/bench_mos.py            # ~2 min on one core; prints a markdown section
Optional packages (benchmark only): pip install speechmos==0.0.1.1 librosa==0.11.0 distillmos==0.9.1 xls-r-sqa==0.1.0
(distillmos imports torchaudio only to read files; it is stubbed here).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reward_fixtures import SENTENCES, espeak, espeak_ng  # noqa: E402

SR = 16_000
ORDER = ("clean", "band-limited", "noisy", "clipped", "monotone")


def sox(wav: np.ndarray, *effect: str) -> np.ndarray:
    buf = io.BytesIO()
    sf.write(buf, wav, SR, format="WAV", subtype="FLOAT")
    out = subprocess.run(["sox", "-t", "wav", "-", "-t", "wav", "-e", "floating-point", "-", *effect],
                         input=buf.getvalue(), check=True, capture_output=True).stdout
    return sf.read(io.BytesIO(out), dtype="float32")[0]


def renderings(text: str, seed: int) -> dict[str, np.ndarray]:
    clean = espeak(text).numpy()
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(clean.size).astype(np.float32) * np.sqrt(np.mean(clean**2) / 10 ** 0.5)
    ssml = lambda level: espeak_ng(f'<speak><prosody range="{level}">{text}</prosody></speak>', extra=("-m",)).numpy()
    return {
        "clean": clean,
        "band-limited": sox(clean, "sinc", "300-3400"),
        "noisy": np.clip(clean + noise, -1, 1),
        "clipped": np.clip(30 * clean, -1, 1),
        "monotone": ssml("x-low"),
        "wide": ssml("x-high"),
    }


def dnsmos(key: str):
    from speechmos import dnsmos as d

    def run(wavs):
        return [float(d.run(w, SR)[key]) for w in wavs]
    return run


def distill():
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    import distillmos

    model = distillmos.ConvTransformerSQAModel().eval()

    def run(wavs):
        with torch.inference_mode():
            return [float(model(torch.from_numpy(w)[None])[0]) for w in wavs]
    return run


def kendall(scores: list[float]) -> float:
    """Kendall tau of `scores` against the order they are listed in (first = best)."""
    n, s = len(scores), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += np.sign(scores[i] - scores[j])
    return s / (n * (n - 1) / 2)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sets = [renderings(t, i) for i, t in enumerate(SENTENCES)]
    models = {"DNSMOS P.835 OVRL": lambda: dnsmos("ovrl_mos"), "DNSMOS P.835 SIG": lambda: dnsmos("sig_mos"),
              "DNSMOS P.808": lambda: dnsmos("p808_mos"), "DistillMOS": distill}
    lines = ["## Naturalness: MOS models on degraded espeak-ng speech", "",
             "`python benchmarks/bench_mos.py`; 4 espeak-ng sentences, 1 thread, shared 2-core CPU (benchmark "
             "docstring). Mean score per rendering; tau: Kendall tau against clean > band-limited > noisy > clipped "
             "> monotone, averaged over sentences (and over the first four only); contour: pairs won by natural over monotone and wide over "
             "monotone.", "",
             "| model | " + " | ".join(ORDER) + " | wide range | tau | tau without monotone | contour | CPU s per audio s |",
             "|---" * (len(ORDER) + 6) + "|"]
    for name, build in models.items():
        try:
            run = build()
        except ImportError as err:
            print(f"skipping {name}: {err}", file=sys.stderr)
            continue
        run([sets[0]["clean"]])  # warm-up (session / weights)
        t0, audio_s = time.process_time(), 0.0
        table = []
        for r in sets:
            table.append(dict(zip(r, run(list(r.values())))))
            audio_s += sum(w.size for w in r.values()) / SR
        cost = (time.process_time() - t0) / audio_s
        taus = [kendall([row[k] for k in ORDER]) for row in table]
        taus_signal = [kendall([row[k] for k in ORDER[:4]]) for row in table]
        contour = [row["clean"] > row["monotone"] for row in table] + [row["wide"] > row["monotone"] for row in table]
        means = [np.mean([row[k] for row in table]) for k in (*ORDER, "wide")]
        lines.append(f"| {name} | " + " | ".join(f"{m:.2f}" for m in means)
                     + f" | {np.mean(taus):.2f} | {np.mean(taus_signal):.2f} | {sum(contour)}/{len(contour)} | {cost:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
