"""Multi-reward cost: speaker-similarity throughput, and what SIM + duration add to a Whisper reward call.

Part 1, SIM throughput: the GE2E encoder (resemblyzer's weights, lightning_grpo.reward.speaker_encoder) on N
espeak-ng clips (2-4 s, four voices) and their N references: all 2N waveforms in one `embed` call (every 1.6 s
partial through the LSTM as one batch) versus one waveform per call; then the whole SpeakerSimilarityReward, batched
versus one sample per `score` call (reference cache emptied before each mode).

Part 2, added cost: one `score` of N = 16 samples (2 prompts x G = 8) by WhisperReward (tiny.en) alone versus by
CompositeReward {whisper, sim, duration} (normalize_then_sum, the shipped config's weights), same process, same
inputs. The codec runs the real-size X-codec2 decoder (random weights) on codes of the right length, so its cost is
real, and hands Whisper and SIM the espeak audio (bench_reward.py's TimedCodec). The composite shares that codec:
SIM decodes no generated sample again. Its references (2, one per prompt) come three ways: recordings
(prompt_wav, read and embedded), codes (prompt_codes, decoded by the real-size codec and embedded), and cached
(the same references a second time: no work). Modes alternate, `--repeats` rounds, medians reported.

    python benchmarks/bench_multireward.py            # prints a markdown section (BENCHMARKS.md, "Multi-reward")
    python benchmarks/bench_multireward.py --smoke    # seconds: tiny sizes, checks the script runs
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT)]
from bench_reward import SENTENCES, TimedCodec  # noqa: E402
from common import machine_info, markdown_table  # noqa: E402
from reward_fixtures import SENTENCES as REFERENCE_SENTENCES  # noqa: E402  (none of them is a generated one)
from reward_fixtures import StoredAudioDecoder, espeak  # noqa: E402

from lightning_grpo.llasa import XCODEC2_CODEBOOK_SIZE  # noqa: E402
from lightning_grpo.reward import SpeechSample  # noqa: E402
from lightning_grpo.reward.codec import XCodec2Decoder  # noqa: E402
from lightning_grpo.reward.composite import CompositeReward  # noqa: E402
from lightning_grpo.reward.duration import DurationReward  # noqa: E402
from lightning_grpo.reward.whisper import WhisperReward  # noqa: E402
from lightning_grpo.reward.speaker import SpeakerSimilarityReward  # noqa: E402
from lightning_grpo.reward.speaker_encoder import GE2EEncoder  # noqa: E402

VOICES = ("en-us", "en-us+f3", "en-us+klatt2", "en-us+m3")
WEIGHTS = {"whisper": 1.0, "sim": 0.5, "duration": 0.25}  # configs/llasa1b_multireward.yaml


def timed(fn) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def sim_throughput(n: int, repeats: int) -> list[list]:
    encoder = GE2EEncoder()
    gens = [espeak(SENTENCES[i % len(SENTENCES)], VOICES[i % len(VOICES)]) for i in range(n)]
    refs = [espeak(REFERENCE_SENTENCES[i % len(REFERENCE_SENTENCES)], VOICES[i % len(VOICES)]) for i in range(n)]
    wavs = gens + refs
    stored = StoredAudioDecoder()
    samples = [SpeechSample("x", stored.add(g), prompt_text="r", prompt_codes=stored.add(r)) for g, r in zip(gens, refs)]
    reward = SpeakerSimilarityReward(encoder=encoder, codec=stored)
    encoder.embed(wavs[:2])  # warm-up

    def score_batched():
        reward._references.clear()
        reward.score(samples)

    def score_one_by_one():
        reward._references.clear()
        for s in samples:
            reward.score([s])

    modes = {
        f"GE2E embed, {2 * n} waveforms in one call": (lambda: encoder.embed(wavs), 2 * n),
        "GE2E embed, one waveform per call": (lambda: [encoder.embed([w]) for w in wavs], 2 * n),
        f"SpeakerSimilarityReward, {n} samples in one call": (score_batched, n),
        "SpeakerSimilarityReward, one sample per call": (score_one_by_one, n),
    }
    runs = {name: [timed(fn) for _ in range(repeats)] for name, (fn, _) in modes.items()}
    seconds = sum(w.numel() for w in wavs) / 16_000
    rows = []
    for name, (_, count) in modes.items():
        wall = statistics.median(w for w, _ in runs[name])
        cpu = statistics.median(c for _, c in runs[name])
        rows.append([name, count / wall, wall, cpu])
    return rows, seconds


class StageTimedComposite(CompositeReward):
    """CompositeReward that also records each component's CPU seconds (process time) per call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cpu: dict[str, float] = {}

    def _score_component(self, name, samples):
        start = time.process_time()
        try:
            return super()._score_component(name, samples)
        finally:
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - start


