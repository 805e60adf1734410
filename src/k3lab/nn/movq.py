"""MoVQ autoencoder (Zheng et al. 2022, arXiv 2209.09002), as Kandinsky 3 uses it.

Encoder -> quant_conv -> (vector quantiser) -> post_quant_conv -> decoder whose every norm is a
spatial norm driven by the latent before ``post_quant_conv``. Kandinsky 3 decodes continuously.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from k3lab.nn.movq_blocks import AttnBlock, Downsample, Norm, ResnetBlock, Upsample
from k3lab.nn.quantizer import QuantizerOutput, VectorQuantizer


@dataclass
class AutoencoderOutput:
    """Reconstruction in [-1, 1] scale, the continuous latent, codebook loss and code indices."""

    reconstruction: torch.Tensor
    latent: torch.Tensor
    codebook_loss: torch.Tensor
    indices: torch.Tensor | None


class Level(nn.Module):
    """One resolution level in the taming key layout: ``block.<i>``, ``attn.<i>`` (empty without attention) and an
    optional ``downsample`` (encoder) or ``upsample`` (decoder) under that name."""

    def __init__(self, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.resample_name = resample_name  # the resampler, when the level has one, is added under this name

    def resample(self, h: torch.Tensor) -> torch.Tensor:
        """The level's down/upsampler applied to ``h`` (``h`` itself at the level that has none)."""
        module = self._modules.get(self.resample_name)
        return module(h) if module is not None else h


class Mid(nn.Module):
    """The middle of the encoder/decoder: ResNet block, attention, ResNet block (``mid.block_1`` ... keys)."""

    def __init__(self, width: int, zq_channels: int | None, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(width, width, zq_channels, dropout, num_groups)
        self.attn_1 = AttnBlock(width, zq_channels, num_groups)
        self.block_2 = ResnetBlock(width, width, zq_channels, dropout, num_groups)

    @override
    def forward(self, h: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, zq), zq), zq)


def levels_of(modules: nn.ModuleList) -> list[Level]:
    """The encoder's or decoder's levels, typed."""
    return [m for m in modules if isinstance(m, Level)]


class Encoder(nn.Module):
    """Taming-style encoder: per level ``num_res_blocks`` ResNet blocks (+attention), then a stride-2 down."""

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_levels: Sequence[int],
        z_channels: int,
        dropout: float = 0.0,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths = [ch * m for m in ch_mult]
        block_in = ch
        self.down = nn.ModuleList()
        for level, block_out in enumerate(widths):
            stage = Level("downsample")
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, None, dropout, num_groups))
                block_in = block_out
                if level in attn_levels:
                    stage.attn.append(AttnBlock(block_in, None, num_groups))
            if level != len(widths) - 1:
                stage.add_module("downsample", Downsample(block_in))
            self.down.append(stage)
        self.mid = Mid(block_in, None, dropout, num_groups)
        self.norm_out = Norm(block_in, None, num_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in levels_of(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            h = stage.resample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """MoVQ decoder: every norm is a SpatialNorm on ``zq``; ``num_res_blocks + 1`` blocks per level."""

    def __init__(
        self,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_levels: Sequence[int],
        z_channels: int,
        zq_channels: int,
        dropout: float = 0.0,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        widths = [ch * m for m in ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in, zq_channels, dropout, num_groups)
        up: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            stage = Level("upsample")
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, widths[level], zq_channels, dropout, num_groups))
                block_in = widths[level]
                if level in attn_levels:
                    stage.attn.append(AttnBlock(block_in, zq_channels, num_groups))
            if level != 0:
                stage.add_module("upsample", Upsample(block_in))
            up.insert(0, stage)  # keep ``up[level]`` indexing (taming key layout)
        self.up = nn.ModuleList(up)
        self.norm_out = Norm(block_in, zq_channels, num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @override
    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z), zq)
        for stage in reversed(levels_of(self.up)):
            for i, block in enumerate(stage.block):
                h = block(h, zq)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h, zq)
            h = stage.resample(h)
        return self.conv_out(F.silu(self.norm_out(h, zq)))


