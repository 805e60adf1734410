"""A CSV logger whose rows survive a kill: the run's ``metrics.csv`` is appended to when the run resumes in place
(Lightning's deletes it), and :class:`k3lab.run.resume.KeepLogs` writes the buffered rows at every checkpoint and
drops the rows a killed run logged after the checkpoint its successor resumes from (they are logged again)."""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override


class KeptCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is kept and appended to (its header read)."""

    @override
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):  # (a run folder: always a local path)
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])

    def drop_from_step(self, step: int) -> int:
        """Remove the rows logged at ``step`` or later, written or buffered; returns how many were written."""
        self.metrics = [m for m in self.metrics if int(m.get("step", 0)) < step]
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), list(reader)
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(kept) == len(rows):
            return 0
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)  # a kill leaves the old file or the new one, never half of one
        return len(rows) - len(kept)


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing through :class:`KeptCSVWriter` (``logger=csv``)."""

    @property
    @rank_zero_experiment
    @override
    def experiment(self) -> KeptCSVWriter:  # pyright: ignore[reportIncompatibleMethodOverride]
        if isinstance(self._experiment, KeptCSVWriter):
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = KeptCSVWriter(log_dir=self.log_dir)
        return self._experiment
