"""Figures for the notebooks: the reward's shape, and a run's training curves (matplotlib, imported lazily).

The notebooks in `notebooks/` call these and hold no logic of their own, so what they show is what
the trainer computes: the utilities come from `reward.shaping`, the curves from the run's metrics.csv.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .reward.shaping import harmonic_reward, u_cer, u_nll

# the curves a GRPO run is read by, in the order they are plotted; absent ones are skipped
DEFAULT_CURVES = (
    "train/reward_mean", "val/reward", "train/cer_mean", "train/nll_mean", "train/entropy", "train/kl", "train/clip_fraction",
    "train/completion_length_mean", "train/truncation_rate", "train/loss", "train/grad_norm",
)


def reward_grid(cer_max: float = 1.0, nll_max: float = 10.0, n: int = 101, **weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cer (n,), nll (n,), reward (n, n)) with reward[i, j] = harmonic_reward(cer[j], nll[i], **weights)."""
    cer = torch.linspace(0, cer_max, n)
    nll = torch.linspace(0, nll_max, n)
    c, l = torch.meshgrid(cer, nll, indexing="xy")  # (n, n): rows follow nll, columns cer
    return cer, nll, harmonic_reward(c.reshape(-1), l.reshape(-1), **weights).reshape(n, n)


def plot_utilities(beta_c: float = 3.0, tau_n: float = 3.0, cer_max: float = 1.0, nll_max: float = 10.0):
    """U_cer over CER and U_nll over NLL side by side; returns the figure."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    cer = torch.linspace(0, cer_max, 201)
    nll = torch.linspace(0, nll_max, 201)
    a.plot(cer, u_cer(cer, beta_c))
    a.set(xlabel="CER", ylabel="U_cer", title=f"U_cer = 1 - tanh({beta_c:g} CER)")
    b.plot(nll, u_nll(nll, tau_n))
    b.set(xlabel="NLL (nats / token)", ylabel="U_nll", title=f"U_nll = exp(-NLL / {tau_n:g})")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def plot_reward_surface(lambda_c: float = 0.6, lambda_n: float = 0.4, beta_c: float = 3.0, tau_n: float = 3.0,
                        cer_max: float = 1.0, nll_max: float = 10.0):
    """Contours of the reward over CER x NLL for the given weights; returns the figure."""
    import matplotlib.pyplot as plt

    cer, nll, reward = reward_grid(cer_max, nll_max, lambda_c=lambda_c, lambda_n=lambda_n, beta_c=beta_c, tau_n=tau_n)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    filled = ax.contourf(cer, nll, reward, levels=20, cmap="viridis", vmin=0, vmax=1)
    lines = ax.contour(cer, nll, reward, levels=[0.1, 0.3, 0.5, 0.7, 0.9], colors="white", linewidths=0.8)
    ax.clabel(lines, fmt="%.1f")
    fig.colorbar(filled, ax=ax, label="reward")
    ax.set(xlabel="CER", ylabel="NLL (nats / token)",
           title=f"reward, lambda_c={lambda_c:g} lambda_n={lambda_n:g} beta_c={beta_c:g} tau_n={tau_n:g}")
    fig.tight_layout()
    return fig


def find_metrics(run_dir: str | Path) -> Path:
    """The newest metrics.csv under run_dir (a CSVLogger save_dir, a version dir, or the file itself)."""
    path = Path(run_dir)
    if path.is_file():
        return path
    found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {path}: train with the CSVLogger (configs/tiny_cpu.yaml) first")
    return found[-1]


def read_metrics(run_dir: str | Path):
    """A pandas DataFrame of a CSVLogger run, one row per step (train and val rows merged)."""
    import pandas as pd

    frame = pd.read_csv(find_metrics(run_dir))
    return frame.groupby("step", as_index=False).first()


def plot_curves(frame, keys: Sequence[str] | None = None, smooth: int = 1):
    """One panel per metric over steps (rolling mean over `smooth` steps); returns the figure."""
    import matplotlib.pyplot as plt

    keys = [k for k in (keys or DEFAULT_CURVES) if k in frame.columns and frame[k].notna().any()]
    if not keys:
        raise ValueError(f"none of the curves are in this run; its columns: {sorted(frame.columns)}")
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        series = frame[["step", key]].dropna()
        ax.plot(series["step"], series[key].rolling(smooth, min_periods=1).mean(), marker="." if len(series) < 30 else None)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return fig
