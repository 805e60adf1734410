"""Errors keep their cause: a failed MLflow lookup names the URI and the original error, and a store that cannot
answer never silently starts a new sweep parent run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from k3lab.ablation.report import resolve_source
from k3lab.tracking.sweep import SWEEP_FILE, MLflowSweepCallback


class Client:
    """An MLflow client whose ``get_run`` raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def get_run(self, run_id: str) -> None:
        raise self.error


def sweep(tmp_path: Path, uri: str) -> Path:
    (tmp_path / SWEEP_FILE).write_text(json.dumps({"tracking_uri": uri, "parent_run_id": "abc"}))
    return tmp_path


def test_a_store_that_cannot_answer_is_an_error_not_a_new_parent(tmp_path: Path) -> None:
    down = MlflowException("connection refused", error_code=TEMPORARILY_UNAVAILABLE)
    with pytest.raises(RuntimeError, match="http://mlflow:5000.*connection refused") as info:
        MLflowSweepCallback.resume(Client(down), sweep(tmp_path, "http://mlflow:5000"), "http://mlflow:5000")
    assert info.value.__cause__ is down


def test_a_deleted_parent_starts_a_new_one_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gone = MlflowException("run abc not found", error_code=RESOURCE_DOES_NOT_EXIST)
    assert MLflowSweepCallback.resume(Client(gone), sweep(tmp_path, "sqlite:///x.db"), "sqlite:///x.db") is False
    assert "is gone" in caplog.text


def test_report_names_the_uri_and_keeps_the_cause(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(FileNotFoundError, match="neither a sweep folder nor a run id in sqlite") as info:
        resolve_source("0123456789abcdef0123456789abcdef", uri)
    assert isinstance(info.value.__cause__, MlflowException)
