"""`python examples/small_world/cli.py {fit,validate,evaluate} [overrides]`: the lightning_grpo command
line on the small world's config, from any directory.

The same as `python -m lightning_grpo fit --config examples/small_world/config.yaml` run from the
repository root with `examples/` on PYTHONPATH; any other argument is an override, e.g.
`--rollout.reward.lambda_n 0` (the CER-only ablation) or `--trainer.max_steps 10`. The policy is read
from ./runs/demo/warm_seed0: make it first with `python examples/small_world/warm_start.py`.

`--world prosody` first runs the prosody world instead (prosody.yaml and its prompts; small_world/prosody_world.py),
reading ./runs/prosody/warm_seed0 (`warm_start.py --world prosody --out runs/prosody/warm_seed0`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `small_world` importable from any directory

from lightning_grpo.cli import main  # noqa: E402
from small_world import config_args, prosody_world  # noqa: E402

SUBCOMMANDS = ("fit", "validate", "evaluate")


def run(argv: list[str]) -> None:
    world_args = config_args()
    if argv[:2] == ["--world", "prosody"]:
        world_args, argv = prosody_world.config_args(), argv[2:]
    command, rest = (argv[0], argv[1:]) if argv and argv[0] in SUBCOMMANDS else ("fit", argv)
    main([command, *world_args, *rest])


if __name__ == "__main__":
    run(sys.argv[1:])
