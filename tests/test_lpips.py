"""LPIPS from local weights only: a clear error without them, a working metric with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from k3lab.nn.lpips import build_lpips
from k3lab.nn.movq import MoVQ
from k3lab.stages.autoencoder import AutoencoderStage


def test_missing_vgg_weights_say_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"VGG16 weights at {tmp_path}/vgg\.pth"):
        build_lpips(tmp_path / "vgg.pth")


def test_perceptual_loss_without_weights_path_is_refused() -> None:
    with pytest.raises(ValueError, match="perceptual_weight > 0 needs stage.vgg_weights"):
        AutoencoderStage(MoVQ(ch=16, ch_mult=(1, 2), num_res_blocks=1, n_embed=8, num_groups=8), perceptual_weight=0.1)


def test_lpips_loads_a_local_vgg(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16_features.pth"
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, path)
    lp = build_lpips(path)
    assert torch.equal(lp.net.slice3._modules["14"].weight, vgg.features[14].weight)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    same = lp(x, x).flatten()
    other = lp(x, torch.rand(2, 3, 32, 32) * 2 - 1).flatten()
    assert torch.allclose(same, torch.zeros(2), atol=1e-6) and (other > 0).all()
    assert not any(p.requires_grad for p in lp.parameters())


def test_wrong_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"other\.pth: not a VGG16 state dict"):
        build_lpips(path)
