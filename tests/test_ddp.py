"""Two CPU processes (gloo): a real tiny diffusion run under trainer=ddp_cpu, as `python -m k3lab.train` runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_process_ddp_diffusion_run(tmp_path: Path, data_root: Path) -> None:
    """Shards split by rank, the same latent scale on both ranks, validation on both (no hang), one Hydra run folder
    (both ranks log into its one log file), one MLflow run, rank 0's checkpoints that load."""
    from conftest import SMALL_WORLD, T2I_PIXEL_16

    overrides = [o for o in T2I_PIXEL_16 if not o.startswith(("logger=", "stage.latent_scale"))]
    cmd = [
        sys.executable,
        "-m",
        "k3lab.train",
        *overrides,
        "trainer=ddp_cpu",
        "trainer.devices=2",
        f"paths.root_dir={tmp_path}",
        f"paths.data_dir={data_root}",
        *SMALL_WORLD,
        "stage.latent_scale=auto",
        "stage.validation.prompts=[a red circle,a blue square]",
        "sampling.steps=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "task_name=ddp",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    (run_dir,) = list((tmp_path / "logs" / "ddp" / "runs").iterdir())  # one folder for both ranks
    (log_file,) = list(run_dir.glob("*.log"))  # both ranks log into the run's one log file
    text = log_file.read_text()
    assert "rank 0 of 2 trains on 2 of 4 training shards" in text
    assert "rank 1 of 2 trains on 2 of 4 training shards" in text
    scales = re.findall(r"latent scale measured on the first batch: ([\d.]+)", text)
    assert len(scales) == 2 and scales[0] == scales[1]  # all-reduced: one scale for both ranks
    assert not (run_dir / ".hydra" / "overrides.yaml").read_text().count("train_ddp_process")  # rank 0's config
    ckpt_dir = run_dir / "checkpoints"
    assert {"unet.safetensors", "last.ckpt"} <= {p.name for p in ckpt_dir.iterdir()}
    state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4
    assert len(list((run_dir / "images").glob("val_samples_*.png"))) == 2  # validation at steps 2 and 4, rank 0 only

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/logs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FINISHED"
    assert "val/loss" in run.data.metrics and run.data.params["choice/trainer"] == "ddp_cpu"
