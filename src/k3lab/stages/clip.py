"""The conditioning-CLIP stage: contrastive image-text training (Radford et al. 2021, arXiv 2103.00020) of the
small CLIP a mapping prior uses, with held-out retrieval accuracy as its validation metric."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from k3lab.data.batch import Batch, batch_images
from k3lab.nn.clip import Clip
from k3lab.stages.common import OptimizerFactory, with_warmup


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (CLIP, arXiv 2103.00020); identical captions count as positives."""
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.t(), labels)) / 2


class ClipStage(L.LightningModule):
    """Trains ``clip``; validation reports image->text top-1 retrieval among the batch (chance 1 / batch size)."""

    def __init__(
        self,
        clip: Clip,
        optimizer: OptimizerFactory = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
        warmup_steps: int = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["clip", "optimizer"])
        self.clip = clip
        self.optimizer_factory = optimizer

    def exportable_modules(self) -> dict[str, nn.Module]:
        """The modules the checkpoint folder exports as safetensors: the CLIP."""
        return {"clip": self.clip}

    @override
    def configure_optimizers(self) -> dict:
        return with_warmup(self.optimizer_factory(self.clip.parameters()), self.hparams["warmup_steps"])

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images = batch_images(batch, "clip")
        loss = clip_loss(*self.clip(images, batch["caption"]))
        self.log("train/loss", loss.detach(), batch_size=images.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=images.shape[0])
        return loss

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        img, txt, _ = self.clip(batch_images(batch, "clip"), batch["caption"])
        pred = (img @ txt.t()).argmax(dim=1).tolist()
        captions = batch["caption"]
        hits = sum(captions[j] == captions[i] for i, j in enumerate(pred))
        self.log("val/retrieval_top1", hits / len(captions), batch_size=len(captions), prog_bar=True)
        self.log("val/retrieval_chance", 1.0 / len(captions), batch_size=len(captions))
