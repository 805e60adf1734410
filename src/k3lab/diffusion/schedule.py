"""Noise schedules: the discrete variance-preserving process with a cosine beta schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, arXiv 2102.09672): alpha_bar(t) = cos^2((t + s)/(1 + s) pi/2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(num_steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """Linear schedule (Ho et al. 2020, arXiv 2006.11239), scaled to ``num_steps``."""
    scale = 1000 / num_steps
    return torch.linspace(scale * start, scale * end, num_steps, dtype=torch.float64)


@dataclass
class Schedule:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps for integer t in [0, T)."""

    alphas_cumprod: torch.Tensor  # [T] float64

    @classmethod
    def cosine(cls, num_steps: int = 1000) -> "Schedule":
        """The cosine schedule (Nichol & Dhariwal 2021) over ``num_steps`` steps."""
        return cls(torch.cumprod(1 - cosine_betas(num_steps), dim=0))

    @classmethod
    def linear(cls, num_steps: int = 1000) -> "Schedule":
        """The linear beta schedule (Ho et al. 2020) over ``num_steps`` steps."""
        return cls(torch.cumprod(1 - linear_betas(num_steps), dim=0))

    @classmethod
    def named(cls, name: str, num_steps: int = 1000) -> "Schedule":
        """A schedule by name, 'cosine' or 'linear'; another name is an error."""
        if name not in ("cosine", "linear"):
            raise ValueError(f"unknown noise schedule {name!r}: use 'cosine' or 'linear'")
        return getattr(cls, name)(num_steps)

    @property
    def num_steps(self) -> int:
        """The number of diffusion timesteps."""
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps ``t`` [B], shaped to broadcast against ``like``."""
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device)]
        return a.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise at timesteps ``t``."""
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps ``t``."""
        a = self.alphas_cumprod[t.long().cpu()]
        return a / (1 - a)
