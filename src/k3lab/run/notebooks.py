"""Helpers the notebooks call (so no logic lives only in a notebook): find runs and sweeps, show images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from k3lab.run.config import project_root


def latest(pattern: str, root: str | Path | None = None) -> Path:
    """The most recently modified path under ``<root>/logs`` matching ``pattern`` (a glob)."""
    base = Path(root or project_root()) / "logs"
    found = sorted(base.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"nothing matches {base}/{pattern}: run the README's main job first")
    return found[-1]


def diffusion_checkpoint(env: str = "K3LAB_RUN") -> Path:
    """``$K3LAB_RUN``, else the newest diffusion checkpoints folder (one with unet.safetensors) under logs/."""
    if os.environ.get(env):
        return Path(os.environ[env])
    return latest("**/checkpoints/unet.safetensors").parent


def sweep_dir(env: str = "K3LAB_SWEEP") -> Path:
    """``$K3LAB_SWEEP``, else the newest multirun folder with an MLflow sweep file under logs/."""
    if os.environ.get(env):
        return Path(os.environ[env])
    return latest("*/multiruns/*/mlflow_sweep.json").parent


def show_images(
    images: torch.Tensor | Sequence[np.ndarray], captions: Sequence[str], columns: int = 4, size: float = 2.2
):
    """A matplotlib figure: each image with its caption underneath."""
    import matplotlib.pyplot as plt

    arrays = [
        img.permute(1, 2, 0).clamp(0, 1).cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        for img in images
    ]
    rows = (len(arrays) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + 0.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, array, caption in zip(axes.flat, arrays, captions, strict=False):
        ax.imshow(array)
        ax.set_title(caption, fontsize=7, wrap=True)
    fig.tight_layout()
    return fig


def cell_grids(runs, split: str = "seen") -> list[tuple[str, Path]]:
    """(cell name, its evaluation grid PNG) for every finished run of a report's ``runs`` table."""
    out = []
    for row in runs.itertuples():
        grids = sorted(Path(row.output_dir).glob(f"eval/eval_grid_{split}_*.png")) if row.output_dir else []
        if grids:
            out.append((str(row.run_name).split(":", 1)[-1], grids[-1]))
    return out


def autoencoder_checkpoint(env: str = "K3LAB_AUTOENCODER") -> Path:
    """``$K3LAB_AUTOENCODER``, else the newest exported autoencoder under logs/ (a run's or a sweep's shared one)."""
    if os.environ.get(env):
        return Path(os.environ[env])
    return latest("**/checkpoints/autoencoder.safetensors")
