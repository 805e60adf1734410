"""The learning curve of an ablation cell: compositional accuracy of the EMA model against training seconds.

Every ``every_n_steps`` optimizer steps the callback samples a fixed set of seen single-object prompts with the
cell's sampling settings, scores them with the evaluation package's detector and logs ``curve/single_object``,
``curve/colors`` and ``curve/train_seconds`` (training time without the curve's own evaluations) to the run's
loggers and ``<run>/curve.csv``. Off unless ``ablation.curve.every_n_steps`` > 0.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from typing_extensions import override

from k3lab.stages.diffusion import DiffusionStage

log = logging.getLogger(__name__)

FIELDS: tuple[str, ...] = ("step", "train_seconds", "single_object", "colors", "num_prompts")


class LearningCurve(L.Callback):
    """Periodic single-object / colour accuracy of the model being trained (see the module docstring)."""

    def __init__(
        self,
        prompts: Sequence[Any],
        every_n_steps: int,
        resolution: int,
        settings: dict[str, Any],
        out_file: str | Path,
    ) -> None:
        if every_n_steps <= 0:
            raise ValueError(f"ablation.curve.every_n_steps={every_n_steps}: must be > 0")
        self.prompts = list(prompts)
        self.every = int(every_n_steps)
        self.resolution = int(resolution)
        self.settings = settings
        self.out_file = Path(out_file)
        self.train_seconds = 0.0
        self._start = 0.0
        self._evaluating = 0.0  # seconds spent in this callback's evaluations (not training)
        self.rows: list[dict[str, float]] = []

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = int(trainer.global_step)
        if step % self.every == 0 and trainer.is_global_zero:
            # the training loop's wall time so far (data, steps, logging), without the curve's own evaluations
            self.train_seconds = time.perf_counter() - self._start - self._evaluating
            started = time.perf_counter()
            self.evaluate(trainer, pl_module, step)
            self._evaluating += time.perf_counter() - started

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        """Sample and score the curve's prompts with the current EMA model; returns the logged accuracies."""
        from evaluation.compbench import score
        from k3lab.ablation.evaluate import sample_records

        if not isinstance(pl_module, DiffusionStage):
            raise TypeError(f"the learning curve samples a diffusion stage, not {type(pl_module).__name__}")
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            records = sample_records(
                pl_module.generator(), self.prompts, self.resolution, self.settings, f"curve at step {step}"
            )
        pl_module.train(was_training)
        tasks = score((r.image, r.spec) for r in records)["all"]["tasks"]
        row = {
            "step": step,
            "train_seconds": round(self.train_seconds, 2),
            "single_object": tasks.get("single_object", float("nan")),
            "colors": tasks.get("colors", float("nan")),
            "num_prompts": len(records),
        }
        self.rows.append(row)
        for lg in trainer.loggers:
            lg.log_metrics({f"curve/{k}": float(row[k]) for k in FIELDS[1:4]}, step=step)
        new = not self.out_file.is_file()
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        with self.out_file.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        log.info(
            "curve: step %d, %.0f s of training: single_object %.3f, colors %.3f (%d prompts)",
            step,
            row["train_seconds"],
            row["single_object"],
            row["colors"],
            len(records),
        )
        return row
