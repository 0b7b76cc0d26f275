"""`python -m lightning_grpo serve`: the HTTP scoring server's command (app.py: the app; batcher.py: its
micro-batcher; request.py: what a request may carry).

    python -m lightning_grpo serve --port 8001 --model large-v3 --device cuda:0 --codec HKUSTAudio/xcodec2
    python -m lightning_grpo serve --config serve.yaml --port 8002   # flags after --config override the file
    export WHISPER_SERVER=http://127.0.0.1:8001      # the client's default env var; matches --port 8001

A config file holds the flags' keys (`max_batch_size: 8`; `--print_config` writes one) and may give the reward
to serve inline, as a fit config's `rollout.reward` does:

    reward:
      class_path: lightning_grpo.reward.rule.RuleReward

Without `reward`, `--reward-config`, `--reward-factory` or `--fake-reward` it serves the Whisper reward of
--model / --device / --codec / --language / --dtype. The reward is built on the scoring thread once the server
listens: /healthz answers 503 "loading" meanwhile, and a reward that cannot be built stops the server with exit
code 1 and the reason.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ..llasa import XCODEC2_CODEBOOK_SIZE
from .app import DEFAULT_HOST, DEFAULT_PORT, ORIGINAL_NLL_CAP, RewardFactory, serve
from .base import Reward
from .request import DEFAULT_MAX_REFERENCE_SECONDS, DEFAULT_MAX_REQUEST_REFERENCE_SECONDS

log = logging.getLogger(__name__)

TOKEN_ENV = "WHISPER_SERVER_TOKEN"
REWARD_SOURCES = ("reward", "reward_config", "reward_factory", "fake_reward")


def _reward_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=Reward)
    return parser


def reward_from_config(path: str) -> Reward:
    """Build the reward of a YAML `{class_path: pkg.mod.Class, init_args: {...}}` file (nested class_paths too)."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"--reward-config {path}: needs 'class_path: package.module.Class' and optional 'init_args'")
    parser = _reward_parser()
    try:
        parsed = parser.parse_object({"reward": config})
    except Exception as e:
        raise ValueError(f"--reward-config {path}: {e}") from None
    return parser.instantiate(parsed).reward


def reward_from_factory_file(path: str) -> Reward:
    """Build the reward by calling the zero-argument callable pickled in `path` (see --reward-factory)."""
    import pickle

    with open(path, "rb") as f:
        factory = pickle.load(f)
    if not callable(factory):
        raise TypeError(f"--reward-factory {path} holds a {type(factory).__name__}, not a callable that builds a reward")
    return factory()


