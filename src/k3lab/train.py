"""Training entry point: ``python -m k3lab.train experiment=<name> [overrides]`` (one stage; ablation sweeps have their
own entry point, ``python -m k3lab.ablation -m experiment=ablation_tiny``)."""

from __future__ import annotations

import logging

import hydra
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from k3lab.run.config import CONF_DIR
from k3lab.run.fitting import fit, where_to_look

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit one stage from the config; returns the final metrics."""
    if cfg.get("ablation"):
        raise ValueError(
            "this config is an ablation preset (it has an `ablation` node): run it with "
            "python -m k3lab.ablation -m experiment=<preset> [overrides]"
        )
    if cfg.get("progressive"):
        raise ValueError(
            "this config is a progressive chain (it has a `progressive` node): run it with "
            "python -m k3lab.progressive experiment=<preset> [overrides]"
        )
    result = fit(cfg)
    if rank_zero_only.rank == 0:  # the other ranks (trainer=ddp) have no run to point at
        where_to_look(cfg, result.loggers)
    return result.metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry; returns ``cfg.optimized_metric`` for sweepers when set."""
    metrics = train(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


if __name__ == "__main__":
    main()