class MoVQ(nn.Module):
    """MoVQ with a continuous (Kandinsky 3) and a quantised decode path.

    Images are in [-1, 1]; the latent has ``embed_dim`` channels at 1 / 2**(len(ch_mult) - 1) resolution.
    """

    def __init__(
        self,
        in_channels: int = 3,  # image channels
        out_channels: int = 3,  # reconstructed image channels
        ch: int = 256,  # base width
        ch_mult: Sequence[int] = (1, 2, 2, 4),  # width multiplier per level
        num_res_blocks: int = 2,  # encoder blocks per level (decoder: +1)
        attn_levels: Sequence[int] | None = None,  # levels with attention; None = lowest only
        z_channels: int = 4,  # encoder output channels
        embed_dim: int = 4,  # latent / codebook vector width
        n_embed: int = 16384,  # codebook size
        beta: float = 0.25,  # commitment weight
        restart_dead_codes: bool = False,  # re-seed unused codes while training (not in the MoVQGAN recipe)
        dropout: float = 0.0,
        num_groups: int = 32,  # GroupNorm groups (the encoder's; the decoder's too unless decoder_num_groups is set)
        decoder_num_groups: int | None = None,  # the decoder's spatial norms (diffusers' VQModel fixes 32 there)
    ) -> None:
        super().__init__()
        for name, value in (("ch", ch), ("num_res_blocks", num_res_blocks), ("z_channels", z_channels)):
            if value <= 0:
                raise ValueError(f"MoVQ: {name} must be positive, got {value}")
        decoder_num_groups = num_groups if decoder_num_groups is None else decoder_num_groups
        for name, groups in (("num_groups", num_groups), ("decoder_num_groups", decoder_num_groups)):
            if any(ch * m % groups for m in ch_mult):
                raise ValueError(
                    f"MoVQ: every width ch*ch_mult={[ch * m for m in ch_mult]} must divide by {name}={groups}"
                )
        levels = tuple(attn_levels) if attn_levels is not None else (len(ch_mult) - 1,)
        self.config: dict[str, Any] = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_levels=levels,
            z_channels=z_channels,
            embed_dim=embed_dim,
            n_embed=n_embed,
            num_groups=num_groups,
            decoder_num_groups=decoder_num_groups,
        )
        self.encoder = Encoder(in_channels, ch, ch_mult, num_res_blocks, levels, z_channels, dropout, num_groups)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta, restart_dead_codes=restart_dead_codes)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(
            out_channels, ch, ch_mult, num_res_blocks, levels, z_channels, embed_dim, dropout, decoder_num_groups
        )

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction from image to latent (8 for the Kandinsky 3 MoVQ)."""
        return 2 ** (len(self.config["ch_mult"]) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent (the config's ``embed_dim``)."""
        return int(self.config["embed_dim"])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image [-1, 1] -> continuous latent (``quant_conv`` output, not quantised), as Kandinsky 3 uses it."""
        return self.quant_conv(self.encoder(x))

    def decode(self, latent: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Latent -> image in [-1, 1] scale; ``quantize=False`` is Kandinsky 3's continuous decode."""
        z_q = self.quantize(latent).z_q if quantize else latent
        return self.decoder(self.post_quant_conv(z_q), z_q)

    @override
    def forward(self, x: torch.Tensor, quantize: bool = True) -> AutoencoderOutput:
        latent = self.encode(x)
        if quantize:
            q: QuantizerOutput = self.quantize(latent)
            z_q, loss, indices = q.z_q, q.loss, q.indices
        else:
            z_q, loss, indices = latent, latent.new_zeros(()), None
        recon = self.decoder(self.post_quant_conv(z_q), z_q)
        return AutoencoderOutput(reconstruction=recon, latent=latent, codebook_loss=loss, indices=indices)


def count_parameters(module: nn.Module, exclude_codebook: bool = False) -> int:
    """Number of parameters; ``exclude_codebook`` drops every VectorQuantizer embedding."""
    total = sum(p.numel() for p in module.parameters())
    if exclude_codebook:
        total -= sum(m.embedding.weight.numel() for m in module.modules() if isinstance(m, VectorQuantizer))
    return total
