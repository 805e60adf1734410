"""The denoising training loss with uniform timestep sampling."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from k3lab.diffusion.schedule import Schedule

PREDICTIONS = ("epsilon", "v", "x0")


def target_for(prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """epsilon (Ho et al. 2020, arXiv 2006.11239), v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022, arXiv
    2202.00512),
    or x0 itself (the unCLIP prior, Ramesh et al. 2022, arXiv 2204.06125)."""
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")


def to_epsilon(prediction: str, output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Convert a model output to an epsilon prediction (identity for epsilon models)."""
    if prediction == "epsilon":
        return output
    if prediction == "v":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * x_t
    if prediction == "x0":
        return (x_t - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()
    raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")


def diffusion_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    schedule: Schedule,
    prediction: str = "epsilon",
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Simple MSE loss of DDPM (Ho et al. 2020, arXiv 2006.11239): t ~ U{0..T-1}, per-sample mean, then batch mean."""
    b = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_steps, (b,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    a = schedule.alpha_bar(t, x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = model(x_t, t)
    return F.mse_loss(out.float(), target_for(prediction, x0, noise, a).float())
