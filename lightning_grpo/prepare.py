"""`python -m lightning_grpo prepare`: texts -> train.parquet / test.parquet in the LLaSA prompt layout.

Reads a HF datasets id or a local csv / jsonl / json / txt / parquet file, filters by length, holds out a
test split, and writes the original recipe's columns plus a `language` column:

    data_source   str    where the rows came from
    prompt        list   chat messages (lightning_grpo.llasa.prompt_messages): user + continued assistant
    ability       str    "text-to-speech"
    reward_model  struct {style: "rule", ground_truth: text}
    extra_info    struct {split, index, text}
    language      str    ISO code ("en", "ko") or null
    prompt_text   str    voice cloning: transcript of the reference clip, or null
    prompt_codes  list   voice cloning: the reference clip's X-codec2 codes, or null
    prompt_wav    str    the reference recording (absolute path), for speaker similarity, or null

A source row with `prompt_text` and `prompt_codes` (a list, or a string "12 7 93" in csv) becomes a voice-cloning
row: its `prompt` messages hold LLaSA's zero-shot layout (lightning_grpo.llasa.prompt_messages). Encode the
reference clips into codes beforehand with X-codec2's encoder (xcodec2's `XCodec2Model.encode_code`; it needs the
600M w2v-BERT 2.0 this package never loads). `prompt_wav` (relative paths are read from the source file's
directory) must exist; it may also come alone, as the target voice of the speaker-similarity reward.

    python -m lightning_grpo prepare --data_source texts.jsonl --local_dir ~/data/llasa-tts-rl-grpo
    python -m lightning_grpo prepare --data_source user/korean-tts --language ko --test_size 500 \
        --max_chars 200 --push_to_hub user/llasa-grpo-prompts --remote_dir hdfs://nn/data/llasa

Departures from the original: a row without text is an error naming the row (or dropped with
`--drop_empty`), never a silent empty prompt; the copy to a remote store takes any fsspec URL
(`--hdfs_dir` is kept as the original's name for it).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .data import _rows_from_file, _text_of, looks_like_path, missing_path_error, reference_fields
from .llasa import encode_prompt, prompt_messages

ABILITY = "text-to-speech"
SPLITS = ("train", "test")


def read_rows(data_source: str, split: str = "train") -> list[dict[str, Any]]:
    """Raw rows of a local file (csv/jsonl/json/txt/parquet) or of split `split` of a HF datasets id."""
    path = Path(data_source).expanduser()
    if path.is_file():
        return _rows_from_file(path)
    if path.is_dir():
        raise ValueError(f"--data_source={data_source} is a directory; pass one csv/jsonl/json/txt/parquet file")
    if looks_like_path(data_source):
        raise missing_path_error(data_source, "--data_source")
    import datasets

    return list(datasets.load_dataset(data_source, split=split))


def clean_texts(
    rows: list[dict[str, Any]],
    data_source: str,
    text_column: str = "text",
    language_column: str = "language",
    language: str | None = None,
    drop_empty: bool = False,
) -> tuple[list[dict[str, Any]], int]:
    """[{"text", "language", voice-cloning fields if any}] with whitespace stripped, and the number of empty rows
    dropped. An empty or missing text raises a ValueError naming the row, unless `drop_empty`; a bad reference
    (transcript without codes or the reverse, codes that are not integers, a missing, unreadable or too long
    wav) always does.
    """
    path = Path(data_source).expanduser()
    base_dir = path.parent if path.is_file() else None
    out, dropped = [], 0
    readable: dict[Path, str | None] = {}  # reference recordings already checked
    for i, row in enumerate(rows):
        text = _text_of(row, text_column)
        if not isinstance(text, str) or not text.strip():
            if drop_empty:
                dropped += 1
                continue
            raise ValueError(
                f"row {i} of {data_source!r} has no text in column {text_column!r} (got {text!r}); "
                "fix the row, name the column with --text_column, or pass --drop_empty to skip such rows"
            )
        reference = reference_fields(row, f"row {i} of {data_source!r}", base_dir, readable)
        if "prompt_text" in reference:
            reference["prompt_text"] = " ".join(reference["prompt_text"].split())
        out.append({"text": " ".join(text.split()), "language": row.get(language_column) or language, **reference})
    return out, dropped


def length_filter(
    rows: list[dict[str, Any]],
    min_chars: int = 1,
    max_chars: int | None = None,
    max_prompt_tokens: int | None = None,
    tokenizer=None,
) -> list[dict[str, Any]]:
    """Rows whose text has min_chars..max_chars characters and whose prompt (reference codes included) fits
    max_prompt_tokens."""
    keep = [r for r in rows if len(r["text"]) >= min_chars and (max_chars is None or len(r["text"]) <= max_chars)]
    if max_prompt_tokens is not None:
        if tokenizer is None:
            raise ValueError("--max_prompt_tokens needs --tokenizer (the policy's HF id or dir, or builtin:tiny-llasa)")
        keep = [r for r in keep if len(encode_prompt(tokenizer, r["text"], prompt_text=r.get("prompt_text"),
                                                     prompt_codes=r.get("prompt_codes"))) <= max_prompt_tokens]
    return keep


def split_rows(rows: list[dict[str, Any]], test_size: float, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Shuffle (seeded) and hold out `test_size` rows (a count if >= 1, else a fraction, at least 1)."""
    if test_size < 0:
        raise ValueError(f"--test_size={test_size} must be >= 0 (a fraction < 1 or a row count)")
    if test_size >= 1:
        n_test = int(test_size)
    else:  # a fraction; any positive fraction keeps at least one test row
        n_test = max(1, round(test_size * len(rows))) if test_size > 0 else 0
    if n_test >= len(rows):
        raise ValueError(f"--test_size={test_size} leaves no training rows out of {len(rows)}; lower it")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return {"train": [rows[i] for i in train], "test": [rows[i] for i in test]}


