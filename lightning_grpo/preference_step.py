"""The DPO step of the policy (`--model.objective dpo`): preference pairs in, one optimiser update out.

`PreferenceObjective` is a base class of GRPOPolicy holding its preference-round methods; they use the policy's
own pieces (the chunked log-prob pass, the frozen reference, gradient sync and the update), so DPO runs wherever
GRPO does: one device, DDP, FSDP2 (ModelParallelStrategy) and LoRA (the reference is then the base with the
adapters off). The math is in dpo.py. A batch is `PreferenceDataModule`'s: B pairs on this rank, scored as
2B rows (preference_data.pair_rollout); the reference's log-probs are computed once per batch without grad, the
policy's in one forward per micro-batch of `--model.micro_batch_size` pairs (their chosen and rejected rows).

Logged (train/ every step, val/ per validation over the held-out pairs; means over pairs of all ranks):
    dpo_loss, dpo_accuracy (chosen reward > rejected reward), dpo_margin (reward margin),
    chosen_logratio / rejected_logratio (log pi - log pi_ref, summed over the sample's tokens),
    chosen_reward / rejected_reward (beta x log-ratio), and train/dpo_nll with the NLL term.
With `data.val_prompts` and the `rollout:` group (validation_rollout.py), each validation also samples the held-out
prompts and logs them as GRPO's validation does (val/reward_mean, val/cer_mean, val/prosody/*, val/entropy).
"""

from __future__ import annotations

import torch

from . import dpo, grpo
from .batch import Rollout
from .llasa import LlasaVocab
from .preference_data import pair_rollout


