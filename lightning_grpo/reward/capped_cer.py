"""Robust CER statistics for validation: per-sample CER capped at 1, and the share above 1.

CER is unbounded above: one Whisper repetition loop ("my cat. my cat. my cat. ...") gives a single
sample a CER of 30 and swamps the mean of 48 samples (the reward is not affected that way: it sees
1 - tanh(3 CER)). `WhisperReward` reports `cer` capped at 1 itself (so `val/cer_mean` is this mean) and the
uncapped value as `cer_raw`; this callback adds the share above 1 (from `cer_raw` when the reward gives it) and
the exact-match rate. The small world (examples/small_world/) reports `val/cer_capped_mean` as its headline
metric. Add it to any run whose reward reports `cer`: `--trainer.callbacks+=lightning_grpo.reward.capped_cer.CappedCER`.
"""

from __future__ import annotations

import lightning as L


class CappedCER(L.Callback):
    """Logs `val/cer_capped_mean` (mean of min(CER, 1)) and `val/cer_above_1` from each validation rollout."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        rollout = batch.get("rollout") if isinstance(batch, dict) else None
        if rollout is None or "cer" not in rollout.reward_result.metrics:
            return
        metrics = rollout.reward_result.metrics
        cer = metrics.get("cer_raw", metrics["cer"]).float()  # (N,) uncapped where the reward reports it
        n = cer.numel()
        pl_module.log("val/cer_capped_mean", cer.clamp(max=1.0).mean().item(), on_epoch=True, batch_size=n)
        pl_module.log("val/cer_above_1", (cer > 1.0).float().mean().item(), on_epoch=True, batch_size=n)
        pl_module.log("val/exact_rate", (cer == 0).float().mean().item(), on_epoch=True, batch_size=n)
