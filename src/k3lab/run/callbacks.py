"""Lightning callbacks that every run uses: config + weight export, and data-quality counts."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, cast

import lightning as L
from omegaconf import DictConfig
from typing_extensions import override

from k3lab.data.skips import table
from k3lab.io.checkpoint import atomic_write_bytes, export_model, save_config
from k3lab.tracking.mlflow import find_mlflow_logger

log = logging.getLogger(__name__)


class ExportModels(L.Callback):
    """Writes the resolved ``config.yaml`` into the checkpoint folder at fit start, and each module of
    ``stage.exportable_modules()`` as ``<name>.safetensors`` beside it at every checkpoint and at the end.
    """

    def __init__(self, cfg: DictConfig, dirpath: str | Path, choices: dict[str, str] | None = None) -> None:
        self.cfg, self.dirpath, self.choices = cfg, Path(dirpath), choices
        self.exported: dict[str, Path] = {}

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_config(self.cfg, self.dirpath, self.choices)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the stage's exportable modules as safetensors beside the checkpoints (rank 0 only)."""
        if not trainer.is_global_zero or not hasattr(pl_module, "exportable_modules"):
            return
        for name, module in cast(Any, pl_module).exportable_modules().items():
            self.exported[name] = export_model(module, self.dirpath / f"{name}.safetensors")
            if hasattr(module, "export_config"):  # e.g. lora.json beside lora.safetensors
                atomic_write_bytes(self.dirpath / f"{name}.json", json.dumps(module.export_config(), indent=1).encode())

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.export(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)


class DataQuality(L.Callback):
    """Sums the per-batch ``skipped`` counts and logs the running totals as ``data/<split>_skipped_<reason>``; with
    aspect buckets, the samples trained per bucket as ``data/<split>_bucket_<height>x<width>``."""

    def __init__(self) -> None:
        self.totals: dict[str, Counter[str]] = {"train": Counter(), "val": Counter()}
        self.buckets: dict[str, Counter[str]] = {"train": Counter(), "val": Counter()}

    def _update(self, trainer: L.Trainer, batch: Any, split: str) -> None:
        if not isinstance(batch, dict):
            return
        skipped, bucket = batch.get("skipped"), batch.get("bucket")
        if bucket:
            self.buckets[split][bucket] += len(batch["caption"])
        if not skipped and not bucket:
            return
        self.totals[split].update(skipped or {})
        metrics = {f"data/{split}_skipped_{k}": float(v) for k, v in self.totals[split].items()}
        metrics.update({f"data/{split}_bucket_{k}": float(v) for k, v in self.buckets[split].items()})
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer, batch, "train")

    @override
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._update(trainer, batch, "val")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tables = [table(counts, title=f"{split}, the whole run") for split, counts in self.totals.items() if counts]
        if tables and trainer.is_global_zero:
            text = "\n\n".join(tables) + "\n"
            log.warning("%s", text)
            path = Path(trainer.default_root_dir) / "skipped_samples.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            mlf = find_mlflow_logger(trainer.loggers)
            if mlf is not None and mlf.run_id:
                mlf.experiment.log_artifact(mlf.run_id, str(path))
        for split, counts in self.buckets.items():
            if counts:
                log.info("%s samples per aspect bucket: %s", split, dict(counts))
