"""Ablation entry point: ``python -m k3lab.ablation -m experiment=ablation_tiny [axis=a,b ...]``.

Each Hydra multirun job is one cell (:func:`k3lab.ablation.cell.run_cell`): the shared parts it needs (trained once),
the diffusion stage, the evaluation, all in one MLflow child run of the sweep's parent; the sweep ends with the
report (``python -m k3lab.report``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from hydra_plugins.k3lab_sweeper import register
from k3lab.ablation.cell import run_cell
from k3lab.run.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry; returns ``cfg.optimized_metric`` for sweepers when set."""
    metrics = run_cell(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


register()  # hydra/sweeper=fractional (the main job's half fraction), also under an editable install

if __name__ == "__main__":
    main()
