"""`python -m lightning_grpo evaluate`: score a policy on the test split; the same code reports validation in fit.

`ValidationReport` is a callback: during any validation loop (`fit`'s periodic validation, `validate`,
this command) it collects every validation sample the rollout callback scored (text, language, reward,
the reward's metrics such as CER and NLL, reason, transcript), logs per-language means as
`val/lang_<xx>/<metric>_mean` next to the policy's own `val/*` means, and writes `metrics.json`,
`metrics.md` (a table: one row for all samples, one per language) and `samples.jsonl` when given a
directory. The command builds the fit config's trainer, model and data, adds the callback and runs
`trainer.validate`, so a before/after comparison is one command each:

    python -m lightning_grpo evaluate --config configs/tiny_cpu.yaml --out_dir runs/eval/before
    python -m lightning_grpo evaluate --config configs/tiny_cpu.yaml --ckpt_path runs/tiny_cpu/.../last.ckpt \
        --out_dir runs/eval/after
    python -m lightning_grpo evaluate --compare runs/eval/before runs/eval/after

`--ckpt_path` takes a Lightning checkpoint (.ckpt, or the directory of shards an FSDP2 run writes: evaluate it
with that run's config) or an HF directory from `export`; any other argument
is a fit-config override (`--data.val_data ~/data/llasa-tts-rl-grpo`, `--data.max_val_samples 100`). One parser
(LightningCLI's) reads both, so a second `--config` file may keep an evaluation's settings, its own keys
(`ckpt_path`, `out_dir`, `seed_tts`, `sim`, `sim_codec`) beside fit keys (`data: {val_data: ...}`).
Samples per prompt are the rollout's `val_group_size`; sampling settings are the config's sampler's.

`--seed_tts` adds Seed-TTS-eval's scores, the convention of LLaSA's and most TTS papers' tables, next to the
reward's own CER: `seed_tts_wer` for English and `seed_tts_cer` for Chinese rows, computed from each sample's
transcript with Seed-TTS-eval's text processing (`reward.text.seed_tts_error`: its punctuation list, lower
case, zhconv on Chinese transcripts, no numeral normalisation) and averaged per utterance as it does. For
numbers to put beside published ones, transcribe with its ASR: Whisper large-v3 for English
(`whisper_model: large-v3`); its Chinese figures come from Paraformer-zh, which this package does not run,
so Chinese numbers from Whisper are comparable in method but not bit for bit.

`--sim` adds speaker similarity (`sim`, reward/speaker.py: GE2E cosine between each sample and its row's
reference voice) for rows with a voice-cloning reference, whatever the config's reward: it wraps that reward in
a CompositeReward beside a SpeakerSimilarityReward of weight 0, so the reward and every other metric are
unchanged. SIM decodes with the config reward's codec (`--sim_codec` names an X-codec2 checkpoint when the reward
has none, e.g. RemoteReward). A reward that already scores SIM is left as it is.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import lightning as L

from .batch import rollout_records
from .checkpointing import is_sharded_checkpoint
from .cli import GRPOCLI, build_cli
from .distributed import concat_from_ranks
from .rollout import GRPORollout

# columns shown first in the table when present; other reward metrics follow alphabetically
TABLE_FIRST = ("reward", "cer", "nll", "sim")
SEED_TTS_METRICS = {"en": "seed_tts_wer", "zh": "seed_tts_cer"}  # Seed-TTS-eval: WER for English, CER for Chinese


def add_seed_tts_scores(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add Seed-TTS-eval's per-utterance score to English (`seed_tts_wer`) and Chinese (`seed_tts_cer`) records.

    Records of other languages get neither. Raises when no record carries a transcript (a reward that does
    not transcribe, e.g. the rule reward).
    """
    from .reward.text import base_language, seed_tts_error

    if not any(r.get("transcript") is not None for r in records):
        raise ValueError("--seed_tts scores transcripts, but the reward gave none; evaluate with WhisperReward")
    for r in records:
        key = SEED_TTS_METRICS.get(base_language(r.get("language")))
        if key is not None and r.get("transcript") is not None:
            r[key] = seed_tts_error(r["text"], r["transcript"], r["language"])
    return records


def add_sim(rollout, codec: str | None = None) -> None:
    """Make `rollout`'s reward also report `sim` (module docstring): a CompositeReward of {main: the reward (weight
    1), sim: SpeakerSimilarityReward (weight 0)}, under `sum`, so the reward is the original's exactly."""
    from .reward.base import codec_of
    from .reward.composite import CompositeReward
    from .reward.speaker import SpeakerSimilarityReward

    reward = rollout.reward
    inner = reward.rewards.values() if isinstance(reward, CompositeReward) else [reward]
    if any(isinstance(r, SpeakerSimilarityReward) for r in inner):
        return
    if codec is None and codec_of(reward) is None:
        raise ValueError(
            f"--sim decodes the samples with the reward's codec, but {type(reward).__name__} has none; "
            "pass --sim_codec HKUSTAudio/xcodec2 (or a local X-codec2 directory)"
        )
    device = str(getattr(reward, "device", "cpu"))
    sim = SpeakerSimilarityReward(codec=codec, device=device)
    rollout.reward = CompositeReward({"main": reward, "sim": sim}, weights={"main": 1.0, "sim": 0.0})


