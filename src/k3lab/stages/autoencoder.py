"""The MoVQ autoencoder stage: reconstruction + perceptual + PatchGAN + codebook losses, manual optimisation.

Note: with manual optimisation Lightning counts every ``optimizer.step()`` in ``global_step``, so once
the discriminator is on, ``trainer.max_steps`` advances by 2 per batch. ``disc_start`` and the logged
``train/batches`` count batches.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
import torchvision
from torch import nn
from torch.optim import Optimizer
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from typing_extensions import override

from k3lab.data.batch import Batch, batch_images
from k3lab.nn.ema import EMA
from k3lab.nn.losses import hinge_discriminator_loss, hinge_generator_loss, reconstruction_loss
from k3lab.nn.movq import MoVQ
from k3lab.stages.common import OptimizerFactory
from k3lab.tracking import log_image


class AutoencoderStage(L.LightningModule):
    """Trains a :class:`~k3lab.nn.movq.MoVQ`; validation reports PSNR/SSIM of the (EMA) model."""

    batches_seen: torch.Tensor

    def __init__(
        self,
        autoencoder: MoVQ,
        optimizer: OptimizerFactory = partial(torch.optim.Adam, lr=1e-4, betas=(0.5, 0.9)),
        discriminator: nn.Module | None = None,  # None: no adversarial loss
        disc_optimizer: OptimizerFactory | None = None,  # defaults to ``optimizer``
        reconstruction: str = "l2",  # "l2" or "l1"
        perceptual_weight: float = 0.0,  # LPIPS weight (0.1 in MoVQGAN); needs vgg_weights
        vgg_weights: str | None = None,  # local torchvision VGG16 state dict for LPIPS
        disc_weight: float = 0.1,  # generator adversarial weight
        disc_start: int = 0,  # batches before the discriminator turns on
        codebook_weight: float = 1.0,
        quantize: bool = True,  # train through the quantiser (MoVQ) or continuous only
        ema_decay: float | None = 0.9999,  # None: no EMA; validation/export use the EMA when present
        grad_clip: float | None = 1.0,  # max global grad norm per optimiser, None = off
        num_grid_images: int = 8,
        image_dir: str | None = None,  # where reconstruction grids are saved (besides MLflow)
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.ddp_unused_parameters = True  # the discriminator is idle before disc_start (trainer=ddp finds them)
        self.save_hyperparameters(ignore=["autoencoder", "discriminator", "optimizer", "disc_optimizer"])
        self.autoencoder = autoencoder
        self.discriminator = discriminator
        self.optimizer_factory = optimizer
        self.disc_optimizer_factory = disc_optimizer or optimizer
        self.perceptual: nn.Module | None = None
        if perceptual_weight > 0:
            if not vgg_weights:
                raise ValueError(
                    "stage.perceptual_weight > 0 needs stage.vgg_weights (a local VGG16 state dict); nothing is "
                    "downloaded"
                )
            from k3lab.nn.lpips import build_lpips

            self.perceptual = build_lpips(vgg_weights)
        self.autoencoder_ema = EMA(autoencoder, ema_decay) if ema_decay is not None else None
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_psnr_continuous = PeakSignalNoiseRatio(data_range=1.0)

    def exportable_modules(self) -> dict[str, nn.Module]:
        """What a later stage loads: the EMA weights when kept, else the live ones."""
        return {"autoencoder": self.eval_model()}

    @override
    def configure_optimizers(self) -> list[Optimizer]:
        opts = [self.optimizer_factory(self.autoencoder.parameters())]
        if self.discriminator is not None:
            opts.append(self.disc_optimizer_factory(self.discriminator.parameters()))
        return opts

    def disc_active(self) -> bool:
        """Whether the discriminator trains yet (after ``disc_start`` batches)."""
        return self.discriminator is not None and int(self.batches_seen) >= self.hparams["disc_start"]

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        optimizers = self.optimizers()
        opts = optimizers if isinstance(optimizers, list) else [optimizers]
        opt_ae = opts[0]
        x = batch_images(batch, "autoencoder")
        out = self.autoencoder(x, quantize=hp["quantize"])
        x_hat = out.reconstruction
        rec = reconstruction_loss(x, x_hat, hp["reconstruction"])
        loss = rec + hp["codebook_weight"] * out.codebook_loss
        logs = {"train/rec_loss": rec, "train/codebook_loss": out.codebook_loss}
        if self.perceptual is not None:
            p = self.perceptual(x_hat, x).mean()
            loss = loss + hp["perceptual_weight"] * p
            logs["train/perceptual_loss"] = p
        disc = self.discriminator if self.disc_active() else None
        if disc is not None:
            disc.requires_grad_(False)
            g = hinge_generator_loss(disc(x_hat))
            disc.requires_grad_(True)
            loss = loss + hp["disc_weight"] * g
            logs["train/g_loss"] = g
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if hp["grad_clip"]:
            self.clip_gradients(opt_ae.optimizer, gradient_clip_val=hp["grad_clip"], gradient_clip_algorithm="norm")
        opt_ae.step()
        if disc is not None:
            opt_d = opts[1]
            d = hinge_discriminator_loss(disc(x.detach()), disc(x_hat.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d)
            if hp["grad_clip"]:
                self.clip_gradients(opt_d.optimizer, gradient_clip_val=hp["grad_clip"], gradient_clip_algorithm="norm")
            opt_d.step()
            logs["train/d_loss"] = d
        if self.autoencoder_ema is not None:
            self.autoencoder_ema.update(self.autoencoder)
        self.batches_seen += 1
        logs["train/loss"] = loss
        logs["train/batches"] = self.batches_seen.float()
        self.log_dict({k: v.detach() for k, v in logs.items()}, prog_bar=False, batch_size=x.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=x.shape[0])
        return loss.detach()

    def eval_model(self) -> MoVQ:
        """The weights validation and export use: the EMA copy when kept."""
        return self.autoencoder_ema.module if self.autoencoder_ema is not None else self.autoencoder

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        model = self.eval_model()
        x = batch_images(batch, "autoencoder")
        latent = model.encode(x)  # encoded once for both decode paths
        x_hat = model.decode(latent, quantize=self.hparams["quantize"])
        x01, xh01 = (x + 1) / 2, ((x_hat + 1) / 2).clamp(0, 1)
        self.val_psnr.update(xh01, x01)
        self.val_ssim.update(xh01, x01)
        x_cont = xh01 if not self.hparams["quantize"] else ((model.decode(latent, quantize=False) + 1) / 2).clamp(0, 1)
        self.val_psnr_continuous.update(x_cont, x01)
        if batch_idx == 0:
            n = min(self.hparams["num_grid_images"], x.shape[0])
            grid = torchvision.utils.make_grid(torch.cat([x01[:n], xh01[:n]]), nrow=n, padding=1)
            log_image(self.loggers, grid, "val/reconstructions", int(self.batches_seen), self.hparams["image_dir"])

    @override
    def on_validation_epoch_end(self) -> None:
        self.log("val/psnr", self.val_psnr.compute(), prog_bar=True)
        ssim = self.val_ssim.compute()  # (typed Tensor | tuple: the tuple only with return_full_image=True)
        self.log("val/ssim", ssim if isinstance(ssim, torch.Tensor) else ssim[0])
        self.log("val/psnr_continuous", self.val_psnr_continuous.compute())
        for metric in (self.val_psnr, self.val_ssim, self.val_psnr_continuous):
            metric.reset()
