"""Building blocks of the MoVQ autoencoder (taming-style ResNet/attention blocks, spatial norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override


class SpatialNorm(nn.Module):
    """MoVQ's spatially conditioned norm: ``GN(f) * conv_y(zq) + conv_b(zq)``.

    ``zq`` is the raw (pre ``post_quant_conv``) latent, nearest-resized to ``f``'s size.
    """

    def __init__(self, channels: int, zq_channels: int, num_groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps, affine=True)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    @override
    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm(f) * self.conv_y(zq) + self.conv_b(zq)


class Norm(nn.Module):
    """GroupNorm (encoder) or SpatialNorm (decoder, when ``zq_channels`` is given), one call signature."""

    def __init__(self, channels: int, zq_channels: int | None, num_groups: int = 32) -> None:
        super().__init__()
        self.spatial = zq_channels is not None
        if zq_channels is None:
            self.norm: nn.Module = nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)
        else:
            self.norm = SpatialNorm(channels, zq_channels, num_groups)

    @override
    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        if self.spatial:
            assert zq is not None, "a spatial norm needs the latent zq"
            return self.norm(x, zq)
        return self.norm(x)


class ResnetBlock(nn.Module):
    """Norm -> SiLU -> conv3x3, twice; 1x1 shortcut when the width changes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        zq_channels: int | None = None,
        dropout: float = 0.0,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.norm1 = Norm(in_channels, zq_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Norm(out_channels, zq_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    @override
    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h, zq))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 conv projections (with bias)."""

    def __init__(self, channels: int, zq_channels: int | None = None, num_groups: int = 32) -> None:
        super().__init__()
        self.norm = Norm(channels, zq_channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    @override
    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x, zq)
        # contiguous [B, 1, HW, C]: on CPU a transposed view sends SDPA to its slow math path (2.3x at 128x128)
        q, k, v = (
            t.reshape(b, 1, c, h * w).transpose(-1, -2).contiguous() for t in (self.q(hn), self.k(hn), self.v(hn))
        )
        out = F.scaled_dot_product_attention(q, k, v)  # scale c**-0.5
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Asymmetric pad (0, 1, 0, 1) then a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
