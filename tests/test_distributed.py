"""Sharded training: the FSDP unit policy of trainer=fsdp and the meta-device memory plan."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from k3lab.config import compose
from k3lab.distributed import SHARDED_BYTES_PER_PARAM, activation_bytes, block_classes, memory_plan, units
from k3lab.nn.unet_blocks import AttentionBlock, BigGANDeepBlock, ResBlock


def small_unet(block: str = "biggan_deep", device: str = "cpu") -> torch.nn.Module:
    cfg = compose(["model/unet=tiny", f"model/unet/block={block}"])
    with torch.device(device):
        torch.manual_seed(0)
        return instantiate(cfg.model.unet)


def test_fsdp_trainer_wraps_and_checkpoints_every_unet_block_with_fp32_reduction() -> None:
    cfg = compose(["experiment=text2image_tiny", "trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    wrapped = strategy.kwargs["auto_wrap_policy"]._module_classes
    assert {BigGANDeepBlock, ResBlock, AttentionBlock} <= set(wrapped)
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
    assert {BigGANDeepBlock, ResBlock, AttentionBlock} <= set(checkpointed)
    assert strategy.mixed_precision.param_dtype == torch.bfloat16
    assert strategy.mixed_precision.reduce_dtype == torch.float32
    for block in ("biggan_deep", "resnet"):
        unet = small_unet(block)
        found = list(units(unet))
        assert sum(isinstance(u, AttentionBlock) for u in found) == sum(
            isinstance(m, AttentionBlock) for m in unet.modules()
        )
        inside = sum(p.numel() for u in found for p in u.parameters())
        total = sum(p.numel() for p in unet.parameters())
        assert inside / total > 0.8, f"{block}: only {inside / total:.2f} of the parameters sit in FSDP units"


def test_meta_device_memory_plan_matches_a_real_forward_and_scales_with_gpus() -> None:
    """The activation count on the meta device is within 1% of the same count on real CPU tensors (a few kernels save
    differently shaped helpers there); checkpointing keeps less; the shard shrinks as 1/N and the batch that fits
    grows."""
    meta, real = small_unet(device="meta"), small_unet()
    a_meta = activation_bytes(meta, 16, 8, torch.float32)
    a_real = activation_bytes(real, 16, 8, torch.float32)
    assert a_meta.full == pytest.approx(a_real.full, rel=0.01)
    assert a_meta.checkpointed == pytest.approx(a_real.checkpointed, rel=0.01)
    assert 0 < a_meta.checkpointed < a_meta.full
    # twice the latent side: about four times the activations
    assert 3.0 < activation_bytes(small_unet(device="meta"), 32, 8, torch.float32).full / a_meta.full < 5.0
    params, act, rows = memory_plan(small_unet(device="meta"), (1, 8, 64), latent=16, context_tokens=8, gpu_gib=1.0)
    assert params == sum(p.numel() for p in real.parameters())
    assert rows[0].sharded_gib == pytest.approx(params * SHARDED_BYTES_PER_PARAM / 1024**3)
    assert rows[1].sharded_gib == pytest.approx(rows[0].sharded_gib / 8)
    assert rows[0].batch_per_gpu <= rows[1].batch_per_gpu <= rows[2].batch_per_gpu
    assert block_classes() >= {BigGANDeepBlock, ResBlock, AttentionBlock}
