"""Sharded training: the FSDP unit policy of trainer=fsdp and the meta-device memory plan."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from k3lab.nn.sharding import (
    SHARDED_BYTES_PER_PARAM,
    activation_bytes,
    block_classes,
    memory_plan,
    training_state_bytes,
    units,
)
from k3lab.nn.unet_blocks import AttentionBlock, BigGANDeepBlock, ResBlock
from k3lab.run.config import compose


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


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_the_memory_model_is_what_a_real_stage_allocates(tmp_path) -> None:
    """training_state_bytes against a real diffusion stage with its EMA after one AdamW step: the trained weights
    (U-Net + text conditioning), their gradients, AdamW's moments and the EMA copies, byte for byte; then the plan's
    rows: a kept EMA adds 4 bytes per parameter (sharded: 1/N of it per GPU; replicated: all of it)."""
    cfg = compose(
        [
            "experiment=text2image_tiny",
            "stage.first_stage.checkpoint=null",
            "model.unet.in_channels=3",
            "model.unet.out_channels=3",
            "stage.latent_scale=1.0",
            "stage.text_encoder=null",  # (the plan assumes precomputed text embeddings)
            "stage.encoder_dim=32",
            f"paths.root_dir={tmp_path}",
        ]
    )
    stage = instantiate(cfg.stage)
    assert stage.unet_ema is not None and stage.conditioning_ema is not None  # the preset keeps an EMA
    optimizer = stage.configure_optimizers()["optimizer"]
    trained = [p for p in stage.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    n = sum(p.numel() for p in trained)
    assert n == sum(p.numel() for p in stage.unet.parameters()) + sum(
        p.numel() for p in stage.arm.conditioning.parameters()
    )
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k != "step"]
    ema = [*stage.unet_ema.module.parameters(), *stage.conditioning_ema.module.parameters()]
    model = training_state_bytes(n, gpus=1, ema="sharded")
    assert (model.weights, model.grads, model.optimizer, model.ema) == (
        tensor_bytes(trained),
        tensor_bytes(p.grad for p in trained),
        tensor_bytes(moments),
        tensor_bytes(ema),
    )
    eight = training_state_bytes(n, gpus=8, ema="sharded")
    assert eight.total == pytest.approx(model.total / 8)
    assert training_state_bytes(n, 8, "replicated").ema == model.ema
    assert training_state_bytes(n, 8, "cpu").ema == training_state_bytes(n, 8, "none").ema == 0
    with pytest.raises(ValueError, match="ema='gpu'"):
        training_state_bytes(n, 1, "gpu")
    unet = small_unet(device="meta")
    _, _, kept = memory_plan(unet, (1, 8), latent=16, context_tokens=8, gpu_gib=1.0, ema="sharded")
    _, _, none = memory_plan(unet, (1, 8), latent=16, context_tokens=8, gpu_gib=1.0, ema="none")
    params = sum(p.numel() for p in unet.parameters())
    assert kept[0].ema_gib == pytest.approx(4 * params / 1024**3) and none[0].ema_gib == 0
    assert kept[1].static_gib - none[1].static_gib == pytest.approx(4 * params / 8 / 1024**3)
    assert kept[0].batch_per_gpu <= none[0].batch_per_gpu


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


def _sharded_step(rank: int, world: int, init: str, out: str) -> None:
    """One rank of the FSDP2 check: its half of the batch through the sharded U-Net; gradients gathered and saved."""
    import torch.distributed as dist

    from k3lab.nn.sharding import shard_unet

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        unet = shard_unet(small_unet())
        x, t, ctx, mask = _batch(int(unet.context_dim))
        half = slice(rank * 2, rank * 2 + 2)
        unet(x[half], t[half], ctx[half], mask[half]).pow(2).mean().backward()
        grads = {n: p.grad.full_tensor() for n, p in unet.named_parameters()}
        sharded = sum(1 for p in unet.parameters() if p.to_local().numel() < p.numel())
        if rank == 0:
            torch.save({"grads": grads, "sharded": sharded}, out)
        # both ranks leave together: a rank tearing gloo down while its peer is still working can abort the process
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _batch(context_dim: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)
    return x, t, torch.randn(4, 5, context_dim, generator=g), torch.ones(4, 5, dtype=torch.bool)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_shards_the_unet_by_block_on_two_cpu_processes(tmp_path) -> None:
    """shard_unet on 2 gloo processes: parameters are sharded, and the gathered gradients of each rank's half batch
    equal the unsharded U-Net's on the whole batch."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(_sharded_step, args=(2, f"file://{tmp_path / 'store'}", str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    ref = small_unet()
    x, t, ctx, mask = _batch(int(ref.context_dim))
    ref(x, t, ctx, mask).pow(2).mean().backward()
    assert got["sharded"] > len(list(ref.parameters())) // 2
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
