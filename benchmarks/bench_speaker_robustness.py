"""Speaker similarity (GE2E) outside clean audio: silence trimming over a noise floor, and short references.

    noise   espeak-ng sentences (4 voices x 4 sentences), padded with 0.5 s of silence before and 0.75 s after,
            with white noise at -60 / -50 / -45 dBFS (RMS, full scale 1.0). Each clip embedded by three
            pipelines: resemblyzer's own (preprocess_wav with webrtcvad + VoiceEncoder), ours with
            vad="energy" (windows within 40 dB of the loudest), ours with vad="webrtc". Reported per pipeline:
            mean / max SIM between different voices, mean SIM within a voice (other sentence), their gap, and
            the largest difference of any pairwise SIM from resemblyzer's.
    length  same-voice vs other-voice SIM as the reference gets shorter: the generated clip is a full sentence
            in voice A; the reference is the first L seconds of another sentence, in A or in another voice
            (3 voices that GE2E tells apart at full length x 4 sentences).
            Reported per L: mean same-voice and other-voice SIM, the worst margin (same minus the highest other
            voice at the same L), and how many same-voice references at L score below a full-length other
            voice. Sets SpeakerSimilarityReward's min_reference_seconds.

    cost    seconds to embed the 16 noisy (-45 dBFS) clips of `noise` with each detector (median of 5 runs).

`noise` needs resemblyzer with its dependencies (requirements-bench.txt: librosa, webrtcvad-wheels), e.g. in a
throwaway venv that also sees the project's packages (see benchmarks/check_ge2e_fidelity.py); `length` runs in
the project's venv.

    python benchmarks/bench_speaker_robustness.py noise|length|cost [--smoke]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT)]
from common import machine_info, markdown_table  # noqa: E402
from reward_fixtures import SENTENCES, espeak  # noqa: E402

from lightning_grpo.reward.speaker_encoder import GE2EEncoder  # noqa: E402

VOICES = ("en-us", "en-us+f3", "en-us+klatt2", "en-gb+m3")
FLOORS_DBFS = (-60.0, -50.0, -45.0)
LENGTHS_S = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, None)  # None: the whole sentence


def pair_stats(emb: dict, keys: list) -> dict[str, float]:
    diff = [float(emb[a] @ emb[b]) for a, b in itertools.combinations(keys, 2) if a[0] != b[0]]
    same = [float(emb[a] @ emb[b]) for a, b in itertools.combinations(keys, 2) if a[0] == b[0]]
    return {"diff_mean": statistics.mean(diff), "diff_max": max(diff), "same_mean": statistics.mean(same),
            "gap": statistics.mean(same) - statistics.mean(diff)}


def noise(smoke: bool) -> str:
    try:
        from resemblyzer import VoiceEncoder, preprocess_wav
    except ImportError as err:
        sys.exit(f"the noise part needs resemblyzer with librosa and webrtcvad ({err}); see the docstring")
    voices, sentences = (VOICES[:2], SENTENCES[:2]) if smoke else (VOICES, SENTENCES)
    keys = [(v, s) for v in voices for s in sentences]
    theirs = VoiceEncoder(device="cpu", verbose=False)
    ours = {vad: GE2EEncoder(vad=vad) for vad in ("energy", "webrtc")}
    rows = []
    for floor in FLOORS_DBFS:
        rng = np.random.default_rng(0)
        clips = {}
        for k in keys:
            speech = espeak(k[1], k[0]).numpy()
            wav = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(12000, np.float32)])
            clips[k] = (wav + 10 ** (floor / 20) * rng.standard_normal(wav.size)).astype(np.float32)
        emb = {"resemblyzer": {k: theirs.embed_utterance(preprocess_wav(clips[k])) for k in keys}}
        for vad, enc in ours.items():
            out = enc.embed([torch.from_numpy(clips[k]) for k in keys]).numpy()
            emb[f"ours, vad={vad}"] = dict(zip(keys, out))
        ref = emb["resemblyzer"]
        for name, e in emb.items():
            st = pair_stats(e, keys)
            dev = max(abs(float(e[a] @ e[b]) - float(ref[a] @ ref[b])) for a, b in itertools.combinations(keys, 2))
            rows.append([f"{floor:.0f}", name, round(st["diff_mean"], 3), round(st["diff_max"], 3),
                         round(st["same_mean"], 3), round(st["gap"], 3), f"{dev:.1e}"])
    return markdown_table(["noise floor (dBFS)", "pipeline", "other voice: mean SIM", "other voice: max SIM",
                           "same voice: mean SIM", "gap (same - other)", "max abs SIM diff vs resemblyzer"], rows)


def length(smoke: bool) -> str:
    # en-gb+m3 is left out: GE2E rates it as the same speaker as en-us even at full length
    voices, sentences = (VOICES[:2], SENTENCES[:2]) if smoke else (VOICES[:3], SENTENCES)
    lengths = (1.0, None) if smoke else LENGTHS_S
    encoder = GE2EEncoder()
    clips = {(v, s): espeak(s, v) for v in voices for s in sentences}
    generated = dict(zip(clips, encoder.embed(list(clips.values()))))
    refs = {}
    for L in lengths:
        cut = {k: w if L is None else w[: int(L * encoder.sample_rate)] for k, w in clips.items()}
        refs[L] = dict(zip(cut, encoder.embed(list(cut.values()))))
    rows = []
    for L in lengths:
        same, other, margins, below_full = [], [], [], 0
        for a, s1, s2 in itertools.product(voices, sentences, sentences):
            if s1 == s2:
                continue
            g = generated[a, s1]
            sim_same = float(g @ refs[L][a, s2])
            sims_other = [float(g @ refs[L][b, s2]) for b in voices if b != a]
            full_other = max(float(g @ refs[None][b, s2]) for b in voices if b != a)
            same.append(sim_same)
            other += sims_other
            margins.append(sim_same - max(sims_other))
            below_full += sim_same < full_other
        rows.append(["whole sentence" if L is None else f"{L:.2f}", len(margins), round(statistics.mean(same), 3),
                     round(statistics.mean(other), 3), round(min(margins), 3), f"{below_full}/{len(margins)}"])
    return markdown_table(["reference length (s)", "cases", "same voice: mean SIM", "other voices: mean SIM",
                           "worst margin (same - best other, same length)",
                           "same voice at this length below a whole-sentence other voice"], rows)


def cost(smoke: bool) -> str:
    voices, sentences = (VOICES[:2], SENTENCES[:2]) if smoke else (VOICES, SENTENCES)
    rng = np.random.default_rng(0)
    wavs = []
    for v, s in itertools.product(voices, sentences):
        speech = espeak(s, v).numpy()
        wav = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(12000, np.float32)])
        wavs.append(torch.from_numpy((wav + 10 ** (-45 / 20) * rng.standard_normal(wav.size)).astype(np.float32)))
    rows = []
    for vad in ("energy", "webrtc"):
        enc = GE2EEncoder(vad=vad)
        enc.embed(wavs[:1])
        runs = []
        for _ in range(1 if smoke else 5):
            t0 = time.perf_counter()
            enc.embed(wavs)
            runs.append(time.perf_counter() - t0)
        trim = []
        for _ in range(1 if smoke else 5):
            t0 = time.perf_counter()
            for w in wavs:
                enc.preprocess(w)
            trim.append(time.perf_counter() - t0)
        rows.append([vad, len(wavs), round(sum(w.numel() for w in wavs) / 16_000, 1), round(statistics.median(runs), 3),
                     round(statistics.median(trim) * 1000, 1)])
    return markdown_table(["vad", "clips", "audio (s)", "embed all (s)", "of which volume + trimming (ms)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("noise", "length", "cost"))
    parser.add_argument("--smoke", action="store_true", help="2 voices x 2 sentences: seconds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine_info()
    table = {"noise": noise, "length": length, "cost": cost}[args.part](args.smoke)
    print(f"{info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}, 1 thread, {info['date_utc']}\n")
    print(table)


if __name__ == "__main__":
    main()
