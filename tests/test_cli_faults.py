"""Bad files and places given to the CLI: a binary --config, a --ckpt_path that is no checkpoint, an --out_dir that
cannot be written (found before the evaluation, not after), and resuming on data other than the checkpoint's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint import cli_fit

from lightning_grpo import evaluate
from lightning_grpo.export import export

ROOT = Path(__file__).resolve().parents[1]


def test_a_binary_config_file_is_named_not_a_unicode_traceback(tmp_path):
    config = tmp_path / "model.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    done = subprocess.run([sys.executable, "-m", "lightning_grpo", "fit", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert f"--config {config} is not a YAML text file (byte 0x89 at offset 0 is not UTF-8)" in done.stderr
    assert "UnicodeDecodeError" not in done.stderr


@pytest.fixture
def not_checkpoints(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("these are my notes\n")
    weights = tmp_path / "weights.pt"
    torch.save({"lm_head.weight": torch.zeros(2)}, weights)  # a torch file, but not what fit writes
    cut = tmp_path / "cut.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": {"w": torch.zeros(1000)}}, cut)
    cut.write_bytes(cut.read_bytes()[:500])
    return {text: "is not a torch checkpoint", weights: r"holds a dict of \['lm_head.weight'\], not a Lightning checkpoint",
            cut: "is not a torch checkpoint", tmp_path / "missing.ckpt": "no such file or directory"}


def test_export_and_evaluate_of_a_file_that_is_not_a_checkpoint_say_so(not_checkpoints, tmp_path):
    for path, why in not_checkpoints.items():
        with pytest.raises((ValueError, FileNotFoundError), match=rf"--ckpt_path={path}:? {why}"):
            export(str(path), str(tmp_path / "out"))
        with pytest.raises((ValueError, FileNotFoundError), match=rf"--ckpt_path={path}:? .*(neither|{why})"):
            evaluate.main(["--config", "configs/tiny_cpu.yaml", "--ckpt_path", str(path), "--out_dir", str(tmp_path / "ev")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "ev").exists()


def test_evaluate_checks_out_dir_before_evaluating(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ran = []
    monkeypatch.setattr(evaluate, "markdown_table", lambda summary: ran.append(summary) or "")
    with pytest.raises(PermissionError, match=rf"--out_dir {blocker}/report is not writable"):
        evaluate.main(["--config", "configs/tiny_cpu.yaml", "--out_dir", str(blocker / "report"),
                       "--data.val_prompts_per_step=2", "--trainer.limit_val_batches=1"])
    assert ran == []  # nothing was evaluated


def test_resuming_on_changed_data_stops_naming_both_fingerprints(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": f"Sentence number {i}."}) + "\n" for i in range(8)))
    common = [f"--data.train_data={data}", "--data.val_data=null"]
    cli_fit(tmp_path, "--trainer.max_steps=2", *common)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["PromptDataModule"]["fingerprint"].startswith("8 rows, sha256 ")
    data.write_text(data.read_text().replace("number 3", "number three"))
    with pytest.raises(ValueError, match=r"is not the data this checkpoint trained on \(checkpoint: 8 rows, sha256 \w+; "
                                         r"now: 8 rows, sha256 \w+\).*--data.on_data_change warn"):
        cli_fit(tmp_path, "--trainer.max_steps=3", "--ckpt_path=last", *common)
    with pytest.warns(UserWarning, match="is not the data this checkpoint trained on"):
        cli = cli_fit(tmp_path, "--trainer.max_steps=3", "--ckpt_path=last", "--data.on_data_change=warn", *common)
    assert cli.trainer.global_step == 3


def test_the_fingerprint_follows_the_rows_not_where_the_recordings_live(tmp_path):
    from lightning_grpo.data import PromptDataModule

    def fingerprint(rows):
        dm = PromptDataModule()
        dm.train_rows = rows
        return dm.fingerprint()

    rows = [{"text": "One.", "language": "en", "prompt_wav": "/data/a/ref.wav"}, {"text": "Two.", "language": "en"}]
    moved = [{**rows[0], "prompt_wav": "/mnt/b/ref.wav"}, rows[1]]
    assert fingerprint(rows) == fingerprint(moved)
    assert fingerprint(rows) != fingerprint(rows[::-1]) != fingerprint(rows[:1])
    assert fingerprint(rows) != fingerprint([{**rows[0], "text": "One!"}, rows[1]])
