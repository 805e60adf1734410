"""MLflow across a Hydra multirun: one parent run per sweep, each job a child run.

The parent is created once, by a Hydra callback at multirun start (``hydra.callbacks.mlflow_sweep``), which also
creates the experiment, so parallel jobs never race to create it. The sweep folder gets ``mlflow_sweep.json``
(tracking URI, experiment id, parent run id); every job reads it and tags its run ``mlflow.parentRunId``. At the
end, children still RUNNING (killed hard) are marked FAILED, and so are parents of earlier sweeps whose
process is gone. A re-run makes a new parent: earlier runs are never touched except for that status fix.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "k3lab.role"  # sweep | cell | shared | run
HOST_TAG, PID_TAG = "k3lab.host", "k3lab.pid"


def process_tags() -> dict[str, str]:
    """Tags naming this process (host and pid), so a later run can tell a live sweep from a dead one."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def read_sweep_file(sweep_dir: str | Path) -> dict[str, str] | None:
    """The sweep folder's ``mlflow_sweep.json`` (parent run, store, axes), or None when absent."""
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def swept_values(sweeps: Mapping[str, str] | None = None, overrides: Sequence[str] = ()) -> dict[str, list[str]]:
    """Each swept key's values as listed, written as Hydra writes a job's override.

    ``sweeps`` maps keys to sweep expressions (``hydra.sweeper.params``); ``overrides`` are command-line overrides,
    which win over ``sweeps`` as in Hydra's basic sweeper. Any sweep syntax Hydra parses is understood: ``a,b``,
    ``choice(a,b)``, ``range(0,3)``, ``shuffle(...)`` (as listed, before shuffling). A sweep that needs the config to
    expand (``glob(...)``) is left out.
    """
    import dataclasses

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    items = [f"{k}={v}" for k, v in (sweeps or {}).items()] + list(overrides)
    out: dict[str, list[str]] = {}
    for item in items:
        try:
            override = parser.parse_override(item)
        except HydraException:
            continue
        if override.get_key_element().startswith("hydra"):
            continue
        if not override.is_sweep_override():  # a single value on the command line: that key is not swept
            out.pop(override.get_key_element().lstrip("+~"), None)
            continue
        value = override.value()
        if isinstance(value, (ChoiceSweep, RangeSweep)) and value.shuffle:
            override._value = dataclasses.replace(value, shuffle=False)  # as listed
        try:
            values = list(override.sweep_string_iterator())
        except HydraException:  # glob(): expanding it needs the config's group options
            continue
        if values:
            out[override.get_key_element().lstrip("+~")] = values
    return out


def sweep_reference(sweeps: Mapping[str, str] | None = None, overrides: Sequence[str] = ()) -> dict[str, str]:
    """The reference level of each swept key: the first value its sweep lists (:func:`swept_values`); a ``glob(...)``
    sweep is left out, its reference is then the first job's value."""
    return {key: values[0] for key, values in swept_values(sweeps, overrides).items()}


def run_tags() -> dict[str, str]:
    """Tags that place this process's run in a sweep: the parent (``mlflow.parentRunId``) and the run's role.

    A Hydra multirun job reads the parent from its sweep folder (role ``job``; an ablation cell's logger makes it
    ``cell``), a single run gets role ``run``; a shared part trained for a sweep (autoencoder, CLIP, prior) gets both
    from the
    ``K3LAB_PARENT_RUN_ID`` / ``K3LAB_RUN_ROLE`` environment its cell sets."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    tags = process_tags()
    if os.environ.get("K3LAB_PARENT_RUN_ID"):
        tags[PARENT_TAG] = os.environ["K3LAB_PARENT_RUN_ID"]
        tags[ROLE_TAG] = os.environ.get("K3LAB_RUN_ROLE", "shared")
        return tags
    tags[ROLE_TAG] = "run"
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        info = read_sweep_file(HydraConfig.get().sweep.dir)
        if info is not None:
            tags[PARENT_TAG] = info["parent_run_id"]
            tags[ROLE_TAG] = "job"
            tags["k3lab.job"] = str(HydraConfig.get().job.num)
    return tags


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_stale(client: Any, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of ``experiment_id`` started on this host by a process that is gone."""
    failed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000):
        tags = run.data.tags
        if (
            tags.get(HOST_TAG) == socket.gethostname()
            and tags.get(PID_TAG, "").isdigit()
            and not _pid_alive(int(tags[PID_TAG]))
        ):
            client.set_terminated(run.info.run_id, "FAILED")
            client.set_tag(
                run.info.run_id,
                "k3lab.failure",
                "process gone while RUNNING (killed hard); marked failed by a later sweep",
            )
            failed.append(run.info.run_id)
    return failed


def children(client: Any, experiment_id: str, parent_id: str, role: str | None = None) -> list[Any]:
    """The child runs of a sweep's parent run, optionally of one role."""
    query = f"tags.`{PARENT_TAG}` = '{parent_id}'"
    if role:
        query += f" and tags.`{ROLE_TAG}` = '{role}'"
    return client.search_runs([experiment_id], filter_string=query, max_results=10000)


