"""Prompt data: batches of texts, one batch per step over all ranks.

`PromptDataModule` yields batches of prompt texts ({"text": [...], "language": [...]}) from
an embedded prompt set (`builtin:en`, shipped in the package, so the default run needs no download),
a local parquet / jsonl / json / csv / txt file, a directory holding `{split}.parquet` (the layout
`python -m lightning_grpo prepare` and the original recipe write), or a HF datasets id.
The rollout callback turns each batch into a `Rollout` (batch.py) before `training_step` sees it.

Voice-cloning rows (LLaSA's zero-shot prompt, llasa.encode_prompt) carry a reference clip: `prompt_text` (its
transcript) with `prompt_codes` (its X-codec2 codes: a list of ints, or a string "12 7 93" / "[12, 7, 93]" in
csv), and optionally `prompt_wav` (the recording, for speaker similarity; a relative path is read from the data
file's directory). A row may also give `prompt_wav` alone: the prompt is then a plain TTS prompt and the clip
only the target voice of the speaker-similarity reward. Batches carry these keys only when a row of the batch
has them, so data without references gives the batches it always did.
"""

from __future__ import annotations

import csv
import hashlib
import json
import numbers
from pathlib import Path
from typing import Any, Callable, Collection, Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .llasa import MAX_REFERENCE_SECONDS, check_reference

ASSETS = Path(__file__).parent / "assets"


DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".txt")


def _rows_from_file(path: Path) -> list[dict[str, Any]]:
    """The rows of a data file; a file that does not parse, is not UTF-8 or holds other than objects (one per
    row) is a ValueError naming the file and the line or row."""
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"prompt file {path} has suffix {suffix!r}; use .parquet, .jsonl, .json, .csv or .txt")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text (line {line}: byte {e.object[e.start]:#04x}); save it as UTF-8") from None
    if suffix == ".csv":
        rows: list[Any] = list(csv.DictReader(text.splitlines()))
    elif suffix == ".txt":
        rows = [{"text": line} for line in text.splitlines()]
    elif suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    else:  # JSON lines
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}: line {n}, column {e.colno}: not valid JSON ({e.msg}); each line must be one object "
                        'like {"text": "..."}'
                    ) from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}: row {i} is a {type(row).__name__} ({str(row)[:40]!r}), not an object; write rows like "
                '{"text": "..."}, or put plain sentences in a .txt file, one per line'
            )
    return rows


def looks_like_path(source: str) -> bool:
    """Whether a data source that is no local file was meant as one rather than a HF datasets id (owner/name)."""
    first = source.split("/", 1)[0]
    return (source.lower().endswith(DATA_SUFFIXES) or source.startswith(("/", ".", "~")) or source.count("/") > 1
            or ("/" in source and Path(first).is_dir()))


def missing_path_error(source: str, flag: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{flag} {source!r}: no such file or directory ({Path(source).expanduser().absolute()}); fix the path "
        "(a HF datasets id looks like owner/name)"
    )


def _text_of(row: dict[str, Any], text_column: str) -> Any:
    """The ground-truth text of a row: `text_column`, else the original recipe's nested fields."""
    if text_column in row:
        return row[text_column]
    rm = row.get("reward_model")
    if isinstance(rm, dict) and "ground_truth" in rm:
        return rm["ground_truth"]
    extra = row.get("extra_info")
    if isinstance(extra, dict) and "text" in extra:
        return extra["text"]
    return None


REFERENCE_COLUMNS = ("prompt_text", "prompt_codes", "prompt_wav")


