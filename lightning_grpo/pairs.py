"""`python -m lightning_grpo pairs`: sample candidate pairs for listeners from a checkpoint.

For each prompt of `--data` it samples `--k` completions with the config's sampler (the rollout's, at its
temperature), scores them with the config's reward, and keeps pairs of samples that both pass the intelligibility
gate: reward reason "ok", CER at most `--max_cer` (the reward's `cer` metric, e.g. WhisperReward's), stopped
unless `--keep_truncated`, and not the same codes. Listeners then judge prosody and naturalness, not errors. Each
pair's two samples are decoded with the reward's codec and written as wavs, with a manifest:

    DIR/pairs.json       round_id, the checkpoint, the gate, counts (prompts, samples, passing, pairs)
    DIR/manifest.jsonl   one pair a line: pair_id, text, language, the voice-cloning reference if any, and
                         "a" / "b": codes, stopped, cer, reward, transcript, wav (relative path), prosody
                         (duration_s and reward/prosody.py's statistics: f0 std / range in semitones, voiced
                         fraction, energy std, speaking rate, pause fraction; null where not measured, and
                         its reason: ok, too_short, silent, unvoiced, nonfinite)
    DIR/audio/<pair_id>_{a,b}.wav

It runs like `evaluate` (a validate loop over `--data` with the fit config's trainer, model, sampler and reward):

    python -m lightning_grpo pairs --config configs/tiny_preference.yaml --ckpt runs/.../last.ckpt \\
        --data prompts.jsonl --out runs/round1/pairs --k 4 --max_cer 0.1

`--ckpt` is a Lightning .ckpt (or an FSDP2 shard directory) or an exported HF directory; other arguments are
fit-config overrides.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import soundfile

from .batch import rollout_records
from .distributed import concat_from_ranks
from .evaluate import checkpoint_or_model
from .llasa import parse_completion
from .reward.prosody import prosody_stats
from .rollout import GRPORollout


class PairCollector(L.Callback):
    """Collects every validation prompt's k samples (codes, gate result) on every rank, and pairs them."""

    def __init__(self, max_cer: float | None, keep_truncated: bool = False, pairs_per_prompt: int = 1) -> None:
        super().__init__()
        self.max_cer, self.keep_truncated, self.pairs_per_prompt = max_cer, keep_truncated, pairs_per_prompt
        self.groups: list[dict[str, Any]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        rollout_cb = next(c for c in trainer.callbacks if isinstance(c, GRPORollout))
        r = batch["rollout"]
        records = rollout_records(r, list(batch.get("language") or []))
        if self.max_cer is not None and records and "cer" not in records[0]:
            raise ValueError(f"--max_cer={self.max_cer}: the reward ({type(rollout_cb.reward).__name__}) reports no "
                             "`cer` metric; use a reward that transcribes (WhisperReward) or --max_cer none")
        for p in range(len(batch["text"])):
            samples = []
            for i in range(p * r.group_size, (p + 1) * r.group_size):
                parsed = parse_completion(r.completion_ids[i], rollout_cb.vocab)
                rec = records[i]
                samples.append({"codes": parsed.codes, "stopped": parsed.stopped, "cer": rec.get("cer"),
                                "reward": rec["reward"], "reason": rec["reason"], "truncated": rec["truncated"],
                                "transcript": rec["transcript"]})
            group = {"text": batch["text"][p], "language": records[p * r.group_size]["language"], "samples": samples}
            for key in ("prompt_text", "prompt_codes"):
                if batch.get(key) and batch[key][p] is not None:
                    group[key] = batch[key][p]
            self.groups.append(group)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.groups = concat_from_ranks(self.groups)

    def passes(self, s: dict[str, Any]) -> bool:
        """The intelligibility gate (module docstring)."""
        if s["reason"] != "ok" or not s["codes"] or (s["truncated"] and not self.keep_truncated):
            return False
        return self.max_cer is None or (s["cer"] is not None and math.isfinite(s["cer"]) and s["cer"] <= self.max_cer)

    def pairs(self) -> list[dict[str, Any]]:
        """Disjoint pairs of gate-passing samples with different codes, in sampling order, per prompt."""
        out = []
        for index, group in enumerate(self.groups):
            kept, seen = [], set()
            for s in group["samples"]:
                if self.passes(s) and tuple(s["codes"]) not in seen:
                    kept.append(s)
                    seen.add(tuple(s["codes"]))
            for j in range(min(self.pairs_per_prompt, len(kept) // 2)):
                a, b = kept[2 * j], kept[2 * j + 1]
                info = {k: v for k, v in group.items() if k != "samples"}
                out.append({"pair_id": f"{index:05d}-{j}", **info, "a": a, "b": b})
        return out


def write_pairs(pairs: list[dict[str, Any]], codec, out: Path, meta: dict[str, Any]) -> None:
    """Decode both samples of every pair with `codec`, write their wavs, prosody and the manifest under `out`."""
    audio = out / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rate = int(getattr(codec, "sample_rate", 16_000))
    with open(out / "manifest.jsonl", "w") as f:
        for pair in pairs:
            waves = codec.decode([pair["a"]["codes"], pair["b"]["codes"]])
            stats = prosody_stats([w.detach().float().cpu() for w in waves], [pair["text"]] * 2, rate)
            for i, (side, wave) in enumerate(zip("ab", waves)):
                s = pair[side]
                name = f"audio/{pair['pair_id']}_{side}.wav"
                soundfile.write(out / name, wave.detach().float().cpu().clamp(-1, 1).numpy(), rate, subtype="PCM_16")
                s["wav"] = name
                values = {k: float(v[i]) for k, v in stats.values.items()}
                s["prosody"] = {"duration_s": wave.numel() / rate, "reason": stats.reasons[i],
                                **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
                for key in ("reason", "truncated"):
                    s.pop(key, None)
            f.write(json.dumps(pair) + "\n")
    (out / "pairs.json").write_text(json.dumps({**meta, "pairs": len(pairs), "sample_rate": rate}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """`pairs --data PROMPTS --out DIR [--ckpt P] [--k 2] [--max_cer X] --config fit.yaml [fit overrides...]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lightning_grpo pairs", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are fit-config overrides (--config, --rollout.sampler...).")
    parser.add_argument("--data", required=True, help="prompts: any --data.val_data source (file, directory, builtin:en)")
    parser.add_argument("--out", required=True, help="output directory for manifest.jsonl, pairs.json and audio/")
    parser.add_argument("--ckpt", default=None, help="Lightning .ckpt or exported HF dir; default: the config's model")
    parser.add_argument("--k", type=int, default=2, help="completions sampled per prompt (>= 2)")
    parser.add_argument("--max_cer", type=lambda v: None if v.lower() in ("none", "null") else float(v), default=0.2,
                        help="the gate: keep samples with CER at most this (the reward's `cer`); none: no CER gate")
    parser.add_argument("--pairs_per_prompt", type=int, default=1, help="disjoint pairs per prompt, at most k // 2")
    parser.add_argument("--keep_truncated", action="store_true", help="also pair samples cut at max_new_tokens")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/manifest.jsonl")
    args, rest = parser.parse_known_args(argv)
    if args.k < 2:
        raise ValueError(f"--k={args.k}: a pair needs at least 2 completions per prompt")
    if not 1 <= args.pairs_per_prompt <= args.k // 2:
        raise ValueError(f"--pairs_per_prompt={args.pairs_per_prompt} must be in [1, k // 2 = {args.k // 2}]")
    out = Path(args.out)
    if (out / "manifest.jsonl").exists() and not args.overwrite:
        raise FileExistsError(f"--out={out} already holds a manifest.jsonl (perhaps labelled); pick a new directory "
                              "or pass --overwrite")
    from .cli import build_cli

    ckpt, model = checkpoint_or_model(args.ckpt, "--ckpt")
    overrides = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--model.beta=0",
                 f"--data.val_data={args.data}", f"--rollout.val_group_size={args.k}", *model]
    cli = build_cli([*rest, *overrides], run=False)
    rollout_cb = next(c for c in cli.trainer.callbacks if isinstance(c, GRPORollout))
    codec = getattr(rollout_cb.reward, "codec", None)
    if codec is None or not hasattr(codec, "decode"):
        raise ValueError(f"the reward ({type(rollout_cb.reward).__name__}) has no codec to decode the samples for "
                         "listeners; use a reward with one (WhisperReward, lightning_grpo.reward.tone.ToneReward)")
    collector = PairCollector(args.max_cer, args.keep_truncated, args.pairs_per_prompt)
    cli.trainer.callbacks.append(collector)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    pairs = collector.pairs()
    if cli.trainer.is_global_zero:
        samples = [s for g in collector.groups for s in g["samples"]]
        meta = {"round_id": uuid.uuid4().hex, "ckpt": args.ckpt, "model": cli.model.hparams.model_name_or_path,
                "data": args.data, "k": args.k, "max_cer": args.max_cer, "keep_truncated": args.keep_truncated,
                "prompts": len(collector.groups), "samples": len(samples),
                "passing": sum(collector.passes(s) for s in samples)}
        write_pairs(pairs, codec, out, meta)
        print(f"wrote {len(pairs)} pairs from {meta['prompts']} prompts ({meta['passing']} of {meta['samples']} "
              f"samples passed the gate) to {out}")
    return pairs
