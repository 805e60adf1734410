"""MoVQ: exact preset sizes, the quantiser, the continuous and quantised decode paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from k3lab.nn.movq import MoVQ, count_parameters
from k3lab.nn.quantizer import VectorQuantizer

from conftest import compose_config

# (preset, params without codebook, params with codebook) from reference/kandinsky3-architecture.md
PRESETS = [
    ("movq_270m", 270_603_567, 270_669_103),
    ("movq_67m", 67_766_959, 67_766_959 + 16384 * 4),
    ("movq_102m", 101_548_719, 101_548_719 + 16384 * 4),
]


@pytest.mark.parametrize("preset,without,with_codebook", PRESETS)
def test_preset_parameter_counts(preset: str, without: int, with_codebook: int, tmp_path: Path) -> None:
    cfg = compose_config([f"model/autoencoder={preset}"], tmp_path)
    with torch.device("meta"):
        model = instantiate(cfg.model.autoencoder)
    assert count_parameters(model, exclude_codebook=True) == without
    assert count_parameters(model) == with_codebook


def test_270m_encoder_decoder_split_and_diffusers_peer() -> None:
    with torch.device("meta"):
        model = MoVQ()
    assert count_parameters(model.encoder) == 109_485_316
    assert count_parameters(model.decoder) == 161_118_211
    assert count_parameters(model.quant_conv) == count_parameters(model.post_quant_conv) == 20
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        peer = diffusers.VQModel(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
            block_out_channels=(256, 512, 512, 1024),
            layers_per_block=2,
            latent_channels=4,
            num_vq_embeddings=16384,
            vq_embed_dim=4,
            norm_type="spatial",
            mid_block_add_attention=True,
        )
    assert sum(p.numel() for p in peer.parameters()) == count_parameters(model) == 270_669_103


def test_tiny_preset_shapes_and_factor(tmp_path: Path) -> None:
    """The tiny preset: 64 px -> 8x8x4 latents and back, and exactly the parameter count docs/training.md states."""
    cfg = compose_config(["model/autoencoder=movq_tiny"], tmp_path)
    model = instantiate(cfg.model.autoencoder).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    latent = model.encode(x)
    assert model.downsample_factor == 8 and latent.shape == (2, 4, 8, 8)
    assert model.decode(latent).shape == (2, 3, 64, 64)
    assert count_parameters(model) == 2_943_807  # docs/training.md: `movq_tiny` (2,943,807 parameters ...)


def test_quantiser_picks_nearest_codes_and_passes_gradients_straight_through() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(n_embed=32, embed_dim=4, beta=0.25)
    vq.embedding.weight.data = torch.randn(32, 4)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    out = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, vq.embedding.weight).argmin(1).view(2, 3, 5)
    assert torch.equal(out.indices, brute)
    assert torch.allclose(out.z_q, vq.embedding.weight[brute].permute(0, 3, 1, 2), atol=1e-6)
    upstream = torch.randn_like(z)
    (out.z_q * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)  # identity gradient through the quantiser
    # loss = ||sg(z) - e||^2 + beta ||z - sg(e)||^2, both equal in value
    d = (out.z_q.detach() - z.detach()).pow(2).mean()
    assert torch.allclose(out.loss, 1.25 * d)


def test_codebook_loss_moves_codes_and_commitment_moves_encoder() -> None:
    vq = VectorQuantizer(n_embed=4, embed_dim=2, beta=0.25)
    z = torch.randn(1, 2, 2, 2, requires_grad=True)
    vq(z).loss.backward()
    assert vq.embedding.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_continuous_and_quantised_paths_differ_only_by_quantisation() -> None:
    torch.manual_seed(0)
    model = MoVQ(ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16, num_groups=8).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latent = model.encode(x)
        assert torch.allclose(model.decode(latent, quantize=False), model(x, quantize=False).reconstruction, atol=1e-6)
        q = model.quantize(latent).z_q
        assert torch.allclose(model.decode(latent, quantize=True), model.decode(q), atol=1e-6)
        assert not torch.allclose(model.decode(latent), model.decode(q))


def test_decoder_norms_are_conditioned_on_the_latent() -> None:
    """Changing zq (with the same post_quant_conv input) changes the output: spatial norms read zq."""
    torch.manual_seed(0)
    model = MoVQ(ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16, num_groups=8).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        a = model.decoder(model.post_quant_conv(z), z)
        b = model.decoder(model.post_quant_conv(z), z + 1.0)
    assert (a - b).abs().max() > 1e-3


def test_bad_constructor_values_are_named() -> None:
    with pytest.raises(ValueError, match="ch must be positive, got -8"):
        MoVQ(ch=-8)
    with pytest.raises(ValueError, match="num_groups=32"):
        MoVQ(ch=24)


def test_dead_codes_are_restarted_from_encoder_outputs() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(n_embed=64, embed_dim=4, restart_dead_codes=True, restart_every=5).train()
    z = torch.randn(4, 4, 8, 8) * 3 + 5  # far from the tiny initial codebook: everything maps to a few codes
    for _ in range(30):
        vq(z.clone().requires_grad_(True))
    assert vq.restarts > 0
    used = torch.unique(vq(z.clone().requires_grad_(True)).indices).numel()
    assert used > 16
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    near = torch.cdist(vq.embedding.weight.detach(), flat).min(1).values
    assert (near < 1e-5).sum() > 16  # re-seeded codes are actual encoder outputs
    assert "usage" not in vq.state_dict()  # checkpoints keep MoVQ's exact keys