def parse_codes(value: Any, where: str) -> list[int] | None:
    """prompt_codes of a row as a list of ints (None when absent); strings are JSON lists or space/comma separated."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [int(x) for x in text.replace(",", " ").split()]
        except ValueError as err:
            raise ValueError(f"{where}: prompt_codes {value[:40]!r} is not a list of integers ({err})") from None
    try:
        codes = [_code(c) for c in value]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: prompt_codes must be a list of integer codec codes, got {str(value)[:60]!r}") from None
    if any(c < 0 for c in codes):
        raise ValueError(f"{where}: prompt_codes must be non-negative integer codec codes (X-codec2: 0..65535)")
    return codes or None


def _code(c: Any) -> int:
    """One codec code: an integer (Python or numpy), a float with an integer value (parquet, pandas), or a decimal
    string; a fraction or a boolean is an error, never rounded or taken as 0/1."""
    if isinstance(c, (bool, np.bool_)):
        raise ValueError(f"{c!r} is a boolean")
    if isinstance(c, numbers.Integral):
        return int(c)
    if isinstance(c, numbers.Real):
        if not float(c).is_integer():
            raise ValueError(f"{c!r} is not an integer")
        return int(c)
    return int(c)  # a string: int() refuses "1.5" and "x"


def reference_problem(path: str | Path, max_seconds: float = MAX_REFERENCE_SECONDS) -> str | None:
    """Why the recording at `path` cannot serve as a reference (unreadable, truncated, empty, too long), else
    None. Reads the header and the last frame only."""
    import soundfile as sf

    try:
        f = sf.SoundFile(str(path))
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError by file kind
        return f"is not audio soundfile reads ({type(e).__name__}: {e}); re-export it as WAV or FLAC"
    with f:
        frames, rate = f.frames, f.samplerate
        try:
            if frames > 0:
                f.seek(frames - 1)  # a compressed file cut short fails here (libsndfile shortens a cut WAV itself)
                if len(f.read(1)) != 1:
                    raise EOFError("no last frame")
        except Exception as e:
            return f"is truncated or corrupt: its header promises {frames} frames ({type(e).__name__}: {e}); re-export it"
    if frames == 0:
        return "holds no audio"
    if frames / rate > max_seconds:
        return (f"is {frames / rate:.1f} s long, more than the {max_seconds:g} s a reference may last (a speaker "
                "embedding needs seconds); cut a shorter clip")
    return None


def reference_fields(row: dict[str, Any], where: str, base_dir: Path | None,
                     readable: dict[Path, str | None] | None = None) -> dict[str, Any]:
    """The voice-cloning columns a row gives (none for a plain row), checked: transcript and codes together,
    a wav path to a recording soundfile reads to its end, at most MAX_REFERENCE_SECONDS long (relative paths
    resolved against `base_dir`). `readable` remembers the recordings already checked (rows share them)."""
    out: dict[str, Any] = {}
    prompt_text = row.get("prompt_text")
    if prompt_text is not None and not isinstance(prompt_text, str):
        raise ValueError(f"{where}: prompt_text must be a string, got {type(prompt_text).__name__}")
    prompt_text = prompt_text.strip() if prompt_text else None
    codes = parse_codes(row.get("prompt_codes"), where)
    try:
        check_reference(prompt_text, codes)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if prompt_text:
        out["prompt_text"], out["prompt_codes"] = prompt_text, codes
    wav = row.get("prompt_wav")
    if isinstance(wav, str) and wav.strip():
        path = Path(wav.strip()).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ValueError(f"{where}: prompt_wav {wav!r} is not a file ({path}); fix the path or leave the column empty")
        problem = readable[path] if readable is not None and path in readable else reference_problem(path)
        if readable is not None:
            readable[path] = problem
        if problem:
            raise ValueError(f"{where}: prompt_wav {wav!r} ({path}) {problem}")
        out["prompt_wav"] = str(path)
    elif wav is not None and not isinstance(wav, str):
        raise ValueError(f"{where}: prompt_wav must be a path string, got {type(wav).__name__}")
    return out


def load_prompts(
    source: str, split: str = "train", text_column: str = "text", language_column: str = "language", default_language: str | None = None
) -> list[dict[str, Any]]:
    """Read prompt rows [{"text": str, "language": str | None}] from any supported source; voice-cloning rows
    also carry prompt_text + prompt_codes and/or prompt_wav (module docstring)."""
    if source.startswith("builtin:"):
        path = ASSETS / f"prompts_{source.split(':', 1)[1]}_{split}.jsonl"
        if not path.exists():
            known = sorted({p.name.split("_")[1] for p in ASSETS.glob("prompts_*_*.jsonl")})
            raise ValueError(f"no embedded prompt set {source!r} with split {split!r}; known: {known}")
        raw = _rows_from_file(path)
        base_dir = None
    elif Path(source).expanduser().is_dir():
        path = Path(source).expanduser() / f"{split}.parquet"
        if not path.exists():
            raise ValueError(f"{path} does not exist: a data directory needs {split}.parquet (see `prepare`)")
        raw = _rows_from_file(path)
        base_dir = path.parent
    elif Path(source).expanduser().is_file():
        raw = _rows_from_file(Path(source).expanduser())
        base_dir = Path(source).expanduser().parent
    elif looks_like_path(source):
        raise missing_path_error(source, "prompt data")
    else:
        import datasets

        raw = list(datasets.load_dataset(source, split=split))
        base_dir = None
    rows = []
    readable: dict[Path, str | None] = {}  # reference recordings already checked -> why not readable
    for i, row in enumerate(raw):
        text = _text_of(row, text_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"row {i} of {source!r} (split {split!r}) has no text in column {text_column!r} "
                f"(got {text!r}); drop the row or set --data.text_column"
            )
        where = f"row {i} of {source!r} (split {split!r})"
        rows.append({"text": text.strip(), "language": row.get(language_column) or default_language,
                     **reference_fields(row, where, base_dir, readable)})
    if not rows:
        raise ValueError(f"{source!r} (split {split!r}) has no rows")
    return rows


class EpochPermutation(DistributedSampler):
    """A fresh permutation of the rows every epoch, seeded by `seed + epoch` (Lightning calls
    `set_epoch`), plus what resuming needs: a resumed run rebuilds the interrupted epoch's
    permutation from the checkpoint's seed and skips the rows already used.

    Nothing here draws from the global RNG after the seed, so the sampling stream a checkpoint
    restores is not disturbed by starting a new epoch, whether the run stopped mid-epoch or at an
    epoch's end. Under DDP each of `num_replicas` ranks takes every num_replicas-th row of the same
    permutation (rank 0's seed is broadcast), after dropping the tail that does not divide evenly.
    It subclasses DistributedSampler only so that Lightning uses it as is instead of wrapping it.
    """

    def __init__(self, num_rows: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 resume_epoch: int | None = None, skip: int = 0) -> None:
        super().__init__(range(num_rows), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed, drop_last=True)
        self.num_rows = num_rows
        self.resume_epoch, self.skip = resume_epoch, skip  # skip: rows of this rank's shard already used
        self._seed_shared = num_replicas == 1

    def __len__(self) -> int:
        return self.num_rows // self.num_replicas

    def __iter__(self):
        if not self._seed_shared:  # a collective: every rank starts its first epoch together
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                box = [self.seed]
                torch.distributed.broadcast_object_list(box, src=0)
                self.seed = box[0]
            self._seed_shared = True
        skip = self.skip if self.epoch == self.resume_epoch else 0
        self.resume_epoch = None
        yield from self.shard(self.epoch)[skip:]

    def shard(self, epoch: int) -> list[int]:
        """This rank's rows of `epoch`, in order (the whole epoch, whatever a resume skips)."""
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return order[: len(self) * self.num_replicas][self.rank :: self.num_replicas]


def topup_rows(num_rows: int, seed: int, step: int, rank: int, world: int, start: int, count: int,
               skip: Collection[int] = ()) -> list[int]:
    """Row indices of `count` further prompts for training rollout `step` on `rank` (dynamic sampling): positions
    start .. start+count-1 of this rank's share of a permutation seeded by (seed, step) alone, so a resumed run
    draws the same ones. Rows in `skip` (the step's own prompts) are left out while at least `world` others
    remain; ranks take every world-th row of the same permutation, so no two ranks draw the same row in a step;
    past the end of its share a rank starts it again (a prompt drawn twice in the step)."""
    g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + step + 1) % 2**63)
    order = torch.randperm(num_rows, generator=g).tolist()
    skip = set(skip)
    rest = [i for i in order if i not in skip] if skip else order
    share = (rest if len(rest) >= world else order)[rank::world]  # every row in the step already: draw them again
    return [share[(start + k) % len(share)] for k in range(count)]


