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
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Simple MSE loss of DDPM (Ho et al. 2020, arXiv 2006.11239): t ~ U{0..T-1}, per-sample mean, then batch mean.

    ``min_snr_gamma``: Min-SNR-gamma weighting (Hang et al. 2023, arXiv 2303.09556): each sample's loss is weighted so
    that, as an x0 loss, its weight is min(SNR, gamma), i.e. min(SNR, gamma) / SNR for epsilon and
    min(SNR, gamma) / (SNR + 1) for v; easy low-noise steps stop dominating the gradient. None = the simple loss."""
    b = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_steps, (b,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    a = schedule.alpha_bar(t, x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = model(x_t, t)
    if min_snr_gamma is None:
        return F.mse_loss(out.float(), target_for(prediction, x0, noise, a).float())
    per_sample = (out.float() - target_for(prediction, x0, noise, a).float()).pow(2).flatten(1).mean(1)
    return (per_sample * min_snr_weight(a.flatten(), prediction, float(min_snr_gamma))).mean()


def min_snr_weight(alpha_bar: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """The Min-SNR-gamma factor on the loss of ``prediction`` for noise levels ``alpha_bar`` (see diffusion_loss)."""
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma={gamma}: must be > 0")
    snr = alpha_bar.float() / (1 - alpha_bar.float()).clamp(min=1e-12)
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped / snr.clamp(min=1e-12)
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "x0":
        return clipped
    raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")
