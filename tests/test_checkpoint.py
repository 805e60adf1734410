"""Checkpoints: weights_only / safetensors only; truncated or foreign files give clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from k3lab.io.checkpoint import CheckpointError, export_model, load_model, load_state_dict, load_weights, save_config
from k3lab.nn.movq import MoVQ

TINY = dict(_target_="k3lab.nn.movq.MoVQ", ch=16, ch_mult=[1, 2], num_res_blocks=1, n_embed=8, num_groups=8)


class Foreign:
    """Not a tensor: unpickling it needs arbitrary code, which weights_only refuses."""


def tiny() -> MoVQ:
    torch.manual_seed(0)
    return MoVQ(**{k: v for k, v in TINY.items() if k != "_target_"})


def test_export_then_rebuild_from_the_file_alone(tmp_path: Path) -> None:
    model = tiny()
    save_config(OmegaConf.create({"model": {"autoencoder": TINY}}), tmp_path)
    path = export_model(model, tmp_path / "autoencoder.safetensors")
    rebuilt = load_model(path, "autoencoder")
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(rebuilt.encode(x), model.encode(x))


def test_lightning_style_checkpoint_prefers_ema(tmp_path: Path) -> None:
    live, ema = tiny(), tiny()
    for p in ema.parameters():
        p.data.add_(1.0)
    state = {f"autoencoder.{k}": v for k, v in live.state_dict().items()}
    state |= {f"autoencoder_ema.module.{k}": v for k, v in ema.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "last.ckpt")
    save_config(OmegaConf.create({"model": {"autoencoder": TINY}}), tmp_path)
    rebuilt = load_model(tmp_path / "last.ckpt", "autoencoder")
    assert torch.equal(rebuilt.encoder.conv_in.weight, ema.encoder.conv_in.weight)


def test_truncated_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    model = tiny()
    st = export_model(model, tmp_path / "m.safetensors")
    st.write_bytes(st.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"m\.safetensors: truncated or not a safetensors file"):
        load_state_dict(st)
    pt = tmp_path / "m.pt"
    torch.save(model.state_dict(), pt)
    pt.write_bytes(pt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"m\.pt: cannot be read with torch\.load\(weights_only=True\)"):
        load_state_dict(pt)


def test_foreign_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Foreign()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Foreign()))
    with pytest.raises(CheckpointError):
        load_state_dict(plain)


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_missing_file_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")
    path = export_model(tiny(), tmp_path / "alone.safetensors")
    with pytest.raises(CheckpointError, match="no config.yaml beside it"):
        load_model(path, "autoencoder")


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    model = tiny()
    state = model.state_dict()
    state["encoder.conv_in.weight"] = torch.zeros(1, 1, 1, 1)
    del state["decoder.conv_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_weights(tiny(), state, "x.safetensors")
    msg = str(info.value)
    assert "decoder.conv_out.bias" in msg and "extra.weight" in msg and "encoder.conv_in.weight" in msg