class _Rows(Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, list]:
    """{"text": [...], "language": [...]}, plus the voice-cloning keys (None for rows without) when any row has one."""
    batch = {"text": [r["text"] for r in rows], "language": [r["language"] for r in rows]}
    for key in REFERENCE_COLUMNS:
        if any(r.get(key) is not None for r in rows):
            batch[key] = [r.get(key) for r in rows]
    return batch


class PromptDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_data: str = "builtin:en",
        val_data: str | None = "builtin:en",
        train_split: str = "train",
        val_split: str = "test",
        prompts_per_step: int = 8,
        val_prompts_per_step: int = 8,
        text_column: str = "text",
        language_column: str = "language",
        default_language: str | None = None,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        num_workers: int = 0,
        on_data_change: Literal["error", "warn"] = "error",
    ) -> None:
        """
        Args:
            train_data: `builtin:en`, a parquet/jsonl/json/csv/txt file, a directory with
                `{split}.parquet`, or a HF datasets id.
            val_data: same forms; None disables validation.
            prompts_per_step: prompts per step (one rollout) over ALL ranks (the original: 8); each
                rank takes prompts_per_step / world_size. Times rollout.group_size = samples per step.
            val_prompts_per_step: prompts per validation batch, also over ALL ranks (each rank takes
                val_prompts_per_step / world_size); times rollout.val_group_size = samples per batch.
            text_column / language_column: column names; nested `reward_model.ground_truth` and
                `extra_info.text` (the original recipe's parquet) are read when text_column is absent.
            default_language: language for rows without one (None: the reward's default).
            max_train_samples / max_val_samples: keep only the first n rows.
            on_data_change: a checkpoint keeps a fingerprint of the training rows; resuming on other rows (an
                edited file, another max_train_samples) would silently draw another order from the same seed.
                "error" stops the resume naming both fingerprints; "warn" resumes anyway.
        """
        super().__init__()
        if prompts_per_step < 1:
            raise ValueError(f"--data.prompts_per_step={prompts_per_step} must be >= 1")
        if val_prompts_per_step < 1:
            raise ValueError(f"--data.val_prompts_per_step={val_prompts_per_step} must be >= 1")
        self.train_data, self.val_data = train_data, val_data
        self.train_split, self.val_split = train_split, val_split
        self.prompts_per_step = prompts_per_step
        self.val_prompts_per_step = val_prompts_per_step
        self.text_column, self.language_column = text_column, language_column
        self.default_language = default_language
        self.max_train_samples, self.max_val_samples = max_train_samples, max_val_samples
        self.num_workers = num_workers
        if on_data_change not in ("error", "warn"):
            raise ValueError(f"--data.on_data_change={on_data_change!r} must be error or warn")
        self.on_data_change = on_data_change
        self._fingerprint: str | None = None
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []
        self._resume: dict[str, int] = {}
        self._order: EpochPermutation | None = None

    def per_rank_batch_size(self, key: str = "prompts_per_step") -> int:
        """This rank's share of `prompts_per_step` (or `val_prompts_per_step`), both counted over all ranks."""
        world = self.trainer.world_size if self.trainer is not None else 1
        total = getattr(self, key)
        if total % world:
            raise ValueError(
                f"--data.{key}={total} is not divisible by the {world} training processes; use a multiple of {world}"
            )
        return total // world

    def _load(self, source: str, split: str, limit: int | None) -> list[dict[str, Any]]:
        rows = load_prompts(source, split, self.text_column, self.language_column, self.default_language)
        return rows[:limit] if limit else rows

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.train_rows:
            self.train_rows = self._load(self.train_data, self.train_split, self.max_train_samples)
        if stage in ("fit", "validate") and self.val_data and not self.val_rows:
            self.val_rows = self._load(self.val_data, self.val_split, self.max_val_samples)

    def train_dataloader(self) -> DataLoader:
        batch = self.per_rank_batch_size()
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if len(self.train_rows) < batch * world:
            raise ValueError(
                f"{self.train_data!r} has {len(self.train_rows)} prompts, fewer than the {batch * world} one "
                "step needs; lower --data.prompts_per_step or add prompts"
            )
        resume = self._resume if self.trainer is not None else {}
        self._resume = {}
        # one draw per fit (or the checkpoint's seed); the loader gets its own generator so that
        # starting an epoch never draws from the global RNG the sampling stream lives in
        seed = resume["seed"] if "seed" in resume else int(torch.empty((), dtype=torch.int64).random_().item())
        self._order = EpochPermutation(len(self.train_rows), seed, world, rank,
                                       resume_epoch=resume.get("epoch"), skip=resume.get("batches", 0) * batch)
        return DataLoader(
            _Rows(self.train_rows), batch_size=batch, sampler=self._order, drop_last=True,
            collate_fn=collate_prompts, num_workers=self.num_workers, generator=torch.Generator().manual_seed(seed),
        )

    def fingerprint(self) -> str:
        """A hash of the training rows in order (texts, languages, references; a recording by its file name, so a
        moved data directory is the same data): what a checkpoint's data position and seed refer to."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for row in self.train_rows:
                if row.get("prompt_wav"):
                    row = {**row, "prompt_wav": Path(row["prompt_wav"]).name}
                digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\n")
            self._fingerprint = f"{len(self.train_rows)} rows, sha256 {digest.hexdigest()[:16]}"
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """Where the training data stands (epoch, its seed, batches used in it, the rows' fingerprint), saved in
        every checkpoint."""
        t = self.trainer
        if t is None or t.state.fn != "fit" or self._order is None:
            return {}
        return {"epoch": t.current_epoch, "seed": self._order.seed,
                "batches": t.fit_loop.epoch_loop.batch_progress.current.processed, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("fingerprint")
        if saved is not None and self.train_rows and saved != self.fingerprint():
            message = (
                f"--data.train_data {self.train_data!r} is not the data this checkpoint trained on (checkpoint: "
                f"{saved}; now: {self.fingerprint()}): resuming would draw another order of prompts from the same seed"
            )
            if self.on_data_change == "error":
                raise ValueError(f"{message}. Restore the data, or pass --data.on_data_change warn to resume anyway")
            rank_zero_warn(message)
        self._resume = {k: v for k, v in state_dict.items() if k != "fingerprint"}

    def check_rows(self, check: Callable[[dict[str, Any]], Any]) -> None:
        """Run `check` on every loaded row, training and validation (the rollout encodes each prompt, so a prompt
        over --rollout.max_prompt_length stops the run at its start, not at the step that draws it); a ValueError
        it raises names the data source and the row."""
        for source, split, rows in ((self.train_data, self.train_split, self.train_rows),
                                    (self.val_data, self.val_split, self.val_rows)):
            for i, row in enumerate(rows):
                try:
                    check(row)
                except ValueError as e:
                    raise ValueError(f"row {i} of {source!r} (split {split!r}): {e}") from None

    def train_batch(self, epoch: int, index: int) -> dict[str, list]:
        """The batch the training loader yields as the `index`-th of `epoch` on this rank (counted from the epoch's
        start; an index past its end is the next epoch's), without touching the loader: what a one-step-off rollout
        (`--rollout.async_steps 1`) generates from while the step before it trains."""
        if self._order is None:
            raise RuntimeError("train_batch reads the training data's order: call train_dataloader() first")
        size = self.per_rank_batch_size()
        per_epoch = len(self._order) // size
        epoch, index = epoch + index // per_epoch, index % per_epoch
        rows = self._order.shard(epoch)[index * size : (index + 1) * size]
        return collate_prompts([self.train_rows[i] for i in rows])

    def topup_prompts(self, count: int, step: int, start: int, exclude: Collection[str] = ()) -> dict[str, list]:
        """A batch of `count` further training prompts for training rollout `step` on this rank
        (`--rollout.dynamic_sampling`): the `start`-th on of this rank's top-up draw for the step (`topup_rows`,
        seeded by the data seed a checkpoint keeps, so resuming draws the same), leaving out rows whose text is in
        `exclude` (the step's prompts on every rank) while others last. Voice-cloning rows carry their reference."""
        if self._order is None:
            raise RuntimeError("topup_prompts draws with the training data's seed: call train_dataloader() first")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        skip = {i for i, row in enumerate(self.train_rows) if row["text"] in exclude} if exclude else set()
        rows = topup_rows(len(self.train_rows), self._order.seed, step, rank, world, start, count, skip)
        return collate_prompts([self.train_rows[i] for i in rows])

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        return DataLoader(
            _Rows(self.val_rows), batch_size=self.per_rank_batch_size("val_prompts_per_step"), shuffle=False,
            collate_fn=collate_prompts, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(0),  # its iterator must not draw from the global RNG
        )
