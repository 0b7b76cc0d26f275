"""`prepare`: the original's parquet columns, splits, filters, errors, remote copy and hub upload."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from lightning_grpo.cli import main
from lightning_grpo.data import PromptDataModule
from lightning_grpo.llasa import prompt_messages
from lightning_grpo.prepare import prepare

TEXTS = [f"Sentence number {i} is here." for i in range(10)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "texts.jsonl"
    rows = [{"text": t, "language": "ko" if i % 2 else None} for i, t in enumerate(TEXTS)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_cli_writes_the_original_columns_and_prompt_datamodule_reads_them(jsonl, tmp_path):
    out = tmp_path / "data"
    main(["prepare", "--data_source", str(jsonl), "--local_dir", str(out), "--test_size", "3",
          "--language", "en", "--seed", "1"])
    train = pq.read_table(out / "train.parquet").to_pylist()
    test = pq.read_table(out / "test.parquet").to_pylist()
    assert (len(train), len(test)) == (7, 3)
    assert {r["extra_info"]["text"] for r in train + test} == set(TEXTS)  # disjoint and complete
    row = test[0]
    text = row["reward_model"]["ground_truth"]
    assert row["prompt"] == prompt_messages(text)
    assert row["ability"] == "text-to-speech" and row["reward_model"]["style"] == "rule"
    assert row["extra_info"] == {"split": "test", "index": 0, "text": text}
    assert row["data_source"] == str(jsonl)
    by_text = {r["extra_info"]["text"]: r["language"] for r in train + test}
    assert by_text[TEXTS[1]] == "ko" and by_text[TEXTS[0]] == "en"  # --language fills only missing ones

    dm = PromptDataModule(train_data=str(out), val_data=str(out), prompts_per_step=2)
    dm.setup("fit")
    assert [r["text"] for r in dm.train_rows] == [r["extra_info"]["text"] for r in train]
    assert [r["language"] for r in dm.val_rows] == [r["language"] for r in test]
    assert next(iter(dm.val_dataloader()))["text"][0] == text


def test_split_is_seeded_and_fraction_keeps_at_least_one(jsonl, tmp_path):
    a = prepare(str(jsonl), str(tmp_path / "a"), test_size=0.25, seed=3)
    b = prepare(str(jsonl), str(tmp_path / "b"), test_size=0.25, seed=3)
    c = prepare(str(jsonl), str(tmp_path / "c"), test_size=0.25, seed=4)
    read = lambda d: [r["extra_info"]["text"] for r in pq.read_table(tmp_path / d / "test.parquet").to_pylist()]
    assert a == {"train": 8, "test": 2} and read("a") == read("b") and read("a") != read("c")
    assert prepare(str(jsonl), str(tmp_path / "d"), test_size=0.01)["test"] == 1
    with pytest.raises(ValueError, match="--test_size=10 leaves no training rows"):
        prepare(str(jsonl), str(tmp_path / "e"), test_size=10)


def test_rows_without_text_are_an_error_naming_the_row_or_dropped(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text("text,language\nHello there.,en\n,en\n   ,en\nBye now.,en\nOne more.,en\n")
    with pytest.raises(ValueError, match=r"row 1 of .*t.csv.* no text in column 'text'.*--drop_empty"):
        prepare(str(src), str(tmp_path / "out"), test_size=1)
    assert not (tmp_path / "out").exists()
    assert prepare(str(src), str(tmp_path / "out"), test_size=1, drop_empty=True) == {"train": 2, "test": 1}


def test_length_filters_in_characters_and_prompt_tokens(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("ab\n" + "short one\n" + "medium  length   text here\n" + "x" * 120 + "\n" + "another short\n")
    counts = prepare(str(src), str(tmp_path / "a"), test_size=1, min_chars=3, max_chars=100)
    assert counts == {"train": 2, "test": 1}
    rows = [r["extra_info"]["text"] for s in ("train", "test")
            for r in pq.read_table(tmp_path / "a" / f"{s}.parquet").to_pylist()]
    assert sorted(rows) == ["another short", "medium length text here", "short one"]  # whitespace collapsed
    # the tiny tokenizer is byte level: a prompt is ~60 tokens of template + one per character
    counts = prepare(str(src), str(tmp_path / "b"), test_size=1, max_prompt_tokens=80, tokenizer="builtin:tiny-llasa")
    rows = [r["extra_info"]["text"] for s in ("train", "test")
            for r in pq.read_table(tmp_path / "b" / f"{s}.parquet").to_pylist()]
    assert "x" * 120 not in rows and "another short" in rows and len(rows) == 4
    with pytest.raises(ValueError, match="--max_prompt_tokens needs --tokenizer"):
        prepare(str(src), str(tmp_path / "c"), max_prompt_tokens=80)


def test_remote_copy_to_fsspec_urls(jsonl, tmp_path):
    import fsspec

    prepare(str(jsonl), str(tmp_path / "local"), test_size=2, remote_dir="memory://bucket/llasa")
    fs = fsspec.filesystem("memory")
    assert fs.cat("/bucket/llasa/test.parquet") == (tmp_path / "local" / "test.parquet").read_bytes()
    remote = tmp_path / "remote" / "deep"
    prepare(str(jsonl), str(tmp_path / "local2"), test_size=2, hdfs_dir=f"file://{remote}")
    assert (remote / "train.parquet").read_bytes() == (tmp_path / "local2" / "train.parquet").read_bytes()


def test_push_to_hub_uploads_both_splits(jsonl, tmp_path, monkeypatch):
    import datasets

    pushed = {}

    def fake_push(self, repo_id, private=False, **kw):
        pushed.update(repo=repo_id, private=private, splits={k: v.num_rows for k, v in self.items()},
                      first=self["test"][0])

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    prepare(str(jsonl), str(tmp_path / "out"), test_size=2, push_to_hub="me/llasa-prompts")
    assert pushed["repo"] == "me/llasa-prompts" and pushed["private"] is True
    assert pushed["splits"] == {"train": 8, "test": 2}
    assert pushed["first"]["ability"] == "text-to-speech" and pushed["first"]["prompt"][1]["role"] == "assistant"


def test_hf_dataset_id_with_its_own_test_split(tmp_path, monkeypatch):
    import datasets

    asked = []

    def fake_load(name, split):
        asked.append((name, split))
        return [{"sentence": f"{split} text {i}.", "lang": "ko"} for i in range(3 if split == "train" else 2)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    counts = prepare("someone/korean-tts", str(tmp_path / "out"), test_split="validation", text_column="sentence",
                     language_column="lang")
    assert asked == [("someone/korean-tts", "train"), ("someone/korean-tts", "validation")]
    assert counts == {"train": 3, "test": 2}
    test = pq.read_table(tmp_path / "out" / "test.parquet").to_pylist()
    assert test[0]["extra_info"]["text"] == "validation text 0." and test[0]["language"] == "ko"
