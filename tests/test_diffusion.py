"""Schedule, loss, samplers and guidance as functions, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from k3lab.diffusion import SAMPLERS, Schedule, cfg_denoiser, diffusion_loss, guide, to_epsilon
from k3lab.diffusion.loss import target_for
from k3lab.diffusion.samplers import strided_timesteps, threshold_x0
from k3lab.diffusion.schedule import cosine_betas

MU, STD = 0.3, 0.25


def exact_gaussian_denoiser(schedule: Schedule):
    """E[eps | x_t] when x0 ~ N(MU, STD^2 I): the exact optimal epsilon prediction."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alpha_bar(t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD**2 + 1 - a)

    return denoise


def test_cosine_schedule_properties() -> None:
    s = Schedule.cosine()
    a = s.alphas_cumprod
    assert s.num_steps == 1000 and a.dtype == torch.float64
    assert (a[1:] < a[:-1]).all() and 0 < a[-1] < 1e-8 and a[0] > 0.9999
    betas = cosine_betas(1000)
    assert betas.max() <= 0.999 and betas.min() > 0
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 900):
        assert a[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    snr = s.snr(torch.arange(1000))
    assert (snr[1:] < snr[:-1]).all()
    x0 = torch.randn(20000, 1, dtype=torch.float64)
    xt = s.q_sample(x0, torch.full((20000,), 400), torch.randn_like(x0))
    assert xt.std().item() == pytest.approx(1.0, abs=0.02)  # variance preserving


def test_loss_targets_and_v_conversion() -> None:
    s = Schedule.cosine()
    x0, noise, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.tensor([0, 10, 500, 999])
    a = s.alpha_bar(t, x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = target_for("v", x0, noise, a)
    torch.testing.assert_close(to_epsilon("v", v, xt, a), noise, rtol=1e-4, atol=1e-4)
    assert target_for("epsilon", x0, noise, a) is noise
    # a model that returns the true noise has zero loss; a zero model has loss E[eps^2] ~ 1
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(512, 2, 4, 4)
    assert diffusion_loss(lambda x, tt: torch.zeros_like(x), x0, s, generator=g).item() == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match="unknown prediction"):
        target_for("sample", x0, x0, a)


def test_official_timesteps_and_dynamic_thresholding() -> None:
    ts = strided_timesteps(1000, 50)
    assert ts[0] == 999 and ts[1] == 979 and ts[-1] == 19 and len(ts) == 50
    assert strided_timesteps(1000, 4) == [999, 749, 499, 249]
    x = torch.tensor([[0.5, -0.2, 0.9, 0.1], [4.0, -2.0, 1.0, 0.5]]).reshape(2, 1, 2, 2)
    y = threshold_x0(x, 0.99)
    torch.testing.assert_close(y[0], x[0])  # quantile < 1: floored at 1, nothing changes
    s = torch.quantile(x[1].abs().flatten(), 0.99)
    torch.testing.assert_close(y[1], x[1].clamp(-s, s) / s)
    assert y[1].abs().max() <= 1.0 + 1e-6
    assert threshold_x0(x, None) is x


@pytest.mark.parametrize("name,steps,tol", [("kandinsky3", 1000, 0.015), ("ddim", 200, 0.015), ("dpmpp_2m", 25, 0.03)])
def test_samplers_recover_a_known_gaussian(name: str, steps: int, tol: float) -> None:
    s = Schedule.cosine()
    noise = torch.randn(2048, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = SAMPLERS[name](exact_gaussian_denoiser(s), noise, s, steps, generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(STD, rel=tol)


def test_dpm_solver_converges_faster_than_ddim() -> None:
    s = Schedule.cosine()
    noise = torch.randn(1024, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    den = exact_gaussian_denoiser(s)
    ref = SAMPLERS["ddim"](den, noise, s, 1000)  # the probability-flow ODE, solved finely
    err = {n: (SAMPLERS[n](den, noise, s, 25) - ref).abs().mean().item() for n in ("ddim", "dpmpp_2m")}
    assert err["dpmpp_2m"] < 0.35 * err["ddim"]  # measured: 0.0049 vs 0.0205


def test_samplers_are_reproducible_with_a_generator_and_call_back() -> None:
    s = Schedule.cosine()
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    seen = []
    a = SAMPLERS["kandinsky3"](
        exact_gaussian_denoiser(s),
        noise,
        s,
        10,
        generator=torch.Generator().manual_seed(3),
        callback=lambda i, t, x0: seen.append(t),
    )
    b = SAMPLERS["kandinsky3"](exact_gaussian_denoiser(s), noise, s, 10, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert seen == strided_timesteps(1000, 10)


def test_guidance_formula_and_batched_call() -> None:
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(guide(cond, uncond, 3.0), 4 * cond - 3 * uncond)
    torch.testing.assert_close(guide(cond, uncond, 0.0), cond)
    calls = []

    def model(x, t, context, mask):
        calls.append((x.shape[0], context.clone(), mask.clone()))
        return x * context.mean(dim=(1, 2))[:, None, None, None]

    x, t = torch.ones(2, 1, 2, 2), torch.tensor([5, 5])
    ctx, mask = torch.full((2, 3, 4), 2.0), torch.ones(2, 3, dtype=torch.bool)
    null, null_mask = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)
    out = cfg_denoiser(model, (ctx, mask), (null, null_mask), weight=3.0)(x, t)
    assert len(calls) == 1 and calls[0][0] == 4  # one batched call on [cond; uncond]
    torch.testing.assert_close(calls[0][1][2:], null)
    torch.testing.assert_close(out, torch.full_like(x, 4 * 2.0 - 3 * 0.0))
    out = cfg_denoiser(model, (ctx, mask), (null, null_mask), weight=0.0)(x, t)
    assert calls[-1][0] == 2 and torch.equal(out, 2 * x)


def test_unknown_names_are_clear_errors() -> None:
    from k3lab.diffusion import get_sampler

    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        get_sampler("euler")
    with pytest.raises(ValueError, match="unknown noise schedule"):
        Schedule.named("sigmoid")


def test_min_snr_weighting_equals_weighted_x0_loss() -> None:
    """Min-SNR-gamma: for every prediction type the weighted loss equals min(SNR, gamma) x the x0 error (the paper's
    definition), and gamma above every SNR gives back the SNR weighting of the simple x0 loss."""
    from k3lab.diffusion.loss import diffusion_loss, min_snr_weight, to_epsilon
    from k3lab.diffusion.schedule import Schedule

    schedule = Schedule.cosine(1000)
    torch.manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 50, 300, 600, 900, 999])
    weight = torch.nn.Parameter(torch.tensor(0.7))
    model = lambda x, tt: weight * x  # noqa: E731  (any model: the identity is not special)
    a = schedule.alpha_bar(t, x0)
    snr = (a / (1 - a)).flatten()
    for prediction in ("epsilon", "v", "x0"):
        gen = torch.Generator().manual_seed(1)
        got = diffusion_loss(model, x0, schedule, prediction, generator=gen, t=t, min_snr_gamma=5.0)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = to_epsilon(prediction, model(x_t, t), x_t, a)
        x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        per_sample = (x0_hat - x0).pow(2).flatten(1).mean(1)
        expected = (per_sample * snr.clamp(max=5.0)).mean()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    w = min_snr_weight(a.flatten(), "epsilon", 5.0)
    assert torch.all(w <= 1 + 1e-6) and w[0] < 0.01 and w[-1] == pytest.approx(1.0)  # easy steps down-weighted
    with pytest.raises(ValueError, match="min_snr_gamma"):
        min_snr_weight(a.flatten(), "v", 0.0)


def test_cosine_decay_schedule() -> None:
    """Warm-up to 1, then a half cosine to 0 at decay_steps, held after; no decay = constant 1."""
    from k3lab.stages.common import cosine_decay, with_warmup

    assert cosine_decay(0, 10, 110) == pytest.approx(0.1)
    assert cosine_decay(9, 10, 110) == pytest.approx(1.0)
    assert cosine_decay(60, 10, 110) == pytest.approx(0.5)
    assert cosine_decay(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert cosine_decay(500, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert cosine_decay(500, 10, None) == 1.0
    values = [cosine_decay(s, 10, 110) for s in range(10, 111)]
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = with_warmup(opt, 10, 5)["lr_scheduler"]["scheduler"]  # shorter than its warm-up: no decay
    for _ in range(20):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


def test_cosine_decay_to_a_final_fraction_reaches_the_stage_optimizer(tmp_path) -> None:
    """stage.optim.lr_final: the cosine ends at that fraction of the rate (held after); out of [0, 1] is refused
    by name."""
    from k3lab.stages.common import cosine_decay, with_warmup

    assert cosine_decay(110, 10, 110, final=0.5) == pytest.approx(0.5)
    assert cosine_decay(60, 10, 110, final=0.5) == pytest.approx(0.75)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = with_warmup(opt, 0, 10, final=0.25)["lr_scheduler"]["scheduler"]
    for _ in range(30):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="stage.optim.lr_final=1.5"):
        with_warmup(opt, 0, 10, final=1.5)


def test_ema_update_matches_the_per_parameter_average() -> None:
    """The multi-tensor EMA update equals lerp(ema, live, 1 - decay) per parameter, with the decay's warm-up."""
    from k3lab.nn.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 4))
    ema = EMA(model, decay=0.99)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        decay = min(0.99, (1 + n) / (10 + n))
        expected = [e + (1 - decay) * (p.detach() - e) for e, p in zip(expected, model.parameters(), strict=True)]
    for got, want in zip(ema.module.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(next(ema.module.parameters()), next(model.parameters()))
