"""Preference pairs for DPO rounds: a parquet of (prompt text, chosen codes, rejected codes), batched per step.

The file is what `python -m lightning_grpo label export` writes (label_store.py), one row per judged pair:

    text                the prompt's text (what both samples say)
    chosen, rejected    codec codes of the preferred and the other sample (lists of ints)
    chosen_stopped, rejected_stopped   the sample ended with <|SPEECH_GENERATION_END|> (default true): a sample
                        cut at max_new_tokens is scored without a stop token it never emitted
    chosen_cer, rejected_cer           the intelligibility gate's CER of each (optional; the CER term needs them)
    prompt_text, prompt_codes          a voice-cloning reference, as prompt rows carry it (optional)

Held-out prompts (`val_prompts`, optional) are a second validation loader of prompt rows, as PromptDataModule's
`val_data`: the `rollout:` group of `dpo fit` samples and scores them (validation_rollout.py).

`pair_rollout` lays a batch out as the trainer's `Rollout` (batch.py): each pair's chosen row then its rejected row,
each the LLaSA prompt followed by the sample's speech tokens, so the policy scores them with the same
chunked log-prob pass (and FSDP2 path) as a GRPO rollout, over the same rows (speech tokens and the stop token).
"""

from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from .batch import Rollout
from .data import EpochPermutation, _Rows, _rows_from_file, collate_prompts, load_prompts, parse_codes, reference_fields
from .llasa import LlasaVocab, codes_to_ids, encode_prompt
from .reward.base import RewardResult

PAIR_COLUMNS = ("text", "chosen", "rejected")


