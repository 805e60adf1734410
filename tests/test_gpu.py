"""GPU checks (``@pytest.mark.gpu``: run by ``make test-all`` where CUDA exists, skipped elsewhere): a bf16 training
step of a small U-Net, a sampler step, and bf16 against fp32 within a stated tolerance."""

from __future__ import annotations

import pytest
import torch

from k3lab.diffusion import Schedule, diffusion_loss, get_sampler
from k3lab.nn.unet import KandinskyUNet

pytestmark = pytest.mark.gpu

SMALL = dict(
    in_channels=4,
    out_channels=4,
    model_channels=64,
    init_channels=32,
    time_embed_dim=256,
    context_dim=64,
    groups=16,
    head_dim=32,
    dim_mult=(1, 2, 4, 8),
    num_blocks=(2, 2, 2, 2),
)


def _unet() -> KandinskyUNet:
    torch.manual_seed(0)
    return KandinskyUNet(**SMALL).cuda()


def test_bf16_training_step_reduces_the_loss() -> None:
    unet = _unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    z, ctx = torch.randn(8, 4, 32, 32, device="cuda"), torch.randn(8, 6, 64, device="cuda")
    mask = torch.ones(8, 6, dtype=torch.bool, device="cuda")
    schedule = Schedule.named("cosine", 1000)
    losses = []
    for step in range(20):
        g = torch.Generator(device="cuda").manual_seed(step % 2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = diffusion_loss(lambda x, t: unet(x, t, ctx, mask), z, schedule, "v", generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-4:]) < sum(losses[:4])


def test_bf16_forward_matches_fp32_within_tolerance() -> None:
    unet = _unet().eval()
    x, ctx = torch.randn(2, 4, 32, 32, device="cuda"), torch.randn(2, 6, 64, device="cuda")
    t, mask = torch.tensor([10, 900], device="cuda"), torch.ones(2, 6, dtype=torch.bool, device="cuda")
    with torch.no_grad():
        ref = unet(x, t, ctx, mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = unet(x, t, ctx, mask).float()
    rel = (low - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 vs fp32 relative error {rel:.4f} (tolerance 0.05: bf16 keeps 8 mantissa bits)"


def test_compiled_sampler_step_matches_eager() -> None:
    unet = _unet().eval()
    ctx, mask = torch.randn(1, 6, 64, device="cuda"), torch.ones(1, 6, dtype=torch.bool, device="cuda")
    schedule = Schedule.named("cosine", 1000)
    noise = torch.randn(1, 4, 32, 32, device="cuda")
    compiled = torch.compile(unet)
    with torch.no_grad():
        eager = get_sampler("ddim")(lambda x, t: unet(x, t, ctx, mask), noise, schedule, 2)
        fast = get_sampler("ddim")(lambda x, t: compiled(x, t, ctx, mask), noise, schedule, 2)
    torch.testing.assert_close(fast, eager, rtol=1e-3, atol=1e-3)
