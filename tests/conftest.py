"""Shared fixtures: the REAL Hydra config, composed and shrunk for CPU; a small scene world built once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from k3lab.config import CONF_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

SHARED = Path(__file__).resolve().parents[2] / "shared"

# Small but real scene world used across tests (built once per session).
SMALL_WORLD = [
    "data.source.num_train=256", "data.source.num_val=64", "data.source.num_test=32",
    "data.source.num_heldout=32", "data.source.shard_size=64",
]


def compose_config(overrides: list[str], root: Path) -> DictConfig:
    """Compose conf/train.yaml as ``python -m k3lab.train`` would, with every path under ``root``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[f"paths.root_dir={root}", *overrides])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(root / "run")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path: Path, data_root: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides)``: the tiny autoencoder experiment, shrunk for CPU tests, under tmp_path."""

    def make(*overrides: str, scene_world: bool = True) -> DictConfig:
        base = [
            "experiment=autoencoder_tiny", f"paths.data_dir={data_root}", *(SMALL_WORLD if scene_world else []),
            "logger=csv", "data.batch_size=8", "data.val_batch_size=32", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ]
        if not scene_world:
            base = [o for o in base if not o.startswith("data.")] + ["data=webdataset"]
        return compose_config([*base, *overrides], tmp_path)

    return make