def _means(records: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(records)}
    for name in names:
        values = [r[name] for r in records if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)]
        out[name] = sum(values) / len(values) if values else None
    out["truncation_rate"] = sum(bool(r.get("truncated")) for r in records) / max(len(records), 1)
    reasons = defaultdict(int)
    for r in records:
        reasons[r.get("reason", "ok")] += 1
    out["reasons"] = {k: v / max(len(records), 1) for k, v in sorted(reasons.items())}
    return out


def metric_names(records: list[dict[str, Any]]) -> list[str]:
    skip = {"text", "language", "truncated", "reason", "transcript"}
    names = sorted({k for r in records for k in r if k not in skip})
    return [n for n in TABLE_FIRST if n in names] + [n for n in names if n not in TABLE_FIRST]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{"overall": means, "per_language": {lang: means}}; means skip None (not measured) values."""
    names = metric_names(records)
    by_lang: dict[str, list] = defaultdict(list)
    for r in records:
        by_lang[r.get("language") or "unknown"].append(r)
    return {
        "overall": _means(records, names),
        "per_language": {lang: _means(rs, names) for lang, rs in sorted(by_lang.items())},
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(summary: dict[str, Any]) -> str:
    """One row for all samples, one per language; columns: n, reward, cer, nll, other metrics."""
    overall = summary["overall"]
    cols = ["n"] + [k for k in overall if k not in ("n", "reasons")]
    lines = ["| language | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = [("all", overall)] + list(summary["per_language"].items())
    for name, means in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(means.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_report(summary: dict[str, Any], records: list[dict[str, Any]], out_dir: str | Path, meta: dict | None = None) -> Path:
    """metrics.json (summary + meta), metrics.md (the table) and samples.jsonl under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({**(meta or {}), **summary}, indent=2))
    (out / "metrics.md").write_text(markdown_table(summary))
    with (out / "samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return out


def compare(before: str | Path, after: str | Path) -> str:
    """A markdown table of overall and per-language means of two reports (dirs or metrics.json files)."""
    load = lambda p: json.loads((Path(p) / "metrics.json" if Path(p).is_dir() else Path(p)).read_text())
    a, b = load(before), load(after)
    names = [k for k in a["overall"] if k not in ("n", "reasons") and k in b["overall"]]
    lines = ["| language | metric | before | after | change |", "|---|---|---|---|---|"]
    for lang in ["all"] + [x for x in a["per_language"] if x in b["per_language"]]:
        ma = a["overall"] if lang == "all" else a["per_language"][lang]
        mb = b["overall"] if lang == "all" else b["per_language"][lang]
        for k in names:
            va, vb = ma.get(k), mb.get(k)
            rel = f"{(vb - va) / abs(va):+.1%}" if va not in (None, 0) and vb is not None else "-"
            lines.append(f"| {lang} | {k} | {_fmt(va)} | {_fmt(vb)} | {rel} |")
    return "\n".join(lines) + "\n"


class ValidationReport(L.Callback):
    def __init__(self, out_dir: str | None = None, log_per_language: bool = True, meta: dict | None = None,
                 seed_tts: bool = False) -> None:
        """
        Args:
            out_dir: write metrics.json / metrics.md / samples.jsonl here after each validation
                (in fit: under `step_<N>/`); None only logs.
            log_per_language: log `val/lang_<xx>/<metric>_mean` when the data has 2+ languages.
            meta: written into metrics.json beside the metrics (e.g. the checkpoint evaluated).
            seed_tts: also score each transcript as Seed-TTS-eval does (WER en, CER zh; see the module doc).
        """
        super().__init__()
        self.out_dir = out_dir
        self.meta = meta or {}
        self.log_per_language = log_per_language
        self.seed_tts = seed_tts
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.records = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if "rollout" not in batch:
            raise RuntimeError("validation batch has no rollout: the `rollout:` config group (GRPORollout) makes it")
        self.records.extend(rollout_records(batch["rollout"], list(batch.get("language") or [])))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = self.records = concat_from_ranks(self.records)
        if not records or trainer.sanity_checking:
            return
        if self.seed_tts:
            add_seed_tts_scores(records)
        self.summary = summarize(records)
        if self.log_per_language and len(self.summary["per_language"]) > 1:
            stats = {
                f"val/lang_{lang}/{k}_mean": v
                for lang, means in self.summary["per_language"].items()
                for k, v in means.items() if isinstance(v, float) and k != "truncation_rate"
            }
            pl_module.log_dict(stats, on_step=False, on_epoch=True, rank_zero_only=False)
        if self.out_dir and trainer.is_global_zero:
            out = Path(self.out_dir) if trainer.state.fn != "fit" else Path(self.out_dir) / f"step_{trainer.global_step}"
            write_report(self.summary, records, out, {"global_step": trainer.global_step, **self.meta})


def trained_steps(ckpt_path: str | None) -> int | None:
    """Training steps behind a .ckpt or an exported dir (0 for the base model, None if unknown)."""
    if not ckpt_path:
        return 0
    path = Path(ckpt_path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        provenance = path / "lightning_grpo_export.json"
        return json.loads(provenance.read_text()).get("global_step") if provenance.exists() else None
    from .export import checkpoint_meta  # a .ckpt's header (mmap) or an FSDP2 directory's meta.pt, not the weights

    return checkpoint_meta(ckpt_path).get("global_step")


def default_out_dir(ckpt_path: str | None) -> str:
    """runs/eval/<run>-<checkpoint>: `last.ckpt` of two runs must not share (and overwrite) one report."""
    if not ckpt_path:
        return "runs/eval/base"
    path = Path(ckpt_path)
    run = path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name
    return f"runs/eval/{run}-{path.stem}" if run else f"runs/eval/{path.stem}"


def checkpoint_or_model(ckpt: str | None, flag: str = "--ckpt_path") -> tuple[str | None, list[str]]:
    """(the Lightning checkpoint to load, config overrides) for a `ckpt` that is a .ckpt file, an FSDP2 shard
    directory, or an exported HF directory (which becomes --model.model_name_or_path); None: the config's model."""
    if ckpt and Path(ckpt).is_dir() and not is_sharded_checkpoint(ckpt):  # an exported HF dir is a model
        return None, [f"--model.model_name_or_path={ckpt}"]
    if ckpt and not Path(ckpt).is_file() and not is_sharded_checkpoint(ckpt):
        raise FileNotFoundError(f"{flag}={ckpt} is neither a .ckpt file nor an exported HF directory")
    return ckpt, []


def check_writable(out_dir: str | Path) -> None:
    """Create `out_dir` and write a file into it, or raise naming --out_dir."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise PermissionError(f"--out_dir {out_dir} is not writable ({type(e).__name__}: {e}); choose a directory you can write") from None


class EvaluateCLI(GRPOCLI):
    """The fit config's parser with evaluate's own arguments beside model/data/rollout/trainer (so a --config file
    may set them too); it checks the checkpoint and the report directory before building anything."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Lightning .ckpt or HF dir (export); default: the config's model")
        parser.add_argument("--out_dir", type=Optional[str], default=None,
                            help="report directory (default runs/eval/<run>-<checkpoint name>)")
        parser.add_argument("--seed_tts", action="store_true",
                            help="also report Seed-TTS-eval's WER (en) / CER (zh) of the transcripts, as published tables do")
        parser.add_argument("--sim", action="store_true",
                            help="also report speaker similarity (sim) of rows with a voice-cloning reference (GE2E encoder)")
        parser.add_argument("--sim_codec", type=Optional[str], default=None,
                            help="X-codec2 checkpoint for --sim when the config's reward has no codec (RemoteReward)")

    def before_instantiate_classes(self) -> None:
        ckpt = self.config.ckpt_path
        self.lightning_ckpt, model = checkpoint_or_model(ckpt)
        if model:  # an exported HF dir is a model
            self.config.model.model_name_or_path = ckpt
        elif ckpt:
            from .export import check_checkpoint

            check_checkpoint(ckpt)
        self.config.out_dir = self.config.out_dir or default_out_dir(ckpt)
        check_writable(self.config.out_dir)  # before the evaluation, which a report that cannot be written would lose


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """`evaluate [--ckpt_path P] [--out_dir D] --config fit.yaml [fit overrides...]` or `evaluate --compare A B`."""
    from jsonargparse import ArgumentParser

    words = sys.argv[1:] if argv is None else list(argv)
    if "--compare" in words:
        parser = ArgumentParser(prog="python -m lightning_grpo evaluate", description="Print a before/after table.")
        parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), required=True,
                            help="two report directories (or metrics.json files) of evaluate")
        print(compare(*parser.parse_args(words).compare))
        return None
    # after the user's --config and arguments, so they override those
    cli = build_cli([*words, "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--model.beta=0"],
                    run=False, cli_class=EvaluateCLI)
    args = cli.config
    if not cli.datamodule.val_data:
        raise ValueError("--data.val_data is None: evaluate needs a test split (e.g. --data.val_data ~/data/llasa-tts-rl-grpo)")
    meta = {"ckpt_path": args.ckpt_path, "model": cli.model.hparams.model_name_or_path,
            "global_step": trained_steps(args.ckpt_path), "val_data": cli.datamodule.val_data}
    report = ValidationReport(out_dir=args.out_dir, meta=meta, seed_tts=args.seed_tts)
    if args.sim:
        add_sim(next(c for c in cli.trainer.callbacks if isinstance(c, GRPORollout)), args.sim_codec)
    cli.trainer.callbacks.append(report)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=cli.lightning_ckpt)
    if report.summary is None:
        raise RuntimeError("validation produced no samples: check --data.val_data and --trainer.limit_val_batches")
    print(markdown_table(report.summary))
    print(f"wrote {report.out_dir}/metrics.json, metrics.md, samples.jsonl")
    return report.summary
