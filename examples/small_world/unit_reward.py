"""An oracle reward for the demo: 1 - unit error rate of the codes against the text's correct codes.

No audio, no Whisper: it says how fast GRPO can improve this policy when the reward is exact and free,
which separates "the loop cannot learn in N steps" from "Whisper's reward is too noisy" in the demo.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lightning_grpo.reward.base import RewardResult, SpeechSample
from small_world.unit_codec import text_to_codes
from small_world.warm_start import edit_distance


class UnitOracleReward:
    """reward = max(0, 1 - edit_distance(codes, correct codes) / len(correct codes)); metric `uer`."""

    def score(self, samples: Sequence[SpeechSample]) -> RewardResult:
        uer = []
        for s in samples:
            ref = text_to_codes(s.text)
            uer.append(edit_distance(list(s.codes), ref) / len(ref))
        uer_t = torch.tensor(uer, dtype=torch.float32)
        return RewardResult(rewards=(1 - uer_t).clamp(min=0.0), metrics={"uer": uer_t, "cer": uer_t})