def build_whisper_reward(model: str, device: str, codec: str | None, language: str | None, batch_size: int,
                         dtype: str = "float32") -> Reward:
    """The Whisper reward module on `device`; imported here so the server imports without Whisper weights.

    language None keeps WhisperReward's default; "auto" detects the language per sample.
    """
    from .whisper import WhisperReward

    kwargs: dict[str, Any] = {"whisper_model": model, "device": device, "batch_size": batch_size, "dtype": dtype}
    if codec is not None:
        kwargs["codec"] = codec
    if language is not None:
        kwargs["language"] = None if language == "auto" else language
    return WhisperReward(**kwargs)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m lightning_grpo serve",
        description="Serve a reward over HTTP (POST /score, GET /healthz). Point trainers at it with "
        f"WHISPER_SERVER=http://127.0.0.1:{DEFAULT_PORT} (the default --host/--port).",
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these arguments (flags after it override it)")
    p.add_argument("--host", default=DEFAULT_HOST, help="interface to bind; 0.0.0.0 exposes the server (use --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port; WHISPER_SERVER=http://127.0.0.1:8001 matches the default")
    p.add_argument("--model", default="large-v3", help="Whisper model name openai-whisper accepts, or a checkpoint path")
    p.add_argument("--device", default="cuda:0", help="device of the codec and Whisper (cuda:N or cpu)")
    p.add_argument("--codec", type=Optional[str], default=None, help="X-codec2 checkpoint: HF id (HKUSTAudio/xcodec2) or local dir")
    p.add_argument("--dtype", type=Literal["float32", "float16", "bfloat16"], default="float32",
                   help="Whisper and codec precision; float16 halves memory and time on CUDA")
    p.add_argument("--language", type=Optional[str], default=None, help="language of the texts (en, ko, ...; 'auto' detects; default: WhisperReward's); a sample's 'language' overrides")
    p.add_argument("--token", type=Optional[str], default=None, help=f"bearer token required on /score (default: ${TOKEN_ENV}, else none)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most samples per reward call (1 = one at a time, as the original)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to share its batch")
    p.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies answer 413")
    p.add_argument("--max-batch-samples", type=int, default=256, help="most samples in one batched body (more: 413)")
    p.add_argument("--codebook-size", type=int, default=XCODEC2_CODEBOOK_SIZE, help="codes must be < this (X-codec2: 65536)")
    p.add_argument("--original-nll-cap", type=float, default=ORIGINAL_NLL_CAP,
                   help="'nll' of the original single-sample body: measured values capped here, unmeasured ones answer it")
    p.add_argument("--log-level", type=Literal["critical", "error", "warning", "info", "debug"], default="info")
    p.add_argument("--reference-dir", type=Optional[str], default=None,
                   help="directory whose recordings a sample's prompt_wav may name (default: none; clients send "
                   "prompt_audio or prompt_codes); no path outside it is opened, symlinks and '..' included")
    p.add_argument("--max-reference-seconds", type=float, default=DEFAULT_MAX_REFERENCE_SECONDS,
                   help="longest reference clip of one sample (codes, prompt_audio or prompt_wav); longer: 413")
    p.add_argument("--max-request-reference-seconds", type=float, default=DEFAULT_MAX_REQUEST_REFERENCE_SECONDS,
                   help="the distinct reference clips of one body together; more: 413")
    p.add_argument("--allow-empty-tokens", action="store_true",
                   help="score samples without codes with the reward itself instead of answering 422 (reward owners)")
    p.add_argument("--exit-with-parent", type=Optional[int], default=None, metavar="PID",
                   help="stop when process PID is gone (a trainer's reward owner must not outlive the trainer)")
    p.add_argument("--reward", type=Optional[Reward], default=None,
                   help="the reward to serve instead of Whisper: class_path and init_args (a --config file's `reward:`, or JSON)")
    p.add_argument("--reward-config", type=Optional[str], default=None,
                   help="YAML file {class_path, init_args} of the reward to serve instead of Whisper, read when the server starts")
    p.add_argument("--reward-factory", type=Optional[str], default=None,
                   help="a pickled zero-argument callable that builds the reward (written by the trainer for its "
                   "reward owner, lightning_grpo.reward.owner; load only files you wrote: unpickling runs code)")
    p.add_argument("--fake-reward", type=Optional[Literal["rule"]], default=None, help="serve the rule reward (tests; no Whisper)")
    return p


def reward_factory(parser: ArgumentParser, args: Namespace) -> RewardFactory:
    """What builds the reward `args` name; raises naming the flags when they name more than one."""
    given = [name for name in REWARD_SOURCES if args.get(name) is not None]
    if len(given) > 1:
        flags = " and ".join("--" + name.replace("_", "-") for name in given)
        parser.error(f"{flags} each name the reward to serve: give one")
    if args.fake_reward == "rule":
        from .rule import RuleReward

        return RuleReward
    if args.reward is not None:
        return lambda: parser.instantiate(Namespace(reward=args.reward)).reward
    if args.reward_config:
        return lambda: reward_from_config(args.reward_config)
    if args.reward_factory:
        return lambda: reward_from_factory_file(args.reward_factory)
    return lambda: build_whisper_reward(args.model, args.device, args.codec, args.language, args.max_batch_size, args.dtype)


def _exit_with_parent(pid: int, poll_s: float = 1.0) -> None:
    """A daemon thread that stops this server (SIGTERM to itself, then exit) once `pid` is no longer its parent:
    an owner whose trainer was SIGKILLed must not hold the reward GPU forever."""
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(poll_s)
        log.warning("parent process %d is gone: the scoring server stops", pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(15)
        os._exit(1)

    if os.getppid() != pid:
        raise SystemExit(f"--exit-with-parent {pid}: that process is not this server's parent (it is {os.getppid()})")
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """`python -m lightning_grpo serve ...`: parse flags (and --config files) and serve until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    factory = reward_factory(parser, args)
    if args.exit_with_parent is not None:
        _exit_with_parent(args.exit_with_parent)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(
        factory, host=args.host, port=args.port, log_level=args.log_level,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_request_bytes=args.max_request_bytes, max_request_samples=args.max_batch_samples,
        codebook_size=args.codebook_size, original_nll_cap=args.original_nll_cap,
        allow_empty_tokens=args.allow_empty_tokens, reference_dir=args.reference_dir,
        max_reference_seconds=args.max_reference_seconds,
        max_request_reference_seconds=args.max_request_reference_seconds,
    )


if __name__ == "__main__":
    main()