def to_records(rows: list[dict[str, Any]], split: str, data_source: str) -> list[dict[str, Any]]:
    """The parquet rows of one split, in the original recipe's columns plus `language` and the voice-cloning ones."""
    return [
        {
            "data_source": data_source,
            "prompt": prompt_messages(r["text"], r.get("prompt_text"), r.get("prompt_codes")),
            "ability": ABILITY,
            "reward_model": {"style": "rule", "ground_truth": r["text"]},
            "extra_info": {"split": split, "index": i, "text": r["text"]},
            "language": r["language"],
            "prompt_text": r.get("prompt_text"),
            "prompt_codes": r.get("prompt_codes"),
            "prompt_wav": r.get("prompt_wav"),
        }
        for i, r in enumerate(rows)
    ]


def write_parquet(records: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()), ("text", pa.string())])),
        ("language", pa.string()),
        ("prompt_text", pa.string()),
        ("prompt_codes", pa.list_(pa.int32())),
        ("prompt_wav", pa.string()),
    ])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)


def copy_to_remote(local_dir: Path, remote_dir: str) -> list[str]:
    """Copy {split}.parquet to any fsspec URL (hdfs://, s3://, gs://, file://, memory://); returns the paths."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(remote_dir)
    fs.makedirs(root, exist_ok=True)
    written = []
    for split in SPLITS:
        target = f"{root.rstrip('/')}/{split}.parquet"
        fs.put_file(str(local_dir / f"{split}.parquet"), target)
        written.append(target)
    return written


def upload_to_hub(local_dir: Path, repo_id: str, private: bool = True) -> None:
    """Upload both splits as one HF dataset (needs `huggingface-cli login` or HF_TOKEN)."""
    import datasets

    files = {split: str(local_dir / f"{split}.parquet") for split in SPLITS}
    datasets.load_dataset("parquet", data_files=files).push_to_hub(repo_id, private=private)


def prepare(
    data_source: str,
    local_dir: str = "~/data/llasa-tts-rl-grpo",
    source_split: str = "train",
    test_split: str | None = None,
    test_size: float = 0.1,
    seed: int = 0,
    text_column: str = "text",
    language_column: str = "language",
    language: str | None = None,
    drop_empty: bool = False,
    min_chars: int = 1,
    max_chars: int | None = None,
    max_prompt_tokens: int | None = None,
    tokenizer: str | None = None,
    push_to_hub: str | None = None,
    remote_dir: str | None = None,
    hdfs_dir: str | None = None,
) -> dict[str, int]:
    """Write train.parquet and test.parquet for GRPO training; returns the row count of each split.

    Args:
        data_source: a HF datasets id, or a local .csv / .jsonl / .json / .txt (one text a line) / .parquet.
        local_dir: output directory (created); `--data.train_data <local_dir>` trains on it.
        source_split: the split of a HF dataset to read.
        test_split: take the test rows from this split of the same HF dataset instead of holding out
            `test_size` rows of `source_split`.
        test_size: held-out test rows: a fraction (< 1, at least one row) or a count (>= 1).
        seed: seed of the train/test shuffle.
        text_column: column holding the text (rows of an earlier `prepare` output are read too).
        language_column: column holding an ISO language code, if any.
        language: language of rows without one ("en", "ko"); None leaves it to the reward's default.
        drop_empty: drop rows with empty or missing text (default: stop with an error naming the row).
        min_chars / max_chars: keep texts with this many characters (after whitespace collapsing).
        max_prompt_tokens: drop texts whose prompt (with its reference codes) exceeds this many tokens of
            `tokenizer` (match the fit config's `max_prompt_length`, 512 in the original).
        tokenizer: HF id or local dir of the policy's tokenizer, or `builtin:tiny-llasa`.
        push_to_hub: also upload the two splits to this HF dataset repo (private).
        remote_dir: also copy the two files to this fsspec URL (hdfs://..., s3://..., file://...).
        hdfs_dir: the original recipe's name for remote_dir.
    """
    out = Path(local_dir).expanduser()
    if test_split is not None:
        sources = {"train": read_rows(data_source, source_split), "test": read_rows(data_source, test_split)}
    else:
        sources = {"all": read_rows(data_source, source_split)}
    tok = None
    if max_prompt_tokens is not None and tokenizer is not None:
        from .policy import load_model_and_tokenizer

        if tokenizer.startswith("builtin:"):
            tok = load_model_and_tokenizer(tokenizer)[1]
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer)
    kept: dict[str, list[dict[str, Any]]] = {}
    for name, raw in sources.items():
        rows, dropped = clean_texts(raw, data_source, text_column, language_column, language, drop_empty)
        filtered = length_filter(rows, min_chars, max_chars, max_prompt_tokens, tok)
        print(f"{data_source} [{name}]: {len(raw)} rows, {dropped} empty dropped, "
              f"{len(rows) - len(filtered)} outside the length limits, {len(filtered)} kept")
        kept[name] = filtered
    splits = kept if test_split is not None else split_rows(kept["all"], test_size, seed)
    for split in SPLITS:
        if not splits[split] and not (split == "test" and test_size == 0):
            raise ValueError(f"split {split!r} of {data_source!r} is empty after filtering; relax the length limits")
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_parquet(to_records(splits[split], split, data_source), out / f"{split}.parquet")
    print(f"wrote {out}/train.parquet ({len(splits['train'])} rows) and test.parquet ({len(splits['test'])} rows)")
    remote = remote_dir or hdfs_dir
    if remote:
        print("copied to", ", ".join(copy_to_remote(out, remote)))
    if push_to_hub:
        upload_to_hub(out, push_to_hub)
        print(f"pushed to https://huggingface.co/datasets/{push_to_hub}")
    return {split: len(splits[split]) for split in SPLITS}


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_grpo prepare", description=__doc__.split("\n\n")[0])
    parser.add_function_arguments(prepare)
    cfg = parser.parse_args(argv)
    prepare(**{k: v for k, v in vars(cfg).items() if k != "config"})
