"""MLflow helpers around Lightning's MLFlowLogger (and a file fallback for other loggers)."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from typing_extensions import override

from k3lab.io.imaging import to_uint8

log = logging.getLogger(__name__)


def find_mlflow_logger(loggers: Iterable[object] | Logger | None) -> MLFlowLogger | None:
    """The MLflow logger among ``loggers``, or None."""
    if loggers is None:
        return None
    items = [loggers] if isinstance(loggers, Logger) else list(loggers)
    return next((lg for lg in items if isinstance(lg, MLFlowLogger)), None)


def log_run_metadata(
    loggers: Iterable[Logger], cfg: DictConfig, choices: Mapping[str, str] | None, overrides: Iterable[str] = ()
) -> None:
    """Params: the Hydra group choices (``choice/<group>``), the command-line overrides (``override/<key>``: a sweep's
    axes), seed, task and output folder; artifact: the resolved config."""
    params: dict[str, Any] = {
        "seed": cfg.get("seed"),
        "task_name": cfg.get("task_name"),
        "output_dir": OmegaConf.select(cfg, "paths.output_dir"),
    }
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and not key.startswith("hydra"):
            params[f"override/{key.lstrip('+~')}"] = value
    for group, choice in (choices or {}).items():
        if not group.startswith("hydra/") and group != "hydra":
            params[f"choice/{group}"] = "null" if choice is None else str(choice)
    for lg in loggers:
        lg.log_hyperparams(params)
    mlf = find_mlflow_logger(loggers)
    if mlf is not None:
        mlf.experiment.log_text(mlf.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        mark_model_training(mlf.experiment, str(mlf.experiment_id))


def mark_model_training(client: Any, experiment_id: str) -> None:
    """Tag the experiment as a model-training one, so the MLflow UI (3.x) opens its runs table instead of the GenAI
    traces overview."""
    try:
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    except Exception as e:  # noqa: BLE001 - an old server without the tag: cosmetic only
        log.debug("could not tag experiment %s as model training: %s", experiment_id, e)


def log_tag(loggers: Iterable[Logger], key: str, value: str) -> None:
    """Set a tag on the MLflow run of ``loggers`` (no-op without one)."""
    mlf = find_mlflow_logger(loggers)
    if mlf is not None:
        mlf.experiment.set_tag(mlf.run_id, key, value)


def log_image(
    loggers: Iterable[object], image: torch.Tensor, name: str, step: int, directory: str | Path | None
) -> Path | None:
    """Save ``image`` ([3, H, W] in [0, 1]) as ``<directory>/<name>_<step>.png`` and log it to MLflow."""
    array = to_uint8(image)
    path = None
    if directory is not None:
        path = Path(directory) / f"{name.replace('/', '_')}_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
    mlf = find_mlflow_logger(loggers)
    if mlf is not None:
        mlf.experiment.log_image(mlf.run_id, array, key=name.replace("/", "_"), step=step)
    return path


def is_lock_error(error: BaseException) -> bool:
    """An embedded sqlite store busy with another process's write (retrying later succeeds)."""
    return "database is locked" in str(error) or "database table is locked" in str(error)


class RetryingClient:
    """An ``MlflowClient`` whose calls are retried with exponential backoff while the sqlite store is locked by
    another job (parallel jobs of a sweep share one ``mlflow.db``); every other error passes through."""

    def __init__(self, client: Any, attempts: int = 12, first_wait: float = 0.2, max_wait: float = 10.0) -> None:
        self._client, self._attempts, self._first_wait, self._max_wait = client, attempts, first_wait, max_wait

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            wait = self._first_wait
            for attempt in range(self._attempts):
                try:
                    return attr(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - only lock errors are retried
                    if not is_lock_error(e) or attempt == self._attempts - 1:
                        raise
                    log.warning("MLflow store locked (%s): retrying in %.1f s", name, wait)
                    time.sleep(wait + random.uniform(0, wait / 2))
                    wait = min(wait * 2, self._max_wait)
            raise AssertionError("unreachable")

        return call


class RunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger whose run can stay open after ``fit`` (``keep_open``): an ablation cell logs its
    evaluation into the same run and closes it itself with :meth:`close` (FINISHED, or FAILED on an error). Its
    client retries while a shared sqlite store is locked (:class:`RetryingClient`)."""

    keep_open: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mlflow_client = RetryingClient(self._mlflow_client)

    @override
    def finalize(self, status: str = "success") -> None:
        if self.keep_open and status == "success":
            return
        super().finalize(status)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with ``status`` even when it was kept open for the caller (a cell's evaluation)."""
        self.keep_open = False
        if self._initialized and self.experiment.get_run(self.run_id):
            self.experiment.set_terminated(self.run_id, status)
