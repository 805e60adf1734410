"""Kandinsky 3 U-Net blocks: conditional group norm, conv Block, the two residual block types, attention block.

The residual block is chosen by a factory (``block``): ``BigGANDeepBlock`` (Kandinsky 3's bottleneck,
Brock et al. 2019, arXiv 1809.11096) or ``ResBlock`` (a classic two-3x3 block, Ho et al. 2020). Both take
``(in_channels, out_channels, time_dim, groups, resample)`` with ``resample`` in {None, "up", "down"}.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import nn
from typing_extensions import override

from k3lab.nn.attention import Attention

Resample = Literal["up", "down"] | None


class ConditionalGroupNorm(nn.Module):
    """GroupNorm without affine, then ``* (scale + 1) + shift`` from an MLP of the time(+text) embedding."""

    def __init__(self, groups: int, channels: int, time_dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.context_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * channels))
        projection = self.context_mlp[1]
        assert isinstance(projection, nn.Linear)
        nn.init.zeros_(projection.weight)
        nn.init.zeros_(projection.bias)

    @override
    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        scale, shift = self.context_mlp(time_embed)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (scale + 1.0) + shift


class Block(nn.Module):
    """CondGN -> SiLU -> [2x2 stride-2 transposed conv if up] -> kxk conv -> [2x2 stride-2 conv if down]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_dim: int,
        kernel_size: int = 3,
        groups: int = 32,
        resample: Resample = None,
    ) -> None:
        super().__init__()
        self.group_norm = ConditionalGroupNorm(groups, in_channels, time_dim)
        self.activation = nn.SiLU()
        self.up_sample = (
            nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2) if resample == "up" else nn.Identity()
        )
        self.projection = nn.Conv2d(in_channels, out_channels, kernel_size, padding=int(kernel_size > 1))
        self.down_sample = nn.Conv2d(out_channels, out_channels, 2, stride=2) if resample == "down" else nn.Identity()

    @override
    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        x = self.up_sample(self.activation(self.group_norm(x, time_embed)))
        return self.down_sample(self.projection(x))


class ResidualBlock(nn.Module):
    """Shared residual wiring: ``x' = shortcut(x) + sum of Blocks``; the shortcut resamples like the body:
    [transposed conv if up] -> [1x1 conv if channels change] -> [strided conv if down]."""

    def __init__(self, blocks: list[Block], in_channels: int, out_channels: int, resample: Resample) -> None:
        super().__init__()
        self.resnet_blocks = nn.ModuleList(blocks)
        self.shortcut_up_sample = (
            nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2) if resample == "up" else nn.Identity()
        )
        self.shortcut_projection = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )
        self.shortcut_down_sample = (
            nn.Conv2d(out_channels, out_channels, 2, stride=2) if resample == "down" else nn.Identity()
        )

    @override
    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        out = x
        for block in self.resnet_blocks:
            out = block(out, time_embed)
        x = self.shortcut_down_sample(self.shortcut_projection(self.shortcut_up_sample(x)))
        return x + out


class BigGANDeepBlock(ResidualBlock):
    """BigGAN-deep bottleneck (arXiv 1809.11096), as in Kandinsky 3: kernels [1, 3, 3, 1] through
    ``max(in, out) // compression_ratio`` hidden channels; up-sampling in the first 3x3 Block (before its
    conv), down-sampling in the second 3x3 Block (after its conv)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_dim: int,
        groups: int = 32,
        resample: Resample = None,
        compression_ratio: int = 2,
    ) -> None:
        hidden = max(in_channels, out_channels) // compression_ratio
        dims = [(in_channels, hidden), (hidden, hidden), (hidden, hidden), (hidden, out_channels)]
        where = [None, "up" if resample == "up" else None, "down" if resample == "down" else None, None]
        blocks = [Block(i, o, time_dim, k, groups, r) for (i, o), k, r in zip(dims, (1, 3, 3, 1), where, strict=False)]
        super().__init__(blocks, in_channels, out_channels, resample)


class ResBlock(ResidualBlock):
    """Classic residual block (DDPM, arXiv 2006.11239): two 3x3 Blocks with the same conditional norms;
    up-sampling in the first Block (before its conv), down-sampling in the second (after its conv)."""

    def __init__(
        self, in_channels: int, out_channels: int, time_dim: int, groups: int = 32, resample: Resample = None
    ) -> None:
        blocks = [
            Block(in_channels, out_channels, time_dim, 3, groups, "up" if resample == "up" else None),
            Block(out_channels, out_channels, time_dim, 3, groups, "down" if resample == "down" else None),
        ]
        super().__init__(blocks, in_channels, out_channels, resample)


class BlockFactory(Protocol):
    """How the U-Net builds a residual block (BigGAN-deep or ResBlock): the factory's signature."""

    def __call__(
        self, in_channels: int, out_channels: int, time_dim: int, groups: int = 32, resample: Resample = None
    ) -> nn.Module:
        """A residual block from ``in_channels`` to ``out_channels``, optionally resampling (up or down)."""
        ...


class AttentionBlock(nn.Module):
    """x += Attn(CondGN(x) tokens, context or themselves); x += FF(CondGN(x)), FF = bias-free 1x1 convs C->rC->C."""

    def __init__(
        self,
        channels: int,
        time_dim: int,
        context_dim: int | None = None,
        groups: int = 32,
        head_dim: int = 64,
        expansion_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.in_norm = ConditionalGroupNorm(groups, channels, time_dim)
        self.attention = Attention(channels, channels, context_dim or channels, head_dim)
        self.out_norm = ConditionalGroupNorm(groups, channels, time_dim)
        hidden = expansion_ratio * channels
        self.feed_forward = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.SiLU(), nn.Conv2d(hidden, channels, 1, bias=False)
        )

    @override
    def forward(
        self,
        x: torch.Tensor,
        time_embed: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.in_norm(x, time_embed).flatten(2).transpose(1, 2)
        if context is None:
            out = self.attention(tokens, tokens)
        else:
            out = self.attention(tokens, context, mask)
        x = x + out.transpose(1, 2).reshape(b, c, h, w)
        return x + self.feed_forward(self.out_norm(x, time_embed))
