"""trainer=fsdp's sharded checkpoints (state_dict_type: sharded) consolidate into one .ckpt that samples and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k3lab.convert.__main__ import main as convert_main
from k3lab.convert.consolidate import META_FILE, consolidate, read_sharded
from k3lab.io.checkpoint import CheckpointError

from conftest import SMALL_WORLD, T2I_PIXEL_16, compose_config


def shard_like_lightning(ckpt: dict, folder: Path) -> None:
    """What Lightning's FSDPStrategy.save_checkpoint does with state_dict_type='sharded' (its own writer): the model
    and optimizer states through torch.distributed.checkpoint, the rest as meta.pt."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

    ckpt = dict(ckpt)
    folder.mkdir(parents=True)
    converted = {"model": ckpt.pop("state_dict")}
    converted.update({f"optimizer_{i}": o for i, o in enumerate(ckpt.pop("optimizer_states", []))})
    _distributed_checkpoint_save(converted, folder)
    torch.save(ckpt, folder / META_FILE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from k3lab.train import train

    root = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        [
            *T2I_PIXEL_16,
            *SMALL_WORLD,
            f"paths.data_dir={root / 'data'}",
            "trainer.max_steps=2",
            "stage.validation.prompts=[]",
        ],
        root,
    )
    train(cfg)
    return Path(cfg.paths.checkpoint_dir)


def test_a_sharded_checkpoint_consolidates_to_the_full_one_and_samples(trained: Path) -> None:
    from k3lab.inference.loading import load_generator

    full = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=True)
    # FSDP's optimizer state is keyed by parameter name (FSDP.optim_state_dict), not by index
    names = list(full["state_dict"])
    optim = {
        "state": {names[i]: s for i, s in full["optimizer_states"][0]["state"].items()},
        "param_groups": full["optimizer_states"][0]["param_groups"],
    }
    sharded = trained / "sharded.ckpt"
    shard_like_lightning({**full, "optimizer_states": [optim]}, sharded)
    out = consolidate(sharded)
    assert out == trained / "sharded.consolidated.ckpt"
    got = torch.load(out, map_location="cpu", weights_only=True)
    assert got["global_step"] == full["global_step"] == 2 and got["state_dict"].keys() == full["state_dict"].keys()
    for k, v in full["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k
    some = names[0]
    assert torch.equal(got["optimizer_states"][0]["state"][some]["exp_avg"], optim["state"][some]["exp_avg"])
    a, _ = load_generator(trained / "last.ckpt")
    b, _ = load_generator(out)
    for (k, v), w in zip(a.unet.state_dict().items(), b.unet.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert convert_main(["consolidate", str(sharded)]) == 2  # never overwrites


def test_broken_sharded_checkpoints_are_named(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        read_sharded(trained)  # a plain folder
    full = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=True)
    folder = tmp_path / "cut.ckpt"
    shard_like_lightning({k: v for k, v in full.items() if k != "optimizer_states"}, folder)
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert convert_main(["consolidate", str(folder), "--out", str(tmp_path / "x.ckpt")]) == 2
    assert "cannot be read" in capsys.readouterr().err and not (tmp_path / "x.ckpt").exists()
