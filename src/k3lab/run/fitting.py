"""Fitting one stage from a composed config: data, stage, loggers, trainer, fit, export. Used by the training entry
point (``python -m k3lab.train``) and by an ablation cell (``python -m k3lab.ablation``); it imports neither."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from k3lab.io.checkpoint import check_resume
from k3lab.run.callbacks import ExportModels
from k3lab.run.config import validate
from k3lab.run.resume import AtomicCheckpointIO, KeepLogs, ResumeState, checkpoint_run_id, resolve_ckpt_path
from k3lab.tracking import find_mlflow_logger, log_run_metadata, log_tag
from k3lab.tracking.mlflow import RunLogger
from k3lab.tracking.sweep import ROLE_TAG, run_tags

log = logging.getLogger(__name__)


def quiet_known_warnings() -> None:
    """Silence two warnings that say nothing here: frozen parts (EMA copies, frozen encoders) are kept in eval mode on
    purpose, and a torch pytree deprecation Lightning triggers. Called by :func:`fit`, never at import."""
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` child of a group such as ``callbacks`` or ``logger``."""
    if not node:
        return []
    return [instantiate(child) for child in node.values() if isinstance(child, DictConfig) and "_target_" in child]


def hydra_choices() -> dict[str, str]:
    """The running Hydra app's config-group choices (empty outside Hydra)."""
    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


@dataclass
class FitResult:
    """What ``fit`` leaves for the caller: final metrics, the trained stage, the loggers."""

    metrics: dict[str, float]
    stage: L.LightningModule
    loggers: list[Any]


def make_loggers(cfg: DictConfig, role: str | None = None, run_id: str | None = None) -> list[Any]:
    """The config's loggers; an MLflow run is tagged into its sweep (parent run, role) when there is one, or
    continues ``run_id`` (a resumed run)."""
    loggers = []
    for name, child in (cfg.get("logger") or {}).items():
        if not (isinstance(child, DictConfig) and "_target_" in child):
            continue
        if name == "mlflow":
            tags = {**run_tags(), **(dict(child.tags) if child.get("tags") else {})}
            if role and tags.get(ROLE_TAG) in ("job", "run"):
                tags[ROLE_TAG] = role
            if run_id:
                log.info("continuing MLflow run %s", run_id)
                logger = instantiate(child, run_id=run_id)
                logger.experiment.update_run(run_id, status="RUNNING")  # a preempted run was marked failed
                loggers.append(logger)
            else:
                loggers.append(instantiate(child, tags=tags, run_name=child.get("run_name") or run_name(cfg)))
        else:
            loggers.append(instantiate(child))
    return loggers


def run_name(cfg: DictConfig) -> str | None:
    """A multirun job's run name: its overrides (``model/unet/block=resnet,seed=1``)."""
    if HydraConfig.initialized() and HydraConfig.get().job.override_dirname:
        return f"{cfg.task_name}:{HydraConfig.get().job.override_dirname}"
    return None


def fit(
    cfg: DictConfig, role: str | None = None, keep_open: bool = False, callbacks: list[Any] | None = None
) -> FitResult:
    """Validate, build data / stage / trainer from the config (plus ``callbacks``), fit and export."""
    quiet_known_warnings()
    validate(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.checkpoint_dir)
    if ckpt_path:
        check_resume(ckpt_path, str(cfg.stage._target_), hydra_choices())
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    stage = instantiate(cfg.stage)
    loggers = make_loggers(cfg, role, checkpoint_run_id(ckpt_path) if ckpt_path else None)
    for lg in loggers:
        if isinstance(lg, RunLogger):
            lg.keep_open = keep_open
    export = ExportModels(cfg, cfg.paths.checkpoint_dir, hydra_choices())
    callbacks = _instantiate_all(cfg.get("callbacks")) + [export, ResumeState(), KeepLogs(), *(callbacks or [])]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    extra: dict[str, Any] = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    if cfg.trainer.get("strategy") == "ddp" and getattr(stage, "ddp_unused_parameters", False):
        # e.g. the autoencoder: its discriminator takes no gradient before disc_start
        extra["strategy"] = "ddp_find_unused_parameters_true"
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **extra)
    if trainer.is_global_zero:
        log_run_metadata(
            loggers, cfg, hydra_choices(), HydraConfig.get().overrides.task if HydraConfig.initialized() else ()
        )
    log.info("output dir: %s", cfg.paths.output_dir)
    trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path)  # on an error Lightning finalizes the run FAILED
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        for name, path in export.exported.items():
            log_tag(loggers, f"checkpoint/{name}", str(path))
            log.info("exported %s -> %s", name, path)
        for lg in loggers:
            lg.log_hyperparams({"checkpoint_dir": str(Path(cfg.paths.checkpoint_dir))})
        log.info("final metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
        log.info("run folder: %s", cfg.paths.output_dir)
    return FitResult(metrics, stage, loggers)


def close_loggers(loggers: list[Any], status: str = "FINISHED") -> None:
    """Finish every logger's run with ``status``."""
    for lg in loggers:
        if isinstance(lg, RunLogger):
            lg.close(status)


def where_to_look(cfg: DictConfig, loggers: list[Any]) -> None:
    """Log where to look at the run: the MLflow UI command and run id, and the output folders."""
    mlf = find_mlflow_logger(loggers)
    if mlf is not None:
        uri = OmegaConf.select(cfg, "logger.mlflow.tracking_uri")
        log.info("look at it: mlflow ui --backend-store-uri %s  (run %s)", uri, mlf.run_id)
