"""Command line: `python -m lightning_grpo {fit,validate} --config configs/....yaml` (LightningCLI),
`serve` (the Whisper scoring server), `prepare` (data), `evaluate` (a checkpoint on the test split),
`export` (a checkpoint as an HF directory) and `rehearse` (a config's run on this CPU before a GPU run)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
