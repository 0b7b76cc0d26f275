"""Audio samples of the rollouts, every N steps, to W&B, TensorBoard and/or files in the run directory.

TRL logs completions as text only; a TTS run needs to be heard. `AudioSampleLogger` takes the rollout
the GRPO callback just scored, picks the best and the worst completion of each prompt, decodes their
codes to audio with its own decoder (`codec:`, built on the logging rank at the first logged step) or, when that
is null, the codec of a reward that scores in this process (`WhisperReward.codec`), and logs one table per step
with text, transcript, CER, NLL, reward and reason:

    W&B (WandbLogger, also WANDB_MODE=offline)   a wandb.Table with wandb.Audio cells under `samples/train`
    TensorBoard (TensorBoardLogger)              add_audio per sample and the table as markdown text
    files (CSVLogger, no logger, or always)      <log_dir>/samples/<split>/step_<N>/<j>.wav, index.csv, index.md

A reward in an owner process or behind a server (SharedReward, RemoteReward) has no codec in the trainer: give
the logger `codec: HKUSTAudio/xcodec2` for audio (X-codec2's decoder half on `codec_device`, CPU by default: the
training GPUs have no room for it). Without any codec the table has no audio, and the logger says so once.
Add it with `--trainer.callbacks+=lightning_grpo.sample_logging.AudioSampleLogger` or in YAML.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from .batch import rollout_records
from .llasa import parse_completion
from .reward.base import codec_of
from .reward.codec import SpeechDecoder, XCodec2Decoder

FIXED_COLUMNS = ("step", "sample", "text", "transcript", "reward", "reason", "completion_length", "truncated")


def pick_rows(rewards: torch.Tensor, group_size: int, max_samples: int) -> list[int]:
    """Best then worst row of each group, prompt by prompt, at most max_samples rows (no repeats)."""
    rows: list[int] = []
    for g in range(rewards.shape[0] // group_size):
        group = rewards[g * group_size : (g + 1) * group_size]
        for j in (int(group.argmax()), int(group.argmin())):
            if g * group_size + j not in rows and len(rows) < max_samples:
                rows.append(g * group_size + j)
    return rows


def decode_rows(codec, completion_ids: list[list[int]], vocab, rows: list[int]) -> list[torch.Tensor | None]:
    """Waveforms (1-D float32 CPU, clamped to [-1, 1]) of the completions `rows`; None for empty speech."""
    codes = [parse_completion(completion_ids[i], vocab, "drop").codes for i in rows]
    nonempty = [j for j, c in enumerate(codes) if c]
    audio: list[torch.Tensor | None] = [None] * len(rows)
    for j, wave in zip(nonempty, codec.decode([codes[j] for j in nonempty]) if nonempty else []):
        audio[j] = wave.detach().float().cpu().clamp(-1.0, 1.0)
    return audio


class AudioSampleLogger(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 50,
        max_samples: int = 8,
        log_validation: bool = True,
        write_files: bool | None = None,
        out_dir: str | None = None,
        codec: str | Callable[[], SpeechDecoder] | SpeechDecoder | None = None,
        codec_device: str = "cpu",
    ) -> None:
        """
        Args:
            every_n_steps: log the training rollout of every n-th step (the first step included).
            max_samples: rows per table: the best and the worst completion of each prompt, in order.
            log_validation: also log the first validation batch of each validation run.
            write_files: write wav files and index.csv / index.md; None = only when no W&B logger is used.
            out_dir: where files go; default `<logger log_dir or default_root_dir>/samples`.
            codec: the decoder of the logged audio, built on the logging rank only, at the first logged step:
                an X-codec2 checkpoint (HF id or directory) for XCodec2Decoder on `codec_device`, or a
                SpeechDecoder (`class_path` in YAML). None: the reward's codec if it scores in this process.
            codec_device: where an X-codec2 checkpoint named by `codec` decodes.
        """
        super().__init__()
        if every_n_steps < 1 or max_samples < 1:
            raise ValueError("--every_n_steps and --max_samples must be >= 1")
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples
        self.log_validation = log_validation
        self.write_files = write_files
        self.out_dir = out_dir
        self.codec = codec
        self.codec_device = codec_device
        self._decoder: SpeechDecoder | None = None
        self.batches_seen = 0  # training batches, in the checkpoint so a resumed run keeps the cadence
        self._warned = False

    # -- hooks -----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seen, self.batches_seen = self.batches_seen, self.batches_seen + 1
        if seen % self.every_n_steps == 0 and "rollout" in batch:
            self.log_rollout(trainer, batch["rollout"], "train", step=seen)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.log_validation and batch_idx == 0 and not trainer.sanity_checking and "rollout" in batch:
            self.log_rollout(trainer, batch["rollout"], "val", step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = state_dict["batches_seen"]

    # -- the work --------------------------------------------------------------------------
    def _rollout_callback(self, trainer):
        from .rollout import GRPORollout

        found = [c for c in trainer.callbacks if isinstance(c, GRPORollout)]
        return found[0] if found else None

    def sample_rows(self, trainer, rollout) -> tuple[list[dict[str, Any]], list[torch.Tensor | None], int]:
        """(table rows, waveforms or None per row, sample rate) of the picked rows of a rollout."""
        cb = self._rollout_callback(trainer)
        codec = self.decoder(getattr(cb, "reward", None))
        picked = pick_rows(rollout.rewards.detach().cpu(), rollout.group_size, self.max_samples)
        rows = [{"sample": j, **rec} for j, rec in enumerate(rollout_records(rollout, rows=picked))]
        for row in rows:
            row.pop("language")
            row["transcript"] = row["transcript"] or ""
        audio: list[torch.Tensor | None] = [None] * len(rows)
        sample_rate = int(getattr(codec, "sample_rate", 16_000))
        if codec is not None and cb is not None and rollout.completion_ids:
            try:
                audio = decode_rows(codec, rollout.completion_ids, cb.vocab, picked)
            except Exception as err:  # a logging aid must not stop training; say so once
                if not self._warned:
                    rank_zero_warn(f"AudioSampleLogger: the codec failed to decode samples ({err!r}); logging text only")
                    self._warned = True
        return rows, audio, sample_rate

    def decoder(self, reward: Any) -> SpeechDecoder | None:
        """This logger's decoder, built at its first use; else the codec of a reward scoring in this process."""
        if self._decoder is None and self.codec is not None:
            try:
                if isinstance(self.codec, str):
                    self._decoder = XCodec2Decoder(self.codec, device=self.codec_device)
                else:
                    self._decoder = self.codec if isinstance(self.codec, SpeechDecoder) else self.codec()
            except Exception as err:
                raise RuntimeError(f"AudioSampleLogger(codec={self.codec!r}) could not build its decoder: {err}") from err
        if self._decoder is not None:
            return self._decoder
        codec = codec_of(reward)
        if isinstance(codec, SpeechDecoder):
            return codec
        if not self._warned:
            rank_zero_warn(
                f"AudioSampleLogger: the reward ({type(reward).__name__}) has no codec in the trainer process (an owner "
                "process or a server scores it); logging text only. Set the logger's `codec:` (e.g. HKUSTAudio/xcodec2)"
            )
            self._warned = True
        return None

    def log_rollout(self, trainer, rollout, split: str, step: int) -> None:
        if not trainer.is_global_zero:
            return
        rows, audio, sr = self.sample_rows(trainer, rollout)
        for row in rows:
            row["step"] = step
        metric_cols = sorted({k for r in rows for k in r} - set(FIXED_COLUMNS))
        columns = list(FIXED_COLUMNS[:4]) + ["reward"] + metric_cols + list(FIXED_COLUMNS[5:])
        has_wandb = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                has_wandb = True
                import wandb

                data = [[r.get(c) for c in columns] + [wandb.Audio(a.numpy(), sample_rate=sr) if a is not None else None]
                        for r, a in zip(rows, audio)]
                logger.log_table(key=f"samples/{split}", columns=columns + ["audio"], data=data, step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                tb = logger.experiment
                tb.add_text(f"samples/{split}", markdown_rows(rows, columns), step)
                for r, a in zip(rows, audio):
                    if a is not None:
                        tb.add_audio(f"samples/{split}/{r['sample']}", a[None], step, sample_rate=sr)
        if self.write_files or (self.write_files is None and not has_wandb):
            self.write(trainer, split, step, rows, columns, audio, sr)

    def write(self, trainer, split: str, step: int, rows, columns, audio, sr: int) -> Path:
        import soundfile as sf

        root = Path(self.out_dir) if self.out_dir else Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        out = root / split / f"step_{step:06d}"
        out.mkdir(parents=True, exist_ok=True)
        for r, a in zip(rows, audio):
            r["audio"] = ""
            if a is not None:
                sf.write(out / f"{r['sample']}.wav", a.numpy(), sr)
                r["audio"] = str((out / f"{r['sample']}.wav").relative_to(root / split))
        (out / "index.md").write_text(markdown_rows(rows, columns + ["audio"]))
        index = root / split / "index.csv"
        new = not index.exists()
        with index.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns + ["audio"], extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)
        return out


def markdown_rows(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
