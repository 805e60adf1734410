"""Preemption: a scheduler's warning signal saves a checkpoint and requeues the job into the same run folder.

SLURM sends ``--signal=USR1@<seconds>`` before a time limit or preemption; submitit sends USR2 (its default,
``SUBMITIT_PREEMPT_SIGNAL``). :class:`Preemption` catches those signals, lets the current training step finish,
writes ``last.ckpt`` (atomically, with the random state, the data position and the MLflow run id, see
:mod:`k3lab.run.resume`) and then requeues: through submitit's own handler when submitit runs the job (the Hydra
launchers ``slurm``/``slurm_local``), with ``scontrol requeue`` in a plain SLURM job, or, outside a scheduler, by
stopping the run cleanly. The requeued job resumes from that checkpoint (a cluster job resumes ``last.ckpt`` by
itself, :func:`k3lab.run.resume.resolve_ckpt_path`) and logs into the same MLflow run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

import lightning as L
from typing_extensions import override

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    """Checkpoint-and-requeue on ``signals`` (names such as ``SIGUSR1``)."""

    def __init__(self, signals: Sequence[str] = ("SIGUSR1", "SIGUSR2"), requeue: bool = True) -> None:
        self.signals = [getattr(signal, name) for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self._saved: int | None = None
        self._previous: dict[int, Any] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # acted on after the current training step: never a half-written state

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.received is None:
            return
        self._saved, self.received = self.received, None
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        log.warning(
            "%s received: saved %s at step %d", signal.Signals(self._saved).name, path, int(trainer.global_step)
        )
        if not (self.requeue and trainer.is_global_zero):
            trainer.should_stop = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Requeue before the next step (the saved step's metrics are logged by then); after the last step the run
        simply ends."""
        signum, self._saved = self._saved, None
        if signum is None or not (self.requeue and trainer.is_global_zero):
            return
        previous = self._previous.get(signum)
        if callable(previous):  # submitit's handler: pickles the job's checkpoint() and requeues it, then exits
            log.warning("requeueing through submitit")
            previous(signum, None)
        elif os.environ.get("SLURM_JOB_ID"):
            job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
            if os.environ.get("SLURM_ARRAY_TASK_ID"):
                job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            log.warning("scontrol requeue %s: %s", job, "ok" if result.returncode == 0 else result.stderr.strip())
            trainer.should_stop = True
        else:
            log.warning("not under a scheduler: stopping after the checkpoint (resume with ckpt_path=last)")
            trainer.should_stop = True

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """``last.ckpt`` in the ModelCheckpoint's folder (else the trainer's root)."""
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(folder or trainer.default_root_dir) / "last.ckpt"
