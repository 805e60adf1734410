"""Autoencoder losses as functions. Diffusion losses live in ``k3lab.diffusion``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Pixel reconstruction loss, ``kind`` in {"l2", "l1"}."""
    if kind == "l2":
        return F.mse_loss(x_hat, x)
    if kind == "l1":
        return F.l1_loss(x_hat, x)
    raise ValueError(f"reconstruction loss kind must be 'l2' or 'l1', got {kind!r}")


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge GAN loss for the discriminator (Lim & Ye 2017, arXiv 1705.02894)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN loss: ``-mean D(x_hat)``."""
    return -logits_fake.mean()