class PreferenceObjective:
    """Mixin for GRPOPolicy: `preference_training_step` and `preference_validation_step`."""

    def check_preference_setup(self) -> None:
        hp = self.hparams
        if not hp.beta > 0:
            raise ValueError(f"--model.objective dpo needs --model.beta > 0, the DPO temperature (TRL's default 0.1); "
                             f"got {hp.beta}")

    def _pairs(self, batch: dict) -> Rollout:
        if "chosen" not in batch:
            raise RuntimeError(
                "--model.objective dpo trains on preference pairs, but the batch is a prompt batch: run "
                "`python -m lightning_grpo dpo fit --config ...` (the `data:` group is then PreferenceDataModule)"
            )
        if getattr(self, "_llasa_vocab", None) is None:
            self._llasa_vocab = LlasaVocab.from_tokenizer(self.tokenizer)
        return pair_rollout(batch, self.tokenizer, self._llasa_vocab, batch.get("max_prompt_length"), self.device)

    def _pair_terms(self, r: Rollout, pairs: slice, ref: torch.Tensor, cer_gap: torch.Tensor | None):
        """(DPOTerms, the chosen rows' token log-probs (m, C) and mask) of pairs `pairs`: rows 2i..2j, one forward."""
        rows = slice(2 * pairs.start, 2 * pairs.stop)
        logp, mask = self.completion_logprobs(self.policy, r, rows), r.completion_mask[rows]  # (2m, C) each
        seq = dpo.sequence_logprobs(logp, mask)  # (2m,): chosen, rejected, chosen, ...
        terms = dpo.dpo_loss(seq[0::2], seq[1::2], ref[rows][0::2], ref[rows][1::2], self.hparams.beta,
                             None if cer_gap is None else cer_gap[pairs], self.hparams.dpo_cer_weight)
        return terms, logp[0::2], mask[0::2]

    def _reference_and_gap(self, batch: dict, r: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad(), self.reference_model() as reference:
            ref = torch.cat([dpo.sequence_logprobs(self.completion_logprobs(reference, r, s), r.completion_mask[s])
                             for s in self._micro_batches(r.input_ids.shape[0])])  # (2B,)
        cer_gap = None
        if self.hparams.dpo_cer_weight:
            cer_gap = torch.tensor(batch["rejected_cer"], device=self.device) - torch.tensor(batch["chosen_cer"], device=self.device)
            if not torch.isfinite(cer_gap).all():
                raise ValueError("--model.dpo_cer_weight > 0 needs chosen_cer and rejected_cer for every pair; the "
                                 "pairs file lacks them (export pairs made by `pairs`, or set dpo_cer_weight 0)")
        return ref, cer_gap

    def preference_training_step(self, batch: dict) -> torch.Tensor:
        hp = self.hparams
        r = self._pairs(batch)
        b = len(batch["text"])
        ref, cer_gap = self._reference_and_gap(batch, r)
        # the NLL term's token mean is over the step's chosen tokens on every rank (a collective, once per step), so
        # DDP's gradient average makes it the one-process token mean of the union of the ranks' pairs (as GRPO's
        # token-mean loss); a per-rank count would weigh up the tokens of a rank with shorter chosen samples
        chosen_tokens = grpo.token_mean_normaliser(r.completion_mask[0::2]) if hp.dpo_nll_weight else 0.0
        opt = self.optimizers()
        lr = opt.param_groups[0]["lr"]
        self._grad_norm = None
        mbs = self._micro_batches(b)
        parts, loss_total, nll_total = [], 0.0, 0.0
        for k, s in enumerate(mbs):
            with self._gradient_sync(k == len(mbs) - 1):
                terms, logp_c, mask_c = self._pair_terms(r, s, ref, cer_gap)
                loss = terms.losses.sum() / b
                if hp.dpo_nll_weight:
                    nll = dpo.summed_nll(logp_c, mask_c, chosen_tokens)
                    loss = loss + hp.dpo_nll_weight * nll
                    nll_total += nll.item()
                self.manual_backward(loss)
            loss_total += loss.item()
            parts.append(terms)
        self._update(opt, final=True)
        self.lr_schedulers().step()
        stats = {"train/loss": loss_total, "train/lr": lr, **self._pair_stats(parts, "train")}
        if hp.dpo_nll_weight:
            stats["train/dpo_nll"] = nll_total
        if self._grad_norm is not None:
            stats["train/grad_norm"] = float(self._grad_norm)
        self.log_dict(stats, on_step=True, sync_dist=True, batch_size=b)
        return torch.tensor(loss_total)

    @torch.no_grad()
    def preference_validation_step(self, batch: dict) -> None:
        if "rollout" in batch:  # held-out prompts the `rollout:` group sampled and scored
            self.log_rollout_stats(batch["rollout"], "val", on_epoch=True)
            self.log_val_entropy(batch["rollout"])
            return
        r = self._pairs(batch)
        b = len(batch["text"])
        ref, cer_gap = self._reference_and_gap(batch, r)
        parts = [self._pair_terms(r, s, ref, cer_gap)[0] for s in self._micro_batches(b)]
        self.log_dict(self._pair_stats(parts, "val"), on_step=False, on_epoch=True, sync_dist=True, batch_size=b,
                      add_dataloader_idx=False)  # beside the held-out prompts' loader: names differ

    def _pair_stats(self, parts: list[dpo.DPOTerms], prefix: str) -> dict[str, float]:
        """Means over this rank's pairs (Lightning's sync_dist with batch_size averages them over ranks)."""
        cat = {name: torch.cat([getattr(t, name).detach() for t in parts]).float() for name in dpo.DPOTerms._fields}
        beta = self.hparams.beta
        logratios = {"chosen_logratio": cat["chosen_reward"] / beta, "rejected_logratio": cat["rejected_reward"] / beta}
        return {
            f"{prefix}/dpo_loss": cat["losses"].mean().item(),
            f"{prefix}/dpo_accuracy": (cat["margin"] > 0).float().mean().item(),
            f"{prefix}/dpo_margin": cat["margin"].mean().item(),
            f"{prefix}/chosen_reward": cat["chosen_reward"].mean().item(),
            f"{prefix}/rejected_reward": cat["rejected_reward"].mean().item(),
            **{f"{prefix}/{k}": v.mean().item() for k, v in logratios.items()},
        }
