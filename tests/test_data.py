"""Prompt sources: embedded set, parquet (original recipe layout), jsonl, csv, txt, directories, errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_grpo.data import PromptDataModule, load_prompts


def test_builtin_prompt_set_is_embedded_and_split():
    train, test = load_prompts("builtin:en", "train"), load_prompts("builtin:en", "test")
    assert len(train) >= 32 and len(test) >= 8
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert all(r["language"] == "en" for r in train)


def test_original_recipe_parquet_rows(tmp_path):
    rows = [{
        "data_source": "dummy", "prompt": [{"role": "user", "content": "x"}], "ability": "text-to-speech",
        "reward_model": {"style": "rule", "ground_truth": "Hello there."},
        "extra_info": {"split": "train", "index": 0, "text": "Hello there."},
    }]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert load_prompts(str(tmp_path), "train") == [{"text": "Hello there.", "language": None}]
    assert load_prompts(str(tmp_path / "train.parquet"), default_language="ko")[0]["language"] == "ko"


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "txt", "json"])
def test_plain_files(tmp_path, suffix):
    path = tmp_path / f"p.{suffix}"
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps({"text": t, "language": "en"}) for t in ["a b", "c d"]))
    elif suffix == "json":
        path.write_text(json.dumps([{"text": "a b"}, {"text": "c d"}]))
    elif suffix == "csv":
        path.write_text("text,language\na b,en\nc d,en\n")
    else:
        path.write_text("a b\nc d\n")
    assert [r["text"] for r in load_prompts(str(path))] == ["a b", "c d"]


def test_row_without_text_names_row_and_flag(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match=r"row 1 of .*--data.text_column"):
        load_prompts(str(path))
    with pytest.raises(ValueError, match="test.parquet"):
        load_prompts(str(tmp_path), "test")
    with pytest.raises(ValueError, match="suffix '.xml'"):
        (tmp_path / "p.xml").write_text("x")
        load_prompts(str(tmp_path / "p.xml"))


def test_datamodule_batches_and_too_few_prompts(tmp_path):
    dm = PromptDataModule(prompts_per_step=4, val_prompts_per_step=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["text"]) == 4 and len(batch["language"]) == 4
    assert len(next(iter(dm.val_dataloader()))["text"]) == 3
    small = tmp_path / "p.txt"
    small.write_text("one\ntwo\n")
    dm = PromptDataModule(train_data=str(small), val_data=None, prompts_per_step=4)
    dm.setup("fit")
    with pytest.raises(ValueError, match="has 2 prompts, fewer than the 4 one step needs"):
        dm.train_dataloader()
    assert dm.val_dataloader() == []