def _mlflow_settings(config: DictConfig) -> tuple[str, str] | None:
    """(tracking URI, experiment name) when the composed config logs to MLflow, else None."""
    node = OmegaConf.select(config, "logger.mlflow")
    if not node:
        return None
    return str(node.tracking_uri), str(node.experiment_name)


def sweep_dir_of(config: DictConfig) -> Path:
    """The sweep folder of a multirun config."""
    return Path(str(config.hydra.sweep.dir))


class MLflowSweepCallback(Callback):
    """Hydra callback: the sweep's MLflow parent run and stale-run clean-up (the report is its own callback,
    :class:`k3lab.ablation.report.ReportCallback`, which reads what this one writes)."""

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        settings = _mlflow_settings(config)
        if settings is None:
            return
        from mlflow.tracking import MlflowClient

        from k3lab.tracking.mlflow import RetryingClient, mark_model_training

        uri, name = settings
        client = RetryingClient(MlflowClient(uri))
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        mark_model_training(client, experiment_id)
        stale = mark_stale(client, experiment_id)
        if stale:
            log.warning(
                "marked %d stale RUNNING run(s) of experiment %r failed: %s", len(stale), name, ", ".join(stale)
            )
        sweep_dir = sweep_dir_of(config)
        if self.resume(client, sweep_dir, uri):
            return
        params_node = config.hydra.sweeper.get("params")  # None when the sweep is given on the command line only
        params = OmegaConf.to_container(params_node, resolve=True) if params_node is not None else {}
        assert isinstance(params, dict), f"hydra.sweeper.params must be a mapping, got {params!r}"
        overrides = list(config.hydra.overrides.task)
        run = client.create_run(
            experiment_id,
            run_name=f"sweep {sweep_dir.name}",
            tags={ROLE_TAG: "sweep", "k3lab.sweep_dir": str(sweep_dir), **process_tags()},
        )
        # every swept key, from the preset's sweeper params and the command line (which wins, as in Hydra)
        swept = swept_values({str(k): str(v) for k, v in params.items()}, overrides)
        for key, value in {
            **{f"sweep/{k}": ",".join(v) for k, v in swept.items()},
            "sweep/overrides": " ".join(overrides)[:6000],
            **{f"reference/{k}": v[0] for k, v in swept.items()},
        }.items():
            client.log_param(run.info.run_id, key, value)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        info = {
            "tracking_uri": uri,
            "experiment_id": experiment_id,
            "experiment_name": name,
            "parent_run_id": run.info.run_id,
            "reference": {k: v[0] for k, v in swept.items()},
        }
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=1))
        log.info("MLflow parent run %s (experiment %r) for sweep %s", run.info.run_id, name, sweep_dir)

    @staticmethod
    def resume(client: Any, sweep_dir: Path, uri: str) -> bool:
        """A sweep re-run into its own folder (``hydra.sweep.dir=<that folder>``) continues its parent run: finished
        cells are skipped and killed ones resume from their checkpoints (:func:`k3lab.ablation.cell.run_cell`)."""
        info = read_sweep_file(sweep_dir)
        if info is None or info.get("tracking_uri") != uri:
            return False
        from mlflow.exceptions import MlflowException

        try:
            parent = client.get_run(info["parent_run_id"])
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # a store that cannot answer: never a silent new parent
                raise RuntimeError(
                    f"sweep {sweep_dir}: could not look up its MLflow parent run {info['parent_run_id']} in {uri}: {e}"
                ) from e
            log.warning(
                "sweep %s: its MLflow parent run %s is gone from %s; starting a new parent run",
                sweep_dir,
                info["parent_run_id"],
                uri,
            )
            return False
        client.update_run(parent.info.run_id, status="RUNNING")
        for key, value in process_tags().items():
            client.set_tag(parent.info.run_id, key, value)
        log.info("resuming sweep %s: continuing its MLflow parent run %s", sweep_dir, parent.info.run_id)
        return True

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        info = read_sweep_file(sweep_dir_of(config))
        if info is None or _mlflow_settings(config) is None:
            return
        from mlflow.tracking import MlflowClient

        from k3lab.tracking.mlflow import RetryingClient

        client = RetryingClient(MlflowClient(info["tracking_uri"]))
        kids = children(client, info["experiment_id"], info["parent_run_id"])
        stale = [r.info.run_id for r in kids if r.info.status == "RUNNING"]
        for run_id in stale:
            client.set_terminated(run_id, "FAILED")
            client.set_tag(run_id, "k3lab.failure", "still RUNNING when the sweep ended (killed hard); marked failed")
        if stale:
            log.warning("marked %d child run(s) failed that were still RUNNING at the sweep's end", len(stale))
        failed = bool(stale) or any(r.info.status == "FAILED" for r in kids)
        client.set_terminated(info["parent_run_id"], "FAILED" if failed else "FINISHED")
