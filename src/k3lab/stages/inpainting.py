"""The inpainting stage: the diffusion stage with Kandinsky 3's 9-channel U-Net, trained on masked images.

Each training sample draws a mask from the ``masks`` group (:class:`~k3lab.data.masks.MaskGenerator`: boxes, brush
strokes, scene objects, outpainting borders, full images); the U-Net reads ``[x_t, keep, masked latent]``
(:mod:`k3lab.inference.editing`: the hole is set to 0 before the frozen first stage encodes the image, ``keep = 1 -
hole`` is resized to the latent grid by nearest-neighbour). ``init_weights`` may name a text-to-image run: its
U-Net's input convolution gains zero weights for the five extra channels, so training starts from the text-to-image
model.
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

from k3lab.data.batch import Batch, batch_images
from k3lab.data.masks import MaskGenerator
from k3lab.inference.editing import inpainting_channels, latent_keep, masked_image
from k3lab.nn.unet import KandinskyUNet
from k3lab.stages.diffusion import DiffusionStage


class InpaintingStage(DiffusionStage):
    """:class:`DiffusionStage` whose U-Net also sees a keep mask and the masked image's latent.

    It subclasses rather than composes because everything but the U-Net's input is the text-to-image stage's own
    training step, EMA, export and validation (the official inpainting model is the same U-Net with 9 input channels);
    it overrides only the two hooks that differ, :meth:`check_channels` and :meth:`image_condition`."""

    def __init__(self, *args: Any, masks: MaskGenerator | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.masks = masks if masks is not None else MaskGenerator()

    @staticmethod
    @override
    def check_channels(latent_channels: int, unet: KandinskyUNet) -> None:
        want = (2 * latent_channels + 1, latent_channels)
        if (int(unet.in_channels), int(unet.out_channels)) != want:
            raise ValueError(
                f"stage=inpainting: with {latent_channels}-channel latents the U-Net needs in_channels={want[0]} "
                f"(x_t, keep mask, masked latent) and out_channels={want[1]}; got model.unet.in_channels="
                f"{unet.in_channels}, out_channels={unet.out_channels}"
            )

    def image_condition(self, batch: Batch, z: torch.Tensor, train: bool) -> torch.Tensor:
        """Keep mask and scaled masked-image latent; validation draws its masks from a fixed seed (comparable
        losses)."""
        image = batch_images(batch, "inpainting")
        gen = None if train else torch.Generator().manual_seed(int(self.validation_options.seed))
        hole = self.masks(batch["metadata"], (image.shape[-2], image.shape[-1]), gen, device=image.device)
        with torch.no_grad():
            masked = self.first_stage.encode(masked_image(image, hole)).float() * self.latent_scale.value
        return inpainting_channels(latent_keep(hole, (z.shape[-2], z.shape[-1])), masked)
