"""Held-out CER before and after a fit, printed when it ends: the headline of a Whisper-rewarded run.

"Before" is the validation Lightning runs ahead of the first step when `--trainer.num_sanity_val_steps -1` (the
whole held-out set, on the starting weights); "after" is the fit's last validation, so let
`--trainer.val_check_interval` divide `--trainer.max_steps`. The value is the mean of the per-sample `cer` metric
of each validation rollout's reward (WhisperReward reports it capped at 1), summed over ranks, so it needs no
logger and is the same number on every rank.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class HeldOutCER(L.Callback):
    """Prints `held-out CER: <before> at step 0 -> <after> at step N (<relative change>)` at the end of a fit.

    Args:
        metric: the reward metric averaged over the validation samples (`cer`; `uer` for a unit-error oracle).
    """

    def __init__(self, metric: str = "cer") -> None:
        self.metric = metric
        self.history: list[tuple[int, float, int]] = []  # (global step, mean, samples) per validation
        self._sum = 0.0
        self._count = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sum, self._count = 0.0, 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        rollout = batch.get("rollout") if isinstance(batch, dict) else None
        values = None if rollout is None else rollout.reward_result.metrics.get(self.metric)
        if values is not None:
            self._sum += float(values.float().sum())
            self._count += values.numel()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = torch.tensor([self._sum, float(self._count)], dtype=torch.float64, device=pl_module.device)
        total, count = trainer.strategy.reduce(local, reduce_op="sum").tolist()  # every rank reaches this hook
        if count:
            self.history.append((trainer.global_step, total / count, int(count)))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            rank_zero_warn(
                f"HeldOutCER: no validation rollout reported `{self.metric}`; set --trainer.num_sanity_val_steps -1 "
                "and a --trainer.val_check_interval that divides --trainer.max_steps, with a reward that reports it"
            )
            return
        (step0, before, n0), (step1, after, n1) = self.history[0], self.history[-1]
        change = f" ({(after - before) / before:+.1%})" if before > 0 else ""
        # the sanity check ignores --trainer.limit_val_batches: say so when the two saw different sets
        samples = f"{n0} samples" if n0 == n1 else f"{n0} -> {n1} samples"
        rank_zero_info(f"held-out {self.metric.upper()} over {samples}: {before:.3f} at step {step0} -> "
                       f"{after:.3f} at step {step1}{change}")
