"""The mapping-prior stage (Kandinsky 2.2 / unCLIP, arXiv 2204.06125): learns text-encoder states -> CLIP image
embedding with x0-prediction diffusion, on the frozen text encoder and the frozen conditioning CLIP."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from k3lab.data.batch import Batch, batch_images
from k3lab.diffusion import Schedule, diffusion_loss
from k3lab.diffusion.settings import DEFAULT_SAMPLING
from k3lab.inference.mapping import PriorMapping, null_text, text_for_prior
from k3lab.nn.clip import Clip
from k3lab.nn.ema import EMA
from k3lab.nn.prior import PriorTransformer
from k3lab.nn.text_encoder import frozen_text_encoder
from k3lab.stages.common import OptimizerFactory, clip_by_norm, with_warmup

log = logging.getLogger(__name__)


class PriorStage(L.LightningModule):
    """Trains ``prior``; validation samples embeddings for the validation captions and reports their cosine
    similarity to the true CLIP image embeddings, next to the dataset-mean-embedding baseline."""

    def __init__(
        self,
        prior: PriorTransformer | None,
        text_encoder: nn.Module,  # frozen, the same encoder the U-Net arm uses
        clip: Clip | None,  # frozen conditioning CLIP (never the evaluation's CLIP)
        optimizer: OptimizerFactory = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01),
        warmup_steps: int = 100,
        schedule: str = "cosine",
        num_timesteps: int = 1000,
        caption_dropout: float = 0.1,
        ema_decay: float | None = 0.999,
        grad_clip: float | None = 1.0,
        stats_batches: int = 8,  # training batches that estimate the embedding mean / std
        sample_steps: int = DEFAULT_SAMPLING.prior_steps,
        guidance_weight: float = DEFAULT_SAMPLING.prior_guidance,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["prior", "text_encoder", "clip", "optimizer"])
        if prior is None or clip is None:
            raise ValueError(
                "stage=prior needs a prior and its CLIP: compose it with model/prior=diffusion_mapping (or kandinsky22)"
            )
        text_encoder = frozen_text_encoder(text_encoder)
        if int(text_encoder.dim) != prior.text_dim:
            raise ValueError(
                f"the prior's text_dim={prior.text_dim} does not match the text encoder's width {text_encoder.dim}"
            )
        if int(clip.embed_dim) != prior.embedding_dim:
            raise ValueError(
                f"the prior's embedding_dim={prior.embedding_dim} does not match the CLIP's embedding width "
                f"{clip.embed_dim}"
            )
        self.prior = prior
        self.text_encoder = text_encoder
        self.clip = clip.eval().requires_grad_(False)
        self.optimizer_factory = optimizer
        self.schedule = Schedule.named(schedule, num_timesteps)
        self.prior_ema = EMA(prior, ema_decay) if ema_decay is not None else None
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))

    def exportable_modules(self) -> dict[str, nn.Module]:
        """The modules exported as safetensors: the prior (EMA when kept)."""
        return {"prior": self.eval_prior()}

    def eval_prior(self) -> PriorTransformer:
        """The prior used for evaluation and export: the EMA copy when kept."""
        return self.prior_ema.module if self.prior_ema is not None else self.prior

    @override
    def configure_optimizers(self) -> dict:
        return with_warmup(
            self.optimizer_factory([p for p in self.prior.parameters() if p.requires_grad]),
            self.hparams["warmup_steps"],
        )

    @override
    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        clip_by_norm(self, optimizer, self.hparams["grad_clip"], gradient_clip_val)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings of the batch's images (float32)."""
        return self.clip.embed_images(images).float()

    def on_fit_start(self) -> None:
        """Estimate the per-dimension mean / std of the CLIP image embeddings (2.2's clip_mean / clip_std)."""
        if bool(self.stats_ready):
            return
        embs = []
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError("the prior stage estimates its embedding statistics from the trainer's datamodule")
        for i, batch in enumerate(datamodule.train_dataloader()):
            if i >= self.hparams["stats_batches"]:
                break
            embs.append(self.image_embeddings(batch_images(batch, "prior").to(self.device)))
        emb = torch.cat(embs)
        for prior in filter(None, (self.prior, self.eval_prior())):
            prior.clip_mean.data.copy_(emb.mean(0, keepdim=True))
            prior.clip_std.data.copy_(emb.std(0, keepdim=True).clamp(min=1e-4))
        self.stats_ready.fill_(True)
        log.info("prior: embedding statistics from %d images", emb.shape[0])

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prior's inputs for a batch: text tokens, pooled text, mask and the target image embeddings."""
        hidden, mask = self.text_encoder.encode(batch["caption"])
        tokens, pooled, mask = text_for_prior(hidden.to(self.device), mask.to(self.device), self.prior.num_text_tokens)
        return tokens, pooled, mask, self.image_embeddings(batch_images(batch, "prior"))

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        tokens, pooled, mask, emb = self.inputs(batch)
        drop = torch.rand(emb.shape[0], device=emb.device) < self.hparams["caption_dropout"]
        nt, np_, nm = null_text(tokens, pooled, mask)
        tokens = torch.where(drop[:, None, None], nt, tokens)
        pooled = torch.where(drop[:, None], np_, pooled)
        mask = torch.where(drop[:, None], nm, mask)
        loss = diffusion_loss(
            lambda x, t: self.prior(x, t, tokens, pooled, mask), self.prior.normalize(emb), self.schedule, "x0"
        )
        self.log("train/loss", loss.detach(), batch_size=emb.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=emb.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update (inside the step: checkpoints hold the matching EMA)."""
        super().optimizer_step(*args, **kwargs)
        if self.prior_ema is not None:
            self.prior_ema.update(self.prior)

    def mapping(self) -> PriorMapping:
        """A :class:`PriorMapping` over the evaluation prior with the stage's sampling settings."""
        return PriorMapping(
            self.eval_prior(), self.schedule, self.hparams["sample_steps"], self.hparams["guidance_weight"]
        )

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        hidden, mask = self.text_encoder.encode(batch["caption"])
        emb = self.image_embeddings(batch_images(batch, "prior"))
        sampled = self.mapping().sample(hidden.to(self.device), mask.to(self.device), list(range(emb.shape[0])))
        cos = nn.functional.cosine_similarity(sampled, emb, dim=-1).mean()
        baseline = nn.functional.cosine_similarity(self.eval_prior().clip_mean.expand_as(emb), emb, dim=-1).mean()
        self.log("val/cosine", cos, batch_size=emb.shape[0], prog_bar=True)
        self.log("val/cosine_mean_embedding", baseline, batch_size=emb.shape[0])
