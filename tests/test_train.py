"""Training runs end to end on CPU: the tiny autoencoder learns, exports, tracks and counts bad data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from k3lab.io.checkpoint import load_model
from k3lab.train import train

from test_datamodule import good, png, write_shard

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_autoencoder_psnr_clearly_improves(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg(
        "trainer.max_steps=80", "trainer.val_check_interval=80", "stage.disc_start=100000", "data.batch_size=16"
    )
    dm, stage = instantiate(cfg.data), instantiate(cfg.stage)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    before = trainer.validate(stage, datamodule=dm, verbose=False)[0]["val/psnr"]
    trainer.fit(stage, datamodule=dm)
    after = float(trainer.callback_metrics["val/psnr"])
    print(f"val PSNR {before:.2f} -> {after:.2f} dB")
    assert after > before + 5.0, (before, after)
    assert stage.autoencoder.quantize.restarts > 0  # dead codes were re-seeded
    used = stage.autoencoder.quantize.usage > 0.1 / stage.autoencoder.quantize.n_embed
    assert int(used.sum()) > 64  # the codebook is in use, not collapsed to a few codes


def test_gan_phase_steps_both_optimizers(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg(
        "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "stage.disc_start=1"
    )
    dm, stage = instantiate(cfg.data), instantiate(cfg.stage)
    disc_before = [p.detach().clone() for p in stage.discriminator.parameters()]
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.fit(stage, datamodule=dm)
    # 1 batch without the discriminator, then 2 optimizer steps per batch: 1 + 2 + 2 + 2 = 7 >= max_steps 6
    assert int(stage.batches_seen) == 4 and trainer.global_step == 7
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, stage.discriminator.parameters(), strict=False))
    assert "train/d_loss" in trainer.callback_metrics and "train/g_loss" in trainer.callback_metrics


def test_skipped_samples_are_logged(make_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(
        shards / "x-000.tar",
        sum((good(f"{i:03d}") for i in range(12)), []) + [("900.png", b"broken"), ("900.txt", b"c")],
    )
    write_shard(shards / "x-001.tar", sum((good(f"1{i:02d}") for i in range(12)), []) + [("901.png", png())])
    cfg = make_cfg(
        f"data.shards.train='{shards}/x-{{000..001}}.tar'",
        f"data.shards.val={shards}/x-000.tar",
        "data.resolution=64",
        "data.num_workers=0",
        "data.batch_size=4",
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
        "trainer.limit_val_batches=1",
        scene_world=False,
    )
    train(cfg)
    rows = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text()
    assert "data/train_skipped_undecodable_image" in rows and "data/train_skipped_missing_caption" in rows


def test_cli_end_to_end_with_mlflow(tmp_path: Path, data_root: Path) -> None:
    """`python -m k3lab.train` as users run it: MLflow params, config artifact, grids, exported model."""
    from conftest import SMALL_WORLD

    cmd = [
        sys.executable,
        "-m",
        "k3lab.train",
        "experiment=autoencoder_tiny",
        "debug=fast",
        f"paths.root_dir={tmp_path}",
        f"paths.data_dir={data_root}",
        *SMALL_WORLD,
        "data.batch_size=8",
        "callbacks.progress_bar.refresh_rate=1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"Epoch 0: +\d+%\|", out.stdout)  # a tqdm bar, visible even when the output is not a terminal
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/logs/mlflow.db" in out.stdout + out.stderr
    run_dirs = list((tmp_path / "logs" / "debug" / "runs").iterdir())
    assert len(run_dirs) == 1
    ckpt_dir = run_dirs[0] / "checkpoints"
    assert {"config.yaml", "autoencoder.safetensors", "last.ckpt"} <= {p.name for p in ckpt_dir.iterdir()}
    saved = OmegaConf.load(ckpt_dir / "config.yaml")
    assert saved.paths.checkpoint_dir == str(ckpt_dir) and saved.model.autoencoder.ch == 16
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    from_safetensors, from_ckpt = (
        load_model(ckpt_dir / "autoencoder.safetensors", "autoencoder"),
        load_model(ckpt_dir / "last.ckpt", "autoencoder"),
    )
    assert torch.allclose(from_safetensors.eval().encode(x), from_ckpt.eval().encode(x))
    assert list((run_dirs[0] / "images").glob("val_reconstructions_*.png"))

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/logs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("debug").experiment_id])
    assert run.data.params["choice/model/autoencoder"] == "movq_tiny"
    assert run.data.params["choice/experiment"] == "autoencoder_tiny"
    assert run.data.tags["checkpoint/autoencoder"] == str(ckpt_dir / "autoencoder.safetensors")
    assert "val/psnr" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts


def test_cli_bad_value_fails_before_training(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "k3lab.train",
        "data.source.resolution=-64",
        f"paths.root_dir={tmp_path}",
        "logger=csv",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert "data.resolution=-64: must be a positive integer" in out.stderr
    assert not (tmp_path / "data").exists()  # nothing generated, nothing trained


def test_train_refuses_an_ablation_preset_and_names_the_entry_point(tmp_path: Path) -> None:
    from conftest import compose_config

    cfg = compose_config(["experiment=ablation_tiny", "logger=csv"], tmp_path)
    with pytest.raises(ValueError, match=r"python -m k3lab.ablation -m experiment=<preset>"):
        train(cfg)
