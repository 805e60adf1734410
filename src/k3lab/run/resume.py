"""Exact resume: what a checkpoint must carry so that a killed run continues as if it had never stopped.

Lightning saves the module (EMA, latent scale, buffers), optimizers, schedulers and loop progress. This adds:

- :class:`ResumeState` (a callback): every random generator the training step draws from (torch, CUDA, numpy,
  Python) at the point of the save, restored right before the first training batch after a resume; validation runs
  on a snapshot, so it never moves the training stream (a run that validates and one that resumes after the
  validation see the same numbers). It also tells the training loader how many batches of the current pass the
  training loop has consumed (Lightning prefetches one ahead).
- :class:`KeepLogs` (a callback): every logger's buffered rows are written at each checkpoint, and a run resumed in
  place drops the CSV rows its killed predecessor logged after the checkpoint it resumes from (logged again, the
  same), so ``metrics.csv`` holds every step once (``logger=csv``: :class:`k3lab.tracking.csv_log.ResumableCSVLogger`).
- :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file, flushed and renamed over the old one, so
  a kill during a write leaves the previous checkpoint intact.

The data stream's position is the training loader's state (:class:`k3lab.data.datamodule.EpochLoader`: the pass's
epoch and the batches consumed), saved by Lightning with the loop state.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from k3lab.tracking.csv_log import ResumableCSVLogger

log = logging.getLogger(__name__)


def random_states() -> dict[str, Any]:
    """The global generators' states (CUDA when available)."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():  # (CUDA-only lines carry "pragma: no mutate": no CPU test can reach them)
        states["cuda"] = torch.cuda.get_rng_state_all()  # pragma: no mutate
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Restore the Python, NumPy, torch (and CUDA) random states saved in a checkpoint."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():  # pragma: no mutate
        torch.cuda.set_rng_state_all(states["cuda"])  # pragma: no mutate


class ResumeState(L.Callback):
    """Random state and data position for exact resume (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return "ResumeState"

    # ---------------------------------------------------------------- data position
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            set_random_states(self._pending)
            self._pending = None
        for loader in _train_loaders(trainer):
            loader.consumed = batch_idx + 1

    # ---------------------------------------------------------------- validation on a snapshot
    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._before_validation = random_states()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before_validation is not None:
            set_random_states(self._before_validation)
            self._before_validation = None

    # ---------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The MLflow run this training logs to: a resumed or requeued job continues it (no duplicate run)."""
        from k3lab.tracking import find_mlflow_logger

        mlf = find_mlflow_logger(trainer.loggers)
        if mlf is not None and mlf.run_id:
            checkpoint.setdefault("k3lab", {})["mlflow_run_id"] = str(mlf.run_id)

    @override
    def state_dict(self) -> dict[str, Any]:
        states = self._before_validation if self._before_validation is not None else random_states()
        return {"random": _to_plain(states)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "random" in state_dict:
            self._pending = _from_plain(state_dict["random"])


class KeepLogs(L.Callback):
    """Nothing logged before a checkpoint is lost when the run is killed and resumed (see the module docstring)."""

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        step = int(checkpoint.get("global_step", 0))
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                dropped = logger.experiment.drop_from_step(step)
                if dropped:
                    log.info("csv: dropped %d row(s) logged after step %d by the run that was stopped", dropped, step)


def _train_loaders(trainer: L.Trainer) -> list[Any]:
    loader = trainer.fit_loop._combined_loader
    return [dl for dl in (loader.flattened if loader is not None else []) if hasattr(dl, "consumed")]


def _to_plain(states: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint-safe (``weights_only=True`` loadable) form: tensors, lists, ints and strings only."""
    kind, keys, pos, has_gauss, cached = states["numpy"]
    version, internal, gauss = states["python"]
    out = {
        "torch": states["torch"],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },  # fmt: skip
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }
    if "cuda" in states:  # pragma: no mutate
        out["cuda"] = list(states["cuda"])  # pragma: no mutate
    return out


def _from_plain(plain: dict[str, Any]) -> dict[str, Any]:
    n = plain["numpy"]
    states = {
        "torch": plain["torch"],
        "numpy": (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]),
        "python": (plain["python"]["version"], tuple(plain["python"]["internal"]), plain["python"]["gauss"]),
    }
    if "cuda" in plain:  # pragma: no mutate
        states["cuda"] = plain["cuda"]  # pragma: no mutate
    return states


def cluster_job() -> bool:
    """Running as a SLURM or submitit job (which a scheduler may requeue into the same run folder)."""
    return any(k in os.environ for k in ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_EXECUTOR"))


def checkpoint_run_id(path: str | Path) -> str | None:
    """The MLflow run id a k3lab checkpoint was logging to (None for other checkpoints)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return (ckpt.get("k3lab") or {}).get("mlflow_run_id")


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | Path) -> str | None:
    """``ckpt_path=last`` resumes this run folder's ``last.ckpt`` when there is one and starts fresh otherwise (a
    requeued job that had not reached its first checkpoint); any other value is a checkpoint file. A cluster job
    (SLURM, submitit) without ``ckpt_path`` behaves as ``last``: a requeued job continues where it stopped.
    Temporary files of a write a kill interrupted are removed."""
    if ckpt_path is None and cluster_job():
        ckpt_path = "last"
    if ckpt_path != "last":
        return ckpt_path
    folder = Path(checkpoint_dir)
    for stale in folder.glob("*.ckpt.tmp-*"):
        log.info("removing %s (a checkpoint write that was interrupted)", stale)
        stale.unlink(missing_ok=True)
    last = folder / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    log.info("ckpt_path=last: no checkpoint in %s yet, starting from scratch", folder)
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, written to ``<name>.tmp-<pid>`` then renamed over ``<name>``."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