def load_pairs(path: str, flag: str = "--data.train_pairs") -> list[dict[str, Any]]:
    """The checked rows of a pairs file (parquet, jsonl, json, csv): text, chosen, rejected, the stop flags, the CERs
    (NaN where absent) and any voice-cloning reference. A missing column or a malformed row is an error naming it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{flag}={path} is not a file; `python -m lightning_grpo label export` writes one")
    raw = _rows_from_file(file)
    if not raw:
        raise ValueError(f"{flag}={path} has no pairs")
    missing = [c for c in PAIR_COLUMNS if c not in raw[0]]
    if missing:
        raise ValueError(f"{flag}={path} lacks the column(s) {missing}; a pairs file has {', '.join(PAIR_COLUMNS)}")
    rows = []
    for i, row in enumerate(raw):
        where = f"{flag}={path} row {i}"
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: empty text {text!r}; drop the row")
        out = {"text": text.strip(), **reference_fields(row, where, file.parent)}
        for side in ("chosen", "rejected"):
            codes = parse_codes(row.get(side), f"{where} ({side})")
            if not codes:
                raise ValueError(f"{where}: {side} has no codes; a pair needs two non-empty samples")
            stopped = row.get(f"{side}_stopped")
            cer = row.get(f"{side}_cer")
            out[side] = codes
            out[f"{side}_stopped"] = True if stopped is None else bool(stopped)
            out[f"{side}_cer"] = math.nan if cer is None else float(cer)
        rows.append(out)
    return rows


def collate_pairs(rows: list[dict[str, Any]], max_prompt_length: int | None = None) -> dict[str, Any]:
    """Column lists of a batch of pair rows (the reference keys only when a row has one), and the prompt length
    limit pair_rollout checks."""
    keys = ["text", "chosen", "rejected", "chosen_stopped", "rejected_stopped", "chosen_cer", "rejected_cer"]
    batch: dict[str, Any] = {k: [r[k] for r in rows] for k in keys}
    batch["max_prompt_length"] = max_prompt_length
    for key in ("prompt_text", "prompt_codes"):
        if any(r.get(key) is not None for r in rows):
            batch[key] = [r.get(key) for r in rows]
    return batch


def pair_rollout(batch: dict[str, list], tokenizer, vocab: LlasaVocab, max_prompt_length: int | None,
                 device: torch.device | str = "cpu") -> Rollout:
    """A batch of B pairs as one Rollout of 2B rows: row 2i the chosen sample of pair i, row 2i + 1 its rejected one,
    so pairs i..j are the contiguous rows 2i..2j (one forward per micro-batch of pairs); group_size 1, temperature 1,
    rewards 0: only the layout and the scored rows are used. Codes outside the speech vocabulary are an error naming
    the code (LlasaVocab.code_to_id)."""
    b = len(batch["text"])
    refs = [batch.get(k) or [None] * b for k in ("prompt_text", "prompt_codes")]
    prompts = [encode_prompt(tokenizer, t, max_prompt_length, prompt_text=pt, prompt_codes=pc)
               for t, pt, pc in zip(batch["text"], *refs)]
    completions = [codes_to_ids(batch[side][i], vocab, add_stop=batch[f"{side}_stopped"][i])
                   for i in range(b) for side in ("chosen", "rejected")]
    prompts = [p for p in prompts for _ in range(2)]
    n = 2 * b
    width = max(len(p) for p in prompts)
    clen = max(len(c) for c in completions)
    input_ids = torch.full((n, width + clen), vocab.pad_id, dtype=torch.long)  # (2B, P+C)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros(n, clen)  # (2B, C)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, width - len(p): width + len(c)] = torch.tensor(p + c)
        attention_mask[i, width - len(p): width + len(c)] = 1
        completion_mask[i, : len(c)] = 1.0
    # the rows GRPORollout samples from under restrict_to_speech: the speech tokens and the stop token
    allowed = {vocab.speech_gen_end_id, *range(vocab.speech_start_id, vocab.speech_end_id)}
    lo, hi = min(allowed), max(allowed) + 1
    disallowed = tuple(i for i in range(lo, hi) if i not in allowed)
    zeros = torch.zeros(n)
    return Rollout(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        completion_mask=completion_mask.to(device), prompt_width=width, truncated=torch.zeros(n, dtype=torch.bool),
        group_size=1, temperature=1.0, max_new_tokens=clen, texts=[t for t in batch["text"] for _ in range(2)], rewards=zeros,
        reward_result=RewardResult(rewards=zeros), vocab_range=(lo, hi), disallowed=disallowed,
        completion_ids=completions,
    )


class PreferenceDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_pairs: str,
        val_pairs: str | None = None,
        val_fraction: float = 0.0,
        pairs_per_step: int = 8,
        val_pairs_per_step: int = 8,
        max_prompt_length: int = 512,
        split_seed: int = 0,
        num_workers: int = 0,
        val_prompts: str | None = None,
        val_prompts_split: str = "test",
        val_prompts_per_step: int = 8,
        max_val_prompts: int | None = None,
    ) -> None:
        """
        Args:
            train_pairs: a pairs file (`label export`'s parquet; module docstring for its columns).
            val_pairs: held-out pairs for `val/dpo_accuracy` and the other val/dpo_* statistics; None: split
                `val_fraction` of train_pairs off instead (no validation when that is 0 too).
            val_fraction: the share of train_pairs held out when val_pairs is None, drawn with split_seed (so
                every round of a study holds out the same pairs of one export).
            pairs_per_step: pairs per optimiser update over ALL ranks (each rank takes pairs_per_step / world).
            val_pairs_per_step: pairs per validation batch over all ranks.
            max_prompt_length: a longer prompt is an error naming the text (as `--rollout.max_prompt_length`).
            split_seed: the seed of the val_fraction split.
            val_prompts: held-out prompts the `rollout:` group samples and scores at each validation (val/cer_mean,
                val/prosody/*); the forms of PromptDataModule's val_data (`builtin:en`, a prompts file, a directory
                with `{split}.parquet`, a HF datasets id). None: no sampled validation.
            val_prompts_split: the split of val_prompts read (`builtin:en`'s test split is in no pairs file `pairs`
                makes from its train split).
            val_prompts_per_step: prompts per validation batch over all ranks; times rollout.val_group_size =
                samples per batch.
            max_val_prompts: keep only the first n of val_prompts.
        """
        super().__init__()
        if pairs_per_step < 1 or val_pairs_per_step < 1:
            raise ValueError("--data.pairs_per_step and --data.val_pairs_per_step must be >= 1")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"--data.val_fraction={val_fraction} must be in [0, 1)")
        if val_pairs and val_fraction:
            raise ValueError("--data.val_pairs and --data.val_fraction both choose held-out pairs: set one")
        if val_prompts_per_step < 1:
            raise ValueError(f"--data.val_prompts_per_step={val_prompts_per_step} must be >= 1")
        self.train_pairs, self.val_pairs, self.val_fraction = train_pairs, val_pairs, val_fraction
        self.pairs_per_step, self.val_pairs_per_step = pairs_per_step, val_pairs_per_step
        self.max_prompt_length, self.split_seed, self.num_workers = max_prompt_length, split_seed, num_workers
        self.val_prompts, self.val_prompts_split = val_prompts, val_prompts_split
        self.val_prompts_per_step, self.max_val_prompts = val_prompts_per_step, max_val_prompts
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []
        self.val_prompt_rows: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        if self.val_prompts and not self.val_prompt_rows:
            rows = load_prompts(self.val_prompts, self.val_prompts_split)
            self.val_prompt_rows = rows[: self.max_val_prompts] if self.max_val_prompts else rows
        if self.train_rows or self.val_rows:
            return
        rows = load_pairs(self.train_pairs)
        if self.val_pairs:
            self.train_rows, self.val_rows = rows, load_pairs(self.val_pairs, "--data.val_pairs")
        else:
            order = list(range(len(rows)))
            random.Random(self.split_seed).shuffle(order)
            held = set(order[: round(self.val_fraction * len(rows))])
            self.train_rows = [r for i, r in enumerate(rows) if i not in held]
            self.val_rows = [r for i, r in enumerate(rows) if i in held]

    def _per_rank(self, key: str) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        total = getattr(self, key)
        if total % world:
            raise ValueError(f"--data.{key}={total} is not divisible by the {world} training processes")
        return total // world

    def train_dataloader(self) -> DataLoader:
        batch = self._per_rank("pairs_per_step")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if len(self.train_rows) < batch * world:
            raise ValueError(f"{self.train_pairs} has {len(self.train_rows)} training pairs, fewer than the "
                             f"{batch * world} of one step; lower --data.pairs_per_step")
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        return DataLoader(_Rows(self.train_rows), batch_size=batch, sampler=EpochPermutation(len(self.train_rows), seed,
                          world, rank), drop_last=True, collate_fn=partial(collate_pairs, max_prompt_length=self.max_prompt_length), num_workers=self.num_workers)

    def check_rows(self, check: Callable[[dict[str, Any]], Any]) -> None:
        """Run `check` on every held-out prompt row (the rollout encodes each, so a prompt over
        rollout.max_prompt_length stops the run at its start); a ValueError it raises names the source and the row."""
        for i, row in enumerate(self.val_prompt_rows):
            try:
                check(row)
            except ValueError as e:
                raise ValueError(f"row {i} of --data.val_prompts={self.val_prompts!r}: {e}") from None

    def val_dataloader(self) -> DataLoader | list:
        """The held-out pairs' loader, then the held-out prompts' (each where there are any)."""
        loaders = []
        if self.val_rows:
            loaders.append(DataLoader(_Rows(self.val_rows), batch_size=self._per_rank("val_pairs_per_step"),
                                      shuffle=False, num_workers=self.num_workers,
                                      collate_fn=partial(collate_pairs, max_prompt_length=self.max_prompt_length)))
        if self.val_prompt_rows:
            loaders.append(DataLoader(_Rows(self.val_prompt_rows), batch_size=self._per_rank("val_prompts_per_step"),
                                      shuffle=False, collate_fn=collate_prompts, num_workers=self.num_workers))
        return loaders[0] if len(loaders) == 1 else loaders
