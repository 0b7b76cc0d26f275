"""The small world: GRPO with the real Whisper tiny.en reward lowers held-out CER, on a CPU.

Every part of the loop is real except the sizes: a unit codec whose 30 codes are words spoken by
espeak-ng (`unit_codec.UnitCodec`, a SpeechDecoder like X-codec2's decoder), a tiny LLaSA-shaped policy
warm-started by teacher forcing until it reads but mispronounces 30% of its words (`warm_start`), and
the real Whisper tiny.en reward shown a 5 s window (`lightning_grpo.reward.short_window`). The commands
work from any directory (they read this directory's files by absolute path; outputs go to ./runs/):

    python examples/small_world/warm_start.py --out runs/demo/warm_seed0 --seed 0    # ~2 min, cached
    python examples/small_world/cli.py fit                                           # 60 rollouts of GRPO
    python examples/small_world/measure.py --runs seed0 seed1 cer_only --rollouts 60 --val_every 10

The prosody world (`prosody_world`, `prosody.yaml`, `prosody_floor.yaml`; `--world prosody` of warm_start.py,
cli.py and measure.py) records every word at 3 pitches x 2 rates, so a policy also chooses a contour: it measures
whether GRPO on CER+NLL flattens prosody (BENCHMARKS.md, "Small world: prosody collapse and cure").

This directory is not part of the installed package; the scripts put its parent on sys.path so that
`small_world.*` (the config's `small_world.unit_codec.UnitCodec`) imports, and lightning_grpo comes from
wherever it is installed (`pip install .`, or the editable install scripts/setup.sh makes).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config.yaml"
TRAIN_PROMPTS = HERE / "prompts_train.jsonl"
TEST_PROMPTS = HERE / "prompts_test.jsonl"


def config_args() -> list[str]:
    """The small world's `--config` and its prompt files, as absolute paths (valid from any directory)."""
    return ["--config", str(CONFIG), f"--data.train_data={TRAIN_PROMPTS}", f"--data.val_data={TEST_PROMPTS}"]
