"""Robust CER statistics for validation: per-sample CER capped at 1, and the share above 1.

CER is unbounded above: one Whisper repetition loop ("my cat. my cat. my cat. ...") gives a single
sample a CER of 30 and swamps the mean of 48 samples (the reward is not affected that way: it sees
1 - tanh(3 CER)). The small world (examples/small_world/) therefore reports the mean of min(CER, 1) as
its headline metric, next to the raw mean the policy module logs. Add it to any run whose reward
reports `cer`: `--trainer.callbacks+=lightning_grpo.reward.capped_cer.CappedCER`.
"""

from __future__ import annotations

import lightning as L
import torch


class CappedCER(L.Callback):
    """Logs `val/cer_capped_mean` (mean of min(CER, 1)) and `val/cer_above_1` from each validation rollout."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        rollout = batch.get("rollout") if isinstance(batch, dict) else None
        if rollout is None or "cer" not in rollout.reward_result.metrics:
            return
        cer = rollout.reward_result.metrics["cer"].float()  # (N,)
        n = cer.numel()
        pl_module.log("val/cer_capped_mean", cer.clamp(max=1.0).mean().item(), on_epoch=True, batch_size=n)
        pl_module.log("val/cer_above_1", (cer > 1.0).float().mean().item(), on_epoch=True, batch_size=n)
        pl_module.log("val/exact_rate", (cer == 0).float().mean().item(), on_epoch=True, batch_size=n)
