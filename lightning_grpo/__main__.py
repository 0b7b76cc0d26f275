"""Command line: `python -m lightning_grpo {fit,validate} --config configs/....yaml` (LightningCLI),
and `python -m lightning_grpo serve ...` (the Whisper scoring server)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
