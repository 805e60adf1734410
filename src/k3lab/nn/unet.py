"""The Kandinsky 3 U-Net (arXiv 2312.03511), pure torch, with the residual block as a factory argument.

Topology (``../shared/reference/kandinsky3-architecture.md``): time embedding + attention-pooled text drive
every conditional norm; down level = [self-attention on its input] + n x [Res(in->out), cross-attn,
Res(out->out)] with the last Res down-sampling; only the outputs of all but the deepest down level are kept
as skips, concatenated before the next up level at the lower resolution; up level = n x [Res(c->c, first
up-samples), cross-attn, Res(c->c')] + self-attention on its output. Parameter names follow the official
checkpoint, so its state dict loads as is.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from k3lab.nn.attention import AttentionPooling
from k3lab.nn.unet_blocks import AttentionBlock, BigGANDeepBlock, BlockFactory


class SinusoidalEmbedding(nn.Module):
    """[sin, cos] of ``t * exp(-i ln(10000) / (half - 1))``, i < half = dim / 2 (DDPM's embedding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @override
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


def _apply(
    blocks: nn.Module,
    x: torch.Tensor,
    time_embed: torch.Tensor,
    context: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """One [Res, attention-or-Identity, Res] triple (a ModuleList)."""
    assert isinstance(blocks, nn.ModuleList)
    res_in, attn, res_out = blocks
    x = res_in(x, time_embed)
    if isinstance(attn, AttentionBlock):
        x = attn(x, time_embed, context, mask)
    return res_out(x, time_embed)


class DownLevel(nn.Module):
    """One encoder level of the U-Net: residual blocks, optional attention, then a downsampling block."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        time_dim: int,
        context_dim: int | None,
        num_blocks: int,
        block: BlockFactory,
        groups: int,
        head_dim: int,
        expansion_ratio: int,
        down_sample: bool,
        self_attention: bool,
    ) -> None:
        super().__init__()
        attn = partial(
            AttentionBlock, time_dim=time_dim, groups=groups, head_dim=head_dim, expansion_ratio=expansion_ratio
        )
        self.self_attention_block = attn(in_dim) if self_attention else nn.Identity()
        triples = []
        for i in range(num_blocks):
            c_in = in_dim if i == 0 else out_dim
            last = i == num_blocks - 1
            triples.append(
                nn.ModuleList(
                    [
                        block(c_in, out_dim, time_dim, groups),
                        attn(out_dim, context_dim=context_dim) if context_dim else nn.Identity(),
                        block(out_dim, out_dim, time_dim, groups, resample="down" if (last and down_sample) else None),
                    ]
                )
            )
        self.resnet_attn_blocks = nn.ModuleList(triples)

    @override
    def forward(
        self, x: torch.Tensor, time_embed: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if isinstance(self.self_attention_block, AttentionBlock):
            x = self.self_attention_block(x, time_embed)
        for blocks in self.resnet_attn_blocks:
            x = _apply(blocks, x, time_embed, context, mask)
        return x


class UpLevel(nn.Module):
    """One decoder level of the U-Net: an upsampling block, then residual blocks reading the skip connection."""

    def __init__(
        self,
        in_dim: int,
        cat_dim: int,
        out_dim: int,
        time_dim: int,
        context_dim: int | None,
        num_blocks: int,
        block: BlockFactory,
        groups: int,
        head_dim: int,
        expansion_ratio: int,
        up_sample: bool,
        self_attention: bool,
    ) -> None:
        super().__init__()
        attn = partial(
            AttentionBlock, time_dim=time_dim, groups=groups, head_dim=head_dim, expansion_ratio=expansion_ratio
        )
        triples = []
        for i in range(num_blocks):
            c = in_dim + cat_dim if i == 0 else in_dim
            c_out = out_dim if i == num_blocks - 1 else in_dim
            triples.append(
                nn.ModuleList(
                    [
                        block(c, c, time_dim, groups, resample="up" if (i == 0 and up_sample) else None),
                        attn(c, context_dim=context_dim) if context_dim else nn.Identity(),
                        block(c, c_out, time_dim, groups),
                    ]
                )
            )
        self.resnet_attn_blocks = nn.ModuleList(triples)
        self.self_attention_block = attn(out_dim) if self_attention else nn.Identity()

    @override
    def forward(
        self, x: torch.Tensor, time_embed: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        for blocks in self.resnet_attn_blocks:
            x = _apply(blocks, x, time_embed, context, mask)
        if isinstance(self.self_attention_block, AttentionBlock):
            x = self.self_attention_block(x, time_embed)
        return x


class KandinskyUNet(nn.Module):
    """``forward(x, t, context, mask) -> eps`` (or v). ``context`` is the PROJECTED text [B, L, context_dim],
    ``mask`` [B, L] bool (True = token). Defaults are the official 3.0B configuration."""

    def __init__(
        self,
        in_channels: int = 4,  # latent channels (9 for inpainting)
        out_channels: int = 4,
        model_channels: int = 384,  # widths = model_channels * dim_mult
        init_channels: int | None = 192,  # in_layer width; None = model_channels
        time_embed_dim: int = 1536,
        context_dim: int = 4096,  # projected text width
        groups: int = 32,  # group norm groups
        head_dim: int = 64,
        expansion_ratio: int = 4,  # attention feed-forward width ratio
        dim_mult: Sequence[int] = (1, 2, 4, 8),
        num_blocks: Sequence[int] = (3, 3, 3, 3),
        add_cross_attention: Sequence[bool] = (False, True, True, True),
        add_self_attention: Sequence[bool] = (False, True, True, True),
        block: BlockFactory = BigGANDeepBlock,  # residual block factory (biggan_deep | resnet)
        gradient_checkpointing: bool = False,  # recompute each level in backward to save memory
    ) -> None:
        super().__init__()
        lengths = {len(dim_mult), len(num_blocks), len(add_cross_attention), len(add_self_attention)}
        if len(lengths) != 1:
            raise ValueError(
                f"dim_mult, num_blocks, add_cross_attention, add_self_attention must have one length, got {lengths}"
            )
        init_channels = init_channels or model_channels
        self.in_channels, self.out_channels, self.time_embed_dim = in_channels, out_channels, time_embed_dim
        self.context_dim = context_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.to_time_embed = nn.Sequential(
            SinusoidalEmbedding(init_channels),
            nn.Linear(init_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        self.feature_pooling = AttentionPooling(time_embed_dim, context_dim, head_dim)
        self.in_layer = nn.Conv2d(in_channels, init_channels, 3, padding=1)
        dims = [init_channels, *(model_channels * m for m in dim_mult)]
        levels = list(zip(dims[:-1], dims[1:], strict=False))
        n = len(levels)
        common: dict[str, Any] = dict(
            time_dim=time_embed_dim, block=block, groups=groups, head_dim=head_dim, expansion_ratio=expansion_ratio
        )
        self.down_samples = nn.ModuleList(
            [
                DownLevel(
                    i,
                    o,
                    context_dim=context_dim if cross else None,
                    num_blocks=nb,
                    down_sample=lvl < n - 1,
                    self_attention=sa,
                    **common,
                )
                for lvl, ((i, o), nb, cross, sa) in enumerate(
                    zip(levels, num_blocks, add_cross_attention, add_self_attention, strict=False)
                )
            ]
        )
        cat_dims = [o for _, o in levels[:-1]] + [0]  # skips: outputs of all but the deepest down level
        self.up_samples = nn.ModuleList(
            [
                UpLevel(
                    i,
                    cat_dims[n - 1 - lvl],
                    o,
                    context_dim=context_dim if cross else None,
                    num_blocks=nb,
                    up_sample=lvl > 0,
                    self_attention=sa,
                    **common,
                )
                for lvl, ((o, i), nb, cross, sa) in enumerate(
                    zip(
                        reversed(levels),
                        *(list(reversed(p)) for p in (num_blocks, add_cross_attention, add_self_attention)),
                        strict=False,
                    )
                )
            ]
        )
        self.out_layer = nn.Sequential(
            nn.GroupNorm(groups, init_channels), nn.SiLU(), nn.Conv2d(init_channels, out_channels, 3, padding=1)
        )
        self.downsample_factor = 2 ** (n - 1)

    def _run(self, level: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(level, *args, use_reentrant=False)
        return level(*args)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor | None = None,
        time_extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``time_extra`` [B, time_embed_dim] is added to the time embedding before the text pooling (the mapping
        prior arm's image-embedding term)."""
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(
                f"U-Net input {tuple(x.shape[-2:])} is not divisible by its down-sampling factor "
                f"{self.downsample_factor}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        time_embed = self.to_time_embed(t.to(x.dtype) if t.is_floating_point() else t)
        if time_extra is not None:
            time_embed = time_embed + time_extra.to(time_embed.dtype)
        time_embed = self.feature_pooling(time_embed, context, mask)
        time_embed = time_embed.to(x.dtype)
        skips = []
        x = self.in_layer(x)
        for i, level in enumerate(self.down_samples):
            x = self._run(level, x, time_embed, context, mask)
            if i < len(self.down_samples) - 1:
                skips.append(x)
        for i, level in enumerate(self.up_samples):
            if i > 0:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._run(level, x, time_embed, context, mask)
        return self.out_layer(x)
