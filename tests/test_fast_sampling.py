"""The fast sampling switches of python -m k3lab.sample: the U-Net under bf16 autocast, its blocks compiled."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from k3lab.diffusion import Schedule
from k3lab.inference.conditioning import make_arm
from k3lab.inference.generator import Generator
from k3lab.io.checkpoint import load_first_stage
from k3lab.nn.sharding import units
from k3lab.run.config import compose


def tiny_generator() -> tuple[Generator, tuple[torch.Tensor, torch.Tensor]]:
    cfg = compose(["model/unet=tiny", "model.unet.in_channels=3", "model.unet.out_channels=3"])
    torch.manual_seed(0)
    unet = instantiate(cfg.model.unet).eval()
    with torch.no_grad():  # no zero-initialised output layer: the samples depend on every block
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    schedule = Schedule.named("cosine", 1000)
    arm = make_arm(32, unet, schedule)
    gen = Generator(unet, arm, None, load_first_stage(None), schedule, "epsilon", x0_threshold=None)
    g = torch.Generator().manual_seed(3)
    cond = (torch.randn(2, 5, 32, generator=g), torch.ones(2, 5, dtype=torch.bool))
    return gen, arm.conditioning(*cond)


def test_bf16_autocast_sampling_is_close_to_fp32_and_really_runs_in_bf16() -> None:
    gen, cond = tiny_generator()
    ref = gen.sample(cond, [0, 1], 16, "ddim", 4, 3.0)
    gen.unet_dtype = "bfloat16"
    seen = []
    hook = gen.unet.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    low = gen.sample(cond, [0, 1], 16, "ddim", 4, 3.0)
    hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    diff = (low - ref).abs()
    assert 0 < diff.max() and diff.mean() < 0.02, f"bf16 vs fp32 images: mean abs difference {diff.mean():.4f}"
    gen.unet_dtype = "int8"
    with pytest.raises(ValueError, match="unet_dtype"):
        gen.sample(cond, [0, 1], 16, "ddim", 1, 3.0)


def test_regional_compile_gives_the_eager_samples() -> None:
    gen, cond = tiny_generator()
    eager = gen.sample(cond, [0, 1], 16, "dpmpp_2m", 2, 3.0)
    gen.compile_unet()
    assert all(u._compiled_call_impl is not None for u in units(gen.unet))
    torch.testing.assert_close(gen.sample(cond, [0, 1], 16, "dpmpp_2m", 2, 3.0), eager, rtol=1e-4, atol=1e-4)
