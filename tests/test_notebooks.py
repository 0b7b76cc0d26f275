"""The notebooks run top to bottom on CPU with the tiny config (nbclient, a real kernel)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import nbformat
from lightning.pytorch.loggers import CSVLogger
from nbclient import NotebookClient

from lightning_grpo.data import PromptDataModule
from lightning_grpo.policy import GRPOPolicy
from lightning_grpo.reward.rule import RuleReward
from lightning_grpo.rollout import GRPORollout
from lightning_grpo.sampling import HFSampler

ROOT = Path(__file__).parents[1]
NOTEBOOKS = ROOT / "notebooks"

TONE_CODEC = '''
import torch

class ToneCodec:
    """Any code -> 320 samples of a tone (a stand-in codec for the tiny model's 64 codes)."""
    sample_rate = 16000

    def decode(self, codes):
        t = torch.arange(320) / 16000
        return [torch.cat([0.3 * torch.sin(2 * torch.pi * (200 + 20 * c) * t) for c in seq]) for seq in codes]
'''


def execute(name: str, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), env.get("EXTRA_PATH", ""), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def outputs(nb, kind: str) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if kind in o.get("data", {})]


def stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stdout")


def test_reward_explorer(monkeypatch):
    nb = execute("reward_explorer.ipynb", {"LG_LAMBDA_C": "0.6"}, monkeypatch)
    assert len(outputs(nb, "image/png")) == 2  # utilities, surface
    lines = stdout(nb).splitlines()
    assert lines[0].startswith("CER 0.0000  NLL  0.50") and lines[-1].endswith("reward 0.000")  # NaN NLL -> 0


def test_rollout_inspection_plays_audio(monkeypatch, tmp_path):
    (tmp_path / "tone_codec.py").write_text(TONE_CODEC)
    nb = execute("rollout_inspection.ipynb", {"LG_CONFIG": "configs/tiny_cpu.yaml", "LG_CODEC": "tone_codec.ToneCodec",
                                              "LG_GROUP_SIZE": "2", "LG_MAX_PLAY": "3", "EXTRA_PATH": str(tmp_path)},
                 monkeypatch)
    html = [o["data"]["text/html"] for o in outputs(nb, "text/html")]
    assert any("<table" in h and "length_score" in h for h in html)  # the scored samples
    assert sum("<audio" in h for h in html) >= 1
    assert "RuleReward" in stdout(nb)


def test_training_curves_of_a_csv_run(monkeypatch, tmp_path):
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=CSVLogger(str(tmp_path)), log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[GRPORollout(HFSampler(max_new_tokens=8), RuleReward(), group_size=2)])
    trainer.fit(GRPOPolicy(), PromptDataModule(prompts_per_step=2, val_data=None))
    nb = execute("training_curves.ipynb", {"LG_RUN_DIR": str(tmp_path)}, monkeypatch)
    assert len(outputs(nb, "image/png")) == 2
    assert "metrics.csv" in stdout(nb)
    table = outputs(nb, "text/html")[0]["data"]["text/html"]
    assert "train/reward_mean" in table and "train/clip_fraction" in table


def test_notebooks_hold_no_logic_of_their_own():
    """No function or class definitions: what a notebook shows comes from the package."""
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert "def " not in cell.source and "class " not in cell.source, path.name
                assert not cell.get("outputs"), f"{path.name} is committed with outputs; clear them"
