"""Shared fixtures: the REAL Hydra config, composed and shrunk for CPU; a small scene world built once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
from omegaconf import DictConfig

from k3lab.run.config import compose

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)


def find_shared() -> Path:
    """The steering repo's ``shared/`` folder (prompt sets): ``$K3LAB_SHARED``, else ``../shared`` beside the
    checkout or beside any folder above it. The tests that read the real public files are skipped, with the path
    in the reason, when it is absent (the loaders' own tests write small files in each format and always run)."""
    if os.environ.get("K3LAB_SHARED"):
        return Path(os.environ["K3LAB_SHARED"])
    repo = Path(__file__).resolve().parents[1]
    for folder in (repo, *repo.parents):
        if (folder.parent / "shared" / "prompt-sets").is_dir():
            return folder.parent / "shared"
    return repo.parent / "shared"


SHARED = find_shared()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests run where CUDA exists and are reported as skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Small but real scene world used across tests (built once per session).
SMALL_WORLD = [
    "data.source.num_train=256",
    "data.source.num_val=64",
    "data.source.num_test=32",
    "data.source.num_heldout=32",
    "data.source.shard_size=64",
]


# A diffusion run shrunk for CPU tests: CSV logging, small batches, one validation batch, no bars
QUICK_DIFFUSION = [
    "logger=csv",
    "data.batch_size=8",
    "data.val_batch_size=16",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.limit_val_batches=1",
]

# experiment=text2image_tiny in pixel space at 16 px, shrunk for CPU tests (with SMALL_WORLD and the paths)
T2I_PIXEL_16 = [
    "experiment=text2image_tiny",
    "stage.first_stage.checkpoint=null",
    "model.unet.in_channels=3",
    "model.unet.out_channels=3",
    "stage.latent_scale=1.0",
    "data.resolution=16",
    *QUICK_DIFFUSION,
]


def compose_config(overrides: list[str], root: Path) -> DictConfig:
    """Compose conf/train.yaml as ``python -m k3lab.train`` would, with every path under ``root``."""
    return compose([f"paths.root_dir={root}", *overrides], output_dir=root / "run")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path: Path, data_root: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides)``: the tiny autoencoder experiment, shrunk for CPU tests, under tmp_path."""

    def make(*overrides: str, scene_world: bool = True) -> DictConfig:
        base = [
            "experiment=autoencoder_tiny",
            f"paths.data_dir={data_root}",
            *(SMALL_WORLD if scene_world else []),
            "logger=csv",
            "data.batch_size=8",
            "data.val_batch_size=32",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ]
        if not scene_world:
            base = [o for o in base if not o.startswith("data.")] + ["data=webdataset"]
        return compose_config([*base, *overrides], tmp_path)

    return make
