"""Samplers as pure functions with one signature:

    sampler(denoise, noise, schedule, steps, *, generator=None, callback=None, **options) -> x0

``first_step=k`` skips the first k of the ``steps`` timesteps: ``noise`` is then the input already noised to the
k-th timestep (image-to-image, :func:`timesteps_for` gives it).

``denoise(x_t, t) -> eps`` takes integer timesteps ``t`` [B] and returns an epsilon prediction (guidance and
v-to-eps conversion are wrapped around the model beforehand, see ``guidance.py``). ``callback(i, t, x0_hat)``
is called after every step (progress bars, previews).
"""

from __future__ import annotations

from typing import Callable

import torch

from k3lab.diffusion.schedule import Schedule
from k3lab.diffusion.settings import DEFAULT_SAMPLING

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None] | None


def strided_timesteps(num_train_steps: int, steps: int) -> list[int]:
    """Kandinsky 3's spacing: T-1, T-1-k, ... down to above 0 with k = T // steps (999, 979, ..., 19 for 50)."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps={steps}: must be in 1..{num_train_steps}")
    return list(range(num_train_steps - 1, 0, -(num_train_steps // steps)))[:steps]


def threshold_x0(x0: torch.Tensor, quantile: float | None) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, arXiv 2205.11487): s = max(q-quantile of |x0|, 1) per
    sample; clip to [-s, s], divide by s. ``quantile=None`` leaves x0 unchanged."""
    if quantile is None:
        return x0
    s = torch.quantile(x0.flatten(1).abs().float(), quantile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def _x0_from_eps(x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def _eps_from_x0(x: torch.Tensor, x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


def _t(value: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), value, device=x.device, dtype=torch.long)


def _predict_x0(
    denoise: Denoiser, x: torch.Tensor, t: int, schedule: Schedule, x0_threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar_t, thresholded x0_hat) at integer timestep ``t``."""
    tt = _t(t, x)
    a = schedule.alpha_bar(tt, x)
    return a, threshold_x0(_x0_from_eps(x, denoise(x, tt), a), x0_threshold)


def _ddim_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    a: torch.Tensor,
    a_prev: torch.Tensor,
    eta: float,
    add_noise: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The generalised DDIM update (eta = 0: deterministic, eta = 1: the DDPM posterior) with eps recomputed from x0."""
    eps = _eps_from_x0(x, x0, a)
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
    x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if add_noise and eta > 0:
        x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x


@torch.no_grad()
def sample_kandinsky3(
    denoise: Denoiser,
    noise: torch.Tensor,
    schedule: Schedule,
    steps: int = DEFAULT_SAMPLING.steps,
    *,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    x0_threshold: float | None = DEFAULT_SAMPLING.x0_threshold,
    eta: float = 1.0,
    first_step: int = 0,
) -> torch.Tensor:
    """The official Kandinsky 3 sampler: ancestral DDPM (Ho et al. 2020, arXiv 2006.11239) on a strided
    schedule (DDIM's generalised step with eta = 1), dynamic thresholding of x0, no noise on the last step."""
    x = noise
    times = strided_timesteps(schedule.num_steps, steps)[first_step:]
    for i, (t, prev) in enumerate(zip(times, times[1:] + [0], strict=False)):
        a, x0 = _predict_x0(denoise, x, t, schedule, x0_threshold)
        x = _ddim_step(
            x, x0, a, schedule.alpha_bar(_t(prev, x), x), eta, prev != 0, generator
        )  # prev 0 uses alpha_bar[0]
        if callback is not None:
            callback(i, t, x0)
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    noise: torch.Tensor,
    schedule: Schedule,
    steps: int = DEFAULT_SAMPLING.steps,
    *,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    x0_threshold: float | None = DEFAULT_SAMPLING.x0_threshold,
    eta: float = 0.0,
    first_step: int = 0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, arXiv 2010.02502) on the strided schedule; the last step returns x0_hat."""
    x = noise
    times = strided_timesteps(schedule.num_steps, steps)[first_step:]
    for i, t in enumerate(times):
        a, x0 = _predict_x0(denoise, x, t, schedule, x0_threshold)
        last = i == len(times) - 1
        x = x0 if last else _ddim_step(x, x0, a, schedule.alpha_bar(_t(times[i + 1], x), x), eta, True, generator)
        if callback is not None:
            callback(i, t, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    noise: torch.Tensor,
    schedule: Schedule,
    steps: int = 20,
    *,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    x0_threshold: float | None = DEFAULT_SAMPLING.x0_threshold,
    first_step: int = 0,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095): second-order multistep in x0-prediction over
    lambda = log(alpha / sigma); first order on the first step; the last step goes to sigma = 0 (x0_hat)."""
    x = noise
    times = strided_timesteps(schedule.num_steps, steps)[first_step:]
    lam = lambda a: 0.5 * (a.log() - (1 - a).log())  # noqa: E731
    old_x0, h_prev = None, None
    for i, t in enumerate(times):
        a, x0 = _predict_x0(denoise, x, t, schedule, x0_threshold)
        if i == len(times) - 1:
            x = x0
        else:
            a_next = schedule.alpha_bar(_t(times[i + 1], x), x)
            h = lam(a_next) - lam(a)
            d = x0
            if old_x0 is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x = ((1 - a_next) / (1 - a)).sqrt() * x - a_next.sqrt() * torch.expm1(-h) * d
            old_x0, h_prev = x0, h
        if callback is not None:
            callback(i, t, x0)
    return x


def leading_timesteps(num_train_steps: int, steps: int, offset: int = 1) -> list[int]:
    """diffusers' "leading" spacing with ``steps_offset``: (0, k, 2k, ...) reversed, + offset (961, ..., 1 for 25)."""
    k = num_train_steps // steps
    return [i * k + offset for i in reversed(range(steps))]


@torch.no_grad()
def sample_diffusers_ddpm(
    denoise: Denoiser,
    noise: torch.Tensor,
    schedule: Schedule,
    steps: int = DEFAULT_SAMPLING.prior_steps,
    *,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    clip: float | None = 1.0,
    first_step: int = 0,
) -> torch.Tensor:
    """Compatibility sampler reproducing diffusers' Kandinsky 3 scheduler (DDPMScheduler, Ho et al. 2020, arXiv
    2006.11239): leading spacing with offset 1, x0 clipped to +-1 instead of dynamic thresholding, posterior
    mean and "fixed_small" variance, alpha = 1 past the last step. For matching diffusers' numbers only."""
    x = noise
    k = schedule.num_steps // steps
    for i, t in enumerate(leading_timesteps(schedule.num_steps, steps)[first_step:]):
        tt = _t(t, x)
        a = schedule.alpha_bar(tt, x)
        a_prev = schedule.alpha_bar(_t(t - k, x), x) if t - k >= 0 else torch.ones_like(a)
        x0 = _x0_from_eps(x, denoise(x, tt), a)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        alpha_t = a / a_prev
        beta_t = 1 - alpha_t
        mean = (a_prev.sqrt() * beta_t / (1 - a)) * x0 + (alpha_t.sqrt() * (1 - a_prev) / (1 - a)) * x
        var = ((1 - a_prev) / (1 - a) * beta_t).clamp(min=1e-20)
        x = (
            mean + var.sqrt() * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            if t > 0
            else mean
        )
        if callback is not None:
            callback(i, t, x0)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "diffusers_ddpm": sample_diffusers_ddpm,
    "kandinsky3": sample_kandinsky3,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}


def timesteps_for(name: str, num_train_steps: int, steps: int) -> list[int]:
    """The timesteps sampler ``name`` visits for ``steps`` steps (image-to-image noises its input to one of them)."""
    get_sampler(name)
    return (
        leading_timesteps(num_train_steps, steps)
        if name == "diffusers_ddpm"
        else strided_timesteps(num_train_steps, steps)
    )


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function registered as ``name``; an unknown name lists the known ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
