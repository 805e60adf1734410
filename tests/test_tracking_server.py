"""MLflow for clusters: a real ``mlflow server`` with two parallel jobs of a sweep, the embedded sqlite store with two
parallel jobs, and the retry that keeps a locked sqlite store from failing a job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from k3lab.tracking.mlflow import RetryingClient

from conftest import SMALL_WORLD

ROOT = Path(__file__).resolve().parents[1]
JOB = [
    "experiment=text2image_tiny",
    "stage.first_stage.checkpoint=null",
    "model.unet.in_channels=3",
    "model.unet.out_channels=3",
    "stage.latent_scale=1.0",
    "data.resolution=16",
    "data.batch_size=8",
    *SMALL_WORLD,
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "stage.validation.prompts=[a red circle]",
    "sampling.steps=2",
]


def sweep(tmp_path: Path, data_root: Path, env: dict[str, str], *extra: str) -> Path:
    """A two-job parallel sweep (joblib, hydra/launcher=local_parallel) over seeds; returns its folder."""
    folder = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "k3lab.train",
            "-m",
            "hydra/launcher=local_parallel",
            "seed=0,1",
            *JOB,
            f"paths.root_dir={tmp_path}",
            f"paths.data_dir={data_root}",
            f"paths.weights_dir={data_root / 'weights'}",
            f"hydra.sweep.dir={folder}",
            *extra,
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return folder


def check_sweep(uri: str, artifacts: bool = True) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("text2image_tiny")
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"  # the UI opens the runs table
    parents = client.search_runs([experiment.experiment_id], "tags.`k3lab.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(kids) == 2 and {k.data.params["seed"] for k in kids} == {"0", "1"}
    for kid in kids:
        assert kid.info.status == "FINISHED" and "train/loss" in kid.data.metrics and "val/loss" in kid.data.metrics
        assert len(client.get_metric_history(kid.info.run_id, "train/loss")) == 3
        if artifacts:
            names = {a.path for a in client.list_artifacts(kid.info.run_id)}
            images = [a.path for a in client.list_artifacts(kid.info.run_id, "images")]
            assert "config.yaml" in names and any("val_samples" in n for n in images), (names, images)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_parallel_jobs_log_to_a_real_mlflow_server(tmp_path: Path, data_root: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read()[-3000:]
            assert time.monotonic() - start < 120, "mlflow server did not start"
            time.sleep(0.5)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        sweep(tmp_path, data_root, env, "logger=mlflow_server")
        check_sweep(uri)
        assert any((tmp_path / "artifacts").rglob("config.yaml"))  # stored by the server, not by the jobs
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_two_parallel_jobs_share_the_embedded_sqlite_store(tmp_path: Path, data_root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    uri = f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}"
    sweep(tmp_path, data_root, env, "logger=mlflow")
    check_sweep(uri, artifacts=False)


class Flaky:
    """A client whose ``log_metric`` finds the store locked ``locked`` times, then works."""

    def __init__(self, locked: int, error: str = "(sqlite3.OperationalError) database is locked") -> None:
        self.locked, self.error, self.calls = locked, error, 0
        self.name = "client"

    def log_metric(self, *args: object) -> str:
        self.calls += 1
        if self.calls <= self.locked:
            raise MlflowException(self.error)
        return "logged"


def test_a_locked_sqlite_store_is_retried_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    client = RetryingClient(Flaky(3), first_wait=0.01, max_wait=0.02)
    assert client.log_metric("run", "x", 1.0) == "logged" and client._client.calls == 4
    assert client.name == "client"  # attributes pass through
    assert caplog.text.count("MLflow store locked (log_metric): retrying") == 3
    with pytest.raises(MlflowException, match="database is locked"):  # gives up after its attempts
        RetryingClient(Flaky(99), attempts=3, first_wait=0.01).log_metric("run", "x", 1.0)
    other = Flaky(1, error="RESOURCE_DOES_NOT_EXIST: no such run")
    with pytest.raises(MlflowException, match="no such run"):  # other errors are not retried
        RetryingClient(other, first_wait=0.01).log_metric("run", "x", 1.0)
    assert other.calls == 1
