"""PatchGAN discriminator (Isola et al. 2017, arXiv 1611.07004) as used by taming/MoVQGAN."""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """Conv(k4,s2) + LeakyReLU, ``n_layers - 1`` strided conv-norm blocks, one stride-1 block, a 1-channel head."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 2, norm: str = "batch") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator: n_layers must be >= 1, got {n_layers}")
        norms = {"batch": nn.BatchNorm2d, "group": lambda c: nn.GroupNorm(32 if c % 32 == 0 else 1, c)}
        if norm not in norms:
            raise ValueError(f"PatchDiscriminator: norm must be one of {sorted(norms)}, got {norm!r}")
        norm_layer = norms[norm]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits [B, 1, h, w] for images in [-1, 1]."""
        return self.main(x)
