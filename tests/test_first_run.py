"""First-run errors a newcomer understands: a model path that is neither a directory nor a hub id says
what it expected and which command makes it, instead of a raw hub error about a repo id."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_grpo.policy import load_model_and_tokenizer

ROOT = Path(__file__).parents[1]


def test_the_small_world_before_its_warm_start_names_the_warm_start_command(tmp_path, monkeypatch):
    """`python examples/small_world/cli.py fit` (formerly `fit --config configs/demo_whisper_cpu.yaml`) in a
    directory without runs/demo/warm_seed0: the error names the path, what it should be and the command."""
    sys.path.insert(0, str(ROOT / "examples"))
    from lightning_grpo.cli import build_cli
    from small_world import config_args

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        build_cli(["fit", *config_args()])
    message = str(err.value)
    assert "--model.model_name_or_path=runs/demo/warm_seed0: no such directory" in message
    assert str(tmp_path / "runs" / "demo" / "warm_seed0") in message
    assert "python examples/small_world/warm_start.py --out DIR" in message and "lightning_grpo export" in message
    assert "not a hub id" in message and "Repo id" not in message


def test_a_hub_like_name_that_is_not_found_says_what_was_expected(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait; the hub answers "not found"
    with pytest.raises(FileNotFoundError, match=r"no directory .*warm_seed0, and the hub did not give a model 'runs/warm_seed0'.*"
                                                r"expected a local HF directory \(config.json"):
        load_model_and_tokenizer("runs/warm_seed0")


def test_a_directory_without_a_model_or_a_file_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json; expected a local HF directory"):
        load_model_and_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model.safetensors is a file, not a directory"):
        load_model_and_tokenizer(str(tmp_path / "model.safetensors"))
