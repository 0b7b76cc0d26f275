"""Data errors are found when the data loads and name the file and the line or row: malformed JSON lines, text
that is not UTF-8, rows that are not objects, a mistyped path, a reference recording that cannot be read, and a
prompt longer than --rollout.max_prompt_length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lightning_grpo.data import load_prompts
from lightning_grpo.prepare import read_rows

ROOT = Path(__file__).resolve().parents[1]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_jsonl_names_the_file_and_its_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"text": "One."}', "", '{"text": "Two."}', '{"text": "Three.",}'])
    with pytest.raises(ValueError, match=rf"{path}: line 4, column 19: not valid JSON"):
        load_prompts(str(path))
    array = tmp_path / "p.json"
    array.write_text('[\n  {"text": "One."},\n  {"text": "Two."\n]\n')
    with pytest.raises(ValueError, match=rf"{array}: line 4, column 1: not valid JSON"):
        load_prompts(str(array))


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("text\nOne.\nCaf\u00e9.\n".encode("utf-8") + "Na\u00efve.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text \(line 4: byte 0xef\); save it as UTF-8"):
        load_prompts(str(path))


def test_a_json_array_of_strings_says_what_a_row_must_be(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["One.", "Two."]))
    with pytest.raises(ValueError, match=rf"{path}: row 0 is a str \('One.'\), not an object; .*\.txt file"):
        load_prompts(str(path))
    with pytest.raises(ValueError, match="row 0 is a str"):
        read_rows(str(path))  # prepare reads the same way


@pytest.mark.parametrize("typo", ["data/trian.jsonl", "./prompts.jsonl", "prompts.parquet", "~/no/such/dir", "a/b/c"])
def test_a_mistyped_path_says_no_such_file_instead_of_asking_the_hub(tmp_path, monkeypatch, typo):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"prompt data '{typo}': no such file or directory"):
        load_prompts(typo)
    with pytest.raises(FileNotFoundError, match=rf"--data_source '{typo}': no such file or directory"):
        read_rows(typo)


def test_hub_ids_are_not_taken_for_paths(tmp_path, monkeypatch):
    from lightning_grpo.data import looks_like_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("user/korean-tts") and not looks_like_path("squad")
    assert looks_like_path("user/korean-tts/train.jsonl") and looks_like_path("texts.csv")


def test_a_reference_recording_that_cannot_serve_is_found_at_load_naming_the_row(tmp_path):
    rate = 16_000
    sf.write(tmp_path / "good.wav", 0.1 * np.ones(rate, dtype=np.float32), rate)
    (tmp_path / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(200))
    sf.write(tmp_path / "whole.flac", 0.3 * np.sin(np.arange(rate * 4) / 5).astype(np.float32), rate)
    whole = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(whole[: len(whole) // 2])  # the header still promises 4 s
    sf.write(tmp_path / "long.wav", np.zeros(rate * 31, dtype=np.float32), rate)
    cases = {"garbage.wav": r"is not audio soundfile reads", "cut.flac": r"is truncated or corrupt: its header promises 64000 frames",
             "long.wav": r"is 31.0 s long, more than the 30 s a reference may last"}
    for name, why in cases.items():
        path = write_lines(tmp_path / f"rows_{name}.jsonl", [json.dumps({"text": "Fine.", "prompt_wav": "good.wav"}),
                                                             json.dumps({"text": "Bad.", "prompt_wav": name})])
        with pytest.raises(ValueError, match=rf"row 1 of '{path}' \(split 'train'\): prompt_wav '{name}' .* {why}"):
            load_prompts(str(path))


def test_a_prompt_too_long_stops_fit_at_its_start_naming_file_and_row(tmp_path):
    """Through the CLI: row 6 of 8 is over --rollout.max_prompt_length; the run stops before its first step."""
    rows = [{"text": f"Sentence number {i}."} for i in range(8)]
    rows[6]["text"] = "A sentence that goes on and on " * 20
    path = write_lines(tmp_path / "prompts.jsonl", [json.dumps(r) for r in rows])
    done = subprocess.run(
        [sys.executable, "-m", "lightning_grpo", "fit", "--config", "configs/tiny_cpu.yaml",
         f"--data.train_data={path}", "--data.val_data=null", "--rollout.max_prompt_length=128",
         f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
         "--trainer.max_steps=50", "--trainer.enable_progress_bar=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0
    assert f"row 6 of '{path}' (split 'train'): prompt for text 'A sentence that goes on" in done.stderr
    assert "--max_prompt_length=128" in done.stderr
    assert not list(tmp_path.rglob("metrics.csv")) or "train/loss" not in "".join(
        p.read_text() for p in tmp_path.rglob("metrics.csv"))  # no step ran
