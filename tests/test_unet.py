"""The Kandinsky 3 U-Net: exact sizes, topology, both block types, attention-mask semantics."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from k3lab.nn.attention import AttentionPooling
from k3lab.nn.text_conditioning import TextConditioning
from k3lab.nn.unet import KandinskyUNet
from k3lab.nn.unet_blocks import AttentionBlock, BigGANDeepBlock, ResBlock
from k3lab.run.config import compose


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised conditioning MLPs random weights, so time and text reach every norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def tiny_unet(block=BigGANDeepBlock, **kw) -> KandinskyUNet:
    args = dict(
        in_channels=4,
        out_channels=4,
        model_channels=16,
        init_channels=8,
        time_embed_dim=32,
        context_dim=24,
        groups=4,
        head_dim=8,
        dim_mult=(1, 2, 4),
        num_blocks=(1, 2, 1),
        add_cross_attention=(False, True, True),
        add_self_attention=(False, True, True),
        block=block,
    )
    args.update(kw)
    torch.manual_seed(0)
    return randomize(KandinskyUNet(**args))


def test_kandinsky3_preset_has_the_official_size_and_keys() -> None:
    cfg = compose(["model/unet=kandinsky3"], "/tmp/k3lab-test")
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet)
        projection = TextConditioning(4096, 4096).projection
        inpainting = instantiate(cfg.model.unet, in_channels=9)
    assert count(unet) == 3_038_562_820
    assert len(unet.state_dict()) == 1068
    assert count(projection) == 16_785_408
    assert count(unet) + count(projection) == 3_055_348_228  # diffusers Kandinsky3UNet() defaults
    assert count(inpainting) == 3_038_571_460
    resnets = [m for m in unet.modules() if isinstance(m, BigGANDeepBlock)]
    attns = [m for m in unet.modules() if isinstance(m, AttentionBlock)]
    cross = [m for m in attns if m.attention.to_key.in_features == 4096]
    assert (len(resnets), len(attns) - len(cross), len(cross)) == (48, 6, 18)
    assert {k.split(".")[0] for k in unet.state_dict()} == {
        "to_time_embed",
        "feature_pooling",
        "in_layer",
        "down_samples",
        "up_samples",
        "out_layer",
    }
    assert "down_samples.1.resnet_attn_blocks.0.1.attention.to_query.weight" in unet.state_dict()
    assert unet.feature_pooling.attention.num_heads == 24


@pytest.mark.parametrize(
    "preset,block,expected",
    [
        ("kandinsky3", "resnet", 4_738_274_308),
        ("small", "biggan_deep", 19_847_556),
        ("small", "resnet", 31_641_604),
        ("tiny", "biggan_deep", 6_363_332),
        ("tiny", "resnet", 8_172_740),
    ],
)
def test_documented_preset_sizes(preset: str, block: str, expected: int) -> None:
    cfg = compose([f"model/unet={preset}", f"model/unet/block={block}"], "/tmp/k3lab-test")
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet)
    assert count(unet) == expected


def test_resampling_sits_where_the_reference_says() -> None:
    down = BigGANDeepBlock(16, 32, 8, groups=4, resample="down")
    assert [type(b.down_sample).__name__ for b in down.resnet_blocks] == ["Identity", "Identity", "Conv2d", "Identity"]
    assert [b.projection.kernel_size[0] for b in down.resnet_blocks] == [1, 3, 3, 1]
    assert down.resnet_blocks[0].projection.out_channels == 16  # max(16, 32) // 2
    up = BigGANDeepBlock(16, 16, 8, groups=4, resample="up")
    assert [type(b.up_sample).__name__ for b in up.resnet_blocks] == [
        "Identity",
        "ConvTranspose2d",
        "Identity",
        "Identity",
    ]
    plain = ResBlock(16, 16, 8, groups=4, resample="down")
    assert [type(b.down_sample).__name__ for b in plain.resnet_blocks] == ["Identity", "Conv2d"]
    x, t = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
    assert (
        down(x, t).shape == (2, 32, 4, 4) and up(x, t).shape == (2, 16, 16, 16) and plain(x, t).shape == (2, 16, 4, 4)
    )


@pytest.mark.parametrize("block", [BigGANDeepBlock, ResBlock])
def test_both_block_types_train_and_listen_to_text_and_time(block) -> None:
    unet = tiny_unet(block)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    ctx, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    out = unet(x, t, ctx, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (unet(x, t, ctx.flip(0), mask) - out).abs().max() > 1e-3  # text matters
    assert (unet(x, t.flip(0), ctx, mask) - out).abs().max() > 1e-3  # time matters
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in unet.parameters())
    other = BigGANDeepBlock if block is ResBlock else ResBlock
    assert count(unet) != count(tiny_unet(other))  # the block really changed, nothing else did
    assert {k for k in unet.state_dict() if "resnet_blocks" not in k} == {
        k for k in tiny_unet(other).state_dict() if "resnet_blocks" not in k
    }


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x, t, ctx, mask = (
        torch.randn(2, 4, 8, 8),
        torch.tensor([3, 500]),
        torch.randn(2, 5, 24),
        torch.ones(2, 5, dtype=torch.bool),
    )
    grads = []
    for ckpt in (False, True):
        unet = tiny_unet(gradient_checkpointing=ckpt)
        unet(x, t, ctx, mask).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_padding_changes_nothing_beyond_the_pooling_mean() -> None:
    """Masked tokens are invisible to every cross-attention; only attention pooling's query (the mean over ALL
    tokens, pads included, as in the official model) sees them."""
    unet = tiny_unet().eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    ctx, mask = torch.randn(2, 4, 24), torch.ones(2, 4, dtype=torch.bool)
    padded = torch.cat([ctx, torch.randn(2, 3, 24) * 5], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        base, with_pads = unet(x, t, ctx, mask), unet(x, t, padded, padded_mask)
        assert (base - with_pads).abs().max() > 1e-3  # the pooling query's mean moved
        unet.feature_pooling.attention.to_query.weight.zero_()  # make the pooling query independent of the mean
        base, with_pads = unet(x, t, ctx, mask), unet(x, t, padded, padded_mask)
    torch.testing.assert_close(base, with_pads, rtol=1e-5, atol=1e-5)


def test_attention_pooling_query_is_the_unmasked_mean() -> None:
    torch.manual_seed(0)
    pool = AttentionPooling(16, 8, head_dim=4)
    ctx, mask = torch.randn(1, 6, 8), torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    expected = pool.attention(ctx.mean(1, keepdim=True), ctx, mask).squeeze(1)
    torch.testing.assert_close(pool(torch.zeros(1, 16), ctx, mask), expected)
    masked_mean = pool.attention(ctx[:, :3].mean(1, keepdim=True), ctx, mask).squeeze(1)
    assert (masked_mean - expected).abs().max() > 1e-4


def test_resolution_must_divide_by_the_down_sampling_factor() -> None:
    unet = tiny_unet()
    with pytest.raises(ValueError, match="not divisible by its down-sampling factor 4"):
        unet(torch.randn(1, 4, 10, 10), torch.tensor([1]), torch.randn(1, 2, 24))
