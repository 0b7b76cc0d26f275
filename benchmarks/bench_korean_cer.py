"""What scoring Korean numbers against their best reading costs per sample.

`cer(ref, hyp, "ko")` fills each number that has several readings (`korean_readings`) with the one that matches
best, one number at a time (`best_reading_cer`). Compared here with the usual-reading-only CER it replaces
(`jiwer.cer(normalize(ref), normalize(hyp))`), on four kinds of (reference, transcript) pairs:
    no_numbers    held-out style sentences without digits: the search has nothing to try
    usual         one number read the usual way (5번 봤다 / 다섯 번 봤다): the first evaluation is already 0
    other         one number read the other way (5번 봤다 / 오 번 봤다): one extra evaluation
    many          40 numbers with two readings each, transcript in the other reading: the cap (KO_MAX_CHOICES)
Per-sample time is the median of 7 runs of 200 calls; one process, one thread.

    python benchmarks/bench_korean_cer.py [--out FILE.md] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jiwer

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
from common import machine_info, markdown_table  # noqa: E402

from lightning_grpo.reward.text import KO_MAX_CHOICES, cer, normalize, sino_korean  # noqa: E402

MANY = " ".join(f"{i}번" for i in range(1, 41))
CASES = {
    "no_numbers": [
        ("오늘 아침 기차가 늦었어요.", "오늘 아침 기차가 늦었어요"),
        ("안녕하세요, 만나서 반갑습니다.", "안녕하세요 만나서 반갑습니다"),
        ("내일은 비가 올 것 같아요.", "내일은 비가 올 거 같아요"),
    ],
    "usual": [
        ("그 영화를 5번 봤다", "그 영화를 다섯 번 봤다"),
        ("차 2대가 서 있어요", "차 두 대가 서 있어요"),
        ("책 3권을 샀어요", "책 세 권을 샀어요"),
    ],
    "other": [
        ("그 영화를 5번 봤다", "그 영화를 오 번 봤다"),
        ("305호로 오세요", "삼공오 호로 오세요"),
        ("전화번호는 010-1234-5678입니다", "전화번호는 영일영 일이삼사 오육칠팔입니다"),
    ],
    "many": [(MANY, " ".join(f"{sino_korean(i)} 번" for i in range(1, 41)))],
}


def usual_reading_cer(ref: str, hyp: str) -> float:
    """The CER with every number at its usual reading (the cost before readings were searched)."""
    r, h = normalize(ref, "ko"), normalize(hyp, "ko", hypothesis=True)
    return float(jiwer.cer(r, h)) if h else 1.0


def per_sample_us(fn, pairs, calls: int = 200, repeats: int = 7) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(*pairs[i % len(pairs)])
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown section here")
    parser.add_argument("--smoke", action="store_true", help="one run of a few calls: seconds")
    args = parser.parse_args()
    calls, repeats = (3, 1) if args.smoke else (200, 7)
    import torch

    torch.set_num_threads(1)
    rows = []
    for name, pairs in CASES.items():
        best = lambda r, h: cer(r, h, "ko")  # noqa: E731
        before, after = (per_sample_us(f, pairs, calls, repeats) for f in (usual_reading_cer, best))
        mean_cer = lambda f: statistics.mean(f(r, h) for r, h in pairs)  # noqa: E731
        rows.append([name, len(pairs), round(before, 1), round(after, 1), round(after / before, 2),
                     round(mean_cer(usual_reading_cer), 3), round(mean_cer(best), 3)])
    info = machine_info()
    text = "\n".join([
        f"{info['cpu']}, {info['logical_cpus']} logical CPUs (load {info['load_avg_1m']}), Python {info['python']}, "
        f"1 thread, {info['date_utc']}; KO_MAX_CHOICES = {KO_MAX_CHOICES}",
        "",
        markdown_table(["pairs", "n", "usual reading (µs/sample)", "best reading (µs/sample)", "ratio",
                        "CER usual", "CER best"], rows),
    ])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