def build_cost_inputs(n: int, smoke: bool, workdir: Path):
    rng = random.Random(0)
    torch.manual_seed(0)
    size = dict(hidden_dim=64, depth=2, heads=4) if smoke else {}
    stored, real_codes = StoredAudioDecoder(), {}

    def add(audio: torch.Tensor) -> list[int]:
        codes = stored.add(audio)
        real_codes[tuple(codes)] = [rng.randrange(XCODEC2_CODEBOOK_SIZE) for _ in codes]
        return codes

    group = max(1, n // 2)
    variants = {"wav": [], "codes": []}
    refs = []
    for p in range((n + group - 1) // group):
        voice = VOICES[p % len(VOICES)]
        ref_text = REFERENCE_SENTENCES[p % len(REFERENCE_SENTENCES)]
        ref_audio = espeak(ref_text, voice)
        path = workdir / f"ref{p}.wav"
        sf.write(path, ref_audio.numpy(), 16_000)
        refs.append((ref_text, add(ref_audio), str(path)))
    for i in range(n):
        p = i // group
        text = SENTENCES[i % len(SENTENCES)]
        codes = add(espeak(text, VOICES[p % len(VOICES)]))
        ref_text, ref_codes, ref_wav = refs[p]
        variants["wav"].append(SpeechSample(text, codes, language="en", prompt_wav=ref_wav, group=p))
        variants["codes"].append(SpeechSample(text, codes, language="en", prompt_text=ref_text, prompt_codes=ref_codes, group=p))
    codec = TimedCodec(XCodec2Decoder(None, **size), stored, real_codes)
    return codec, variants


def added_cost(n: int, smoke: bool, whisper_model: str, repeats: int) -> tuple[list[list], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        codec, variants = build_cost_inputs(n, smoke, Path(tmp))
        whisper = WhisperReward(whisper_model, codec=codec, batch_size=n)
        sim = SpeakerSimilarityReward()
        composite = StageTimedComposite({"whisper": whisper, "sim": sim, "duration": DurationReward()}, weights=WEIGHTS,
                                        aggregation="normalize_then_sum")
        # composite.codec now wraps `codec` for both; Whisper alone below decodes through the same wrapper, uncached
        if not smoke:
            composite.score(variants["codes"])  # warm-up of every stage
            whisper.score(variants["codes"])

        def cold(key):
            def run():
                sim._references.clear()
                composite.score(variants[key])
            return run

        modes = {
            "WhisperReward alone": lambda: whisper.score(variants["codes"]),
            "composite, references as recordings (prompt_wav)": cold("wav"),
            "composite, references as codes (decoded)": cold("codes"),
            "composite, references cached": lambda: composite.score(variants["codes"]),
        }
        runs = {name: [] for name in modes}
        stages = {name: [] for name in modes}
        for _ in range(repeats):  # alternate the modes so machine load hits them alike
            for name, fn in modes.items():
                composite.cpu.clear()
                runs[name].append(timed(fn))
                stages[name].append(dict(composite.cpu))
        base_cpu = statistics.median(c for _, c in runs["WhisperReward alone"])
        rows = []
        for name in modes:
            wall = statistics.median(w for w, _ in runs[name])
            cpu = statistics.median(c for _, c in runs[name])
            if name == "WhisperReward alone":
                rows.append([name, wall, cpu, "-", cpu, "-", "-", "-"])
                continue
            med = {k: statistics.median(st[k] for st in stages[name]) for k in ("whisper", "sim", "duration")}
            rows.append([name, wall, cpu, f"{cpu / base_cpu - 1:+.1%}", med["whisper"], med["sim"], med["duration"],
                         f"{(med['sim'] + med['duration']) / med['whisper']:.1%}"])
        out = composite.score(variants["codes"])
        return rows, {"sim": out.metrics["sim"].tolist(), "reasons": out.reasons}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (2 threads on a loaded 2-core machine spin and mislead)")
    p.add_argument("--whisper", default="tiny.en-ct2")
    p.add_argument("--smoke", action="store_true", help="2 samples, small codec, one round")
    p.add_argument("--out", type=Path, help="also write the markdown section here")
    args = p.parse_args(argv)
    if args.smoke:
        args.samples, args.repeats = 2, 1
    torch.set_num_threads(args.threads)
    info = machine_info()
    sim_rows, seconds = sim_throughput(args.samples, args.repeats)
    cost_rows, check = added_cost(args.samples, args.smoke, args.whisper, args.repeats)
    by_name = {r[0]: r for r in sim_rows}
    names = list(by_name)
    text = "\n".join([
        "## Multi-reward cost: SIM throughput, SIM + duration beside Whisper",
        "",
        f"`python benchmarks/bench_multireward.py{' --smoke' if args.smoke else ''}` — {args.samples} samples, "
        f"{args.threads} torch threads, median of {args.repeats} alternating round(s). Machine: {info['cpu']}, "
        f"{info['logical_cpus']} logical CPUs (load avg {info['load_avg_1m']}), torch {info['torch']}, {info['date_utc']}.",
        "",
        f"SIM throughput ({2 * args.samples} espeak-ng waveforms, {seconds:.1f} s of speech in all):",
        "",
        markdown_table(["mode", "items/s", "wall s", "CPU s"], sim_rows),
        "",
        f"Batched vs one per call, wall / CPU time: embed **{by_name[names[1]][2] / by_name[names[0]][2]:.2f}x** / "
        f"{by_name[names[1]][3] / by_name[names[0]][3]:.2f}x, reward **{by_name[names[3]][2] / by_name[names[2]][2]:.2f}x** / "
        f"{by_name[names[3]][3] / by_name[names[2]][3]:.2f}x.",
        "",
        f"Added cost to one reward call of {args.samples} samples (Whisper `{args.whisper}`, "
        f"{'small' if args.smoke else 'real-size'} X-codec2 decode; goal: SIM + duration add <= 15% at batch 16):",
        "",
        markdown_table(["reward call", "wall s", "CPU s", "CPU vs Whisper alone", "Whisper stage CPU s", "SIM CPU s",
                        "duration CPU s", "(SIM + duration) / Whisper stage"], cost_rows),
        "",
        f"SIM of the composite's samples: {', '.join(f'{x:.3f}' for x in check['sim'])}; reasons {sorted(set(check['reasons']))}.",
        "",
    ])
    print(text)
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
