"""Progressive training: a chain of diffusion runs at growing resolution, each initialised from the previous one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from k3lab.io.checkpoint import load_state_dict
from k3lab.run.config import ConfigError
from k3lab.run.progressive import CHAIN_FILE, run_chain, stage_configs

from conftest import QUICK_DIFFUSION, SMALL_WORLD, compose_config

QUICK = [*SMALL_WORLD, *QUICK_DIFFUSION, "stage.validation.prompts=[a red circle]", "sampling.steps=2"]


def tiny_chain(root: Path, data_root: Path):
    cfg = compose_config(["experiment=progressive_tiny", f"paths.data_dir={data_root}", *QUICK], root)
    for stage, steps in zip(cfg.progressive.stages, (3, 2), strict=True):
        stage.overrides["trainer.max_steps"] = steps
        stage.overrides["trainer.val_check_interval"] = steps
    return cfg


def test_the_tiny_chain_trains_each_stage_from_the_previous_ones_weights(tmp_path: Path, data_root: Path) -> None:
    cfg = tiny_chain(tmp_path, data_root)
    records = run_chain(cfg)
    assert [r["folder"] for r in records] == ["0_px16", "1_px32"]
    assert [r["resolution"] for r in records] == [16, 32]
    first, second = (Path(r["checkpoint_dir"]) for r in records)
    assert records[0]["init_weights"] is None and records[1]["init_weights"] == str(first)
    assert OmegaConf.load(second / "config.yaml").data.resolution == 32
    # the second stage started from the first one's exported U-Net: built with its config, it holds those weights
    _, second_cfg = stage_configs(cfg)[1]
    second_cfg.stage.init_weights = str(first)
    started = instantiate(second_cfg.stage).unet.state_dict()
    exported = load_state_dict(first / "unet.safetensors")
    for name, value in exported.items():
        torch.testing.assert_close(started[name], value, msg=name)
    trained = load_state_dict(second / "unet.safetensors")
    assert any(not torch.equal(trained[n], exported[n]) for n in exported), "the 32 px stage did not train"
    assert json.loads((tmp_path / "run" / CHAIN_FILE).read_text())["stages"] == json.loads(json.dumps(records))


def test_a_restarted_chain_skips_finished_stages(tmp_path: Path, data_root: Path, monkeypatch) -> None:
    cfg = tiny_chain(tmp_path, data_root)
    root = tmp_path / "run"
    root.mkdir()
    done = {"folder": "0_px16", "resolution": 16, "checkpoint_dir": str(root / "0_px16" / "checkpoints")}
    (root / CHAIN_FILE).write_text(json.dumps({"stages": [{**done, "latent_scale": 1.0, "metrics": {}}]}))
    calls = []

    def fake_fit(stage_cfg, role=None):
        calls.append((stage_cfg.paths.output_dir, stage_cfg.stage.init_weights))
        raise RuntimeError("stop here")

    monkeypatch.setattr("k3lab.run.fitting.fit", fake_fit)
    with pytest.raises(RuntimeError, match="stop here"):
        run_chain(cfg)
    assert calls == [(str(root / "1_px32"), done["checkpoint_dir"])]


def test_malformed_chains_are_refused_by_name(tmp_path: Path, data_root: Path) -> None:
    cfg = tiny_chain(tmp_path, data_root)
    with open_dict(cfg):
        cfg.progressive.stages[1].overrides["data.resolutoin"] = 32
    with pytest.raises(ConfigError, match=r"stages\[1\] \(px32\): override 'data.resolutoin'"):
        stage_configs(cfg)
    cfg = tiny_chain(tmp_path, data_root)
    cfg.progressive.stages[1].name = "px16"
    with pytest.raises(ConfigError, match="unique name"):
        stage_configs(cfg)
    with pytest.raises(ValueError, match="k3lab.progressive"):
        from k3lab.train import train

        train(tiny_chain(tmp_path, data_root))
