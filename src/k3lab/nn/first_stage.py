"""First stages of latent diffusion: the frozen MoVQ (continuous latents, as Kandinsky 3 decodes) or Identity."""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override

from k3lab.nn.movq import MoVQ


class IdentityFirstStage(nn.Module):
    """Pixel-space diffusion: images are their own 'latents' (toy runs and tests)."""

    downsample_factor = 1

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.latent_channels = channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels are the latents."""
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents are the pixels."""
        return z


class FrozenMoVQ(nn.Module):
    """A trained MoVQ, frozen and in eval mode: ``encode`` gives the continuous latent (after quant_conv),
    ``decode`` decodes it without quantisation; images in [-1, 1]."""

    def __init__(self, movq: MoVQ) -> None:
        super().__init__()
        self.movq = movq.eval().requires_grad_(False)
        self.downsample_factor = int(movq.downsample_factor)
        self.latent_channels = int(movq.latent_channels)

    @override
    def train(self, mode: bool = True) -> "FrozenMoVQ":
        return super().train(False)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image [-1, 1] to the MoVQ's continuous latent, without gradients."""
        return self.movq.encode(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent to image [-1, 1] (quantisation skipped, as Kandinsky 3 decodes), without gradients."""
        return self.movq.decode(z, quantize=False)


# What a diffusion stage encodes images with: pixels (Identity) or the frozen MoVQ.
FirstStage = IdentityFirstStage | FrozenMoVQ


class LatentScale(nn.Module):
    """The factor latents are multiplied by before diffusion (a buffer, so checkpoints and exports keep it);
    NaN until measured when the stage is configured with ``latent_scale: auto``."""

    value: torch.Tensor

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(float(value)))

    def measured(self) -> bool:
        """Whether the scale has been set (it starts as NaN until the first batch measures it)."""
        return not bool(torch.isnan(self.value))
