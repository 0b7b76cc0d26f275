"""Shared fixtures: tiny LLaSA models built in code, quiet logs, bounded threads."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores; several torch pools fight over them
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the builtin tiny LLaSA; tests must not modify the model in place."""
    from lightning_grpo.tiny import build_tiny_llasa

    return build_tiny_llasa()


@pytest.fixture(scope="session")
def vocab(tiny):
    from lightning_grpo.llasa import LlasaVocab

    return LlasaVocab.from_tokenizer(tiny[1])
