"""The diffusion stage: trains the Kandinsky 3 U-Net (and the text projection + null embedding) on frozen
text-encoder outputs and frozen first-stage latents. Precomputed embeddings/latents in the batch
(``text_embedding``/``text_mask``/``latent``) replace the frozen encoders when present."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Callable, cast

import lightning as L
import numpy as np
import torch
import torchvision
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from k3lab.data.batch import Batch
from k3lab.diffusion import Schedule, diffusion_loss
from k3lab.inference.conditioning import ConditioningArm, make_arm
from k3lab.inference.editing import expand_input_channels, is_inpainting, unet_input
from k3lab.inference.generator import Generator, check_resolution, latent_size
from k3lab.nn.clip import Clip
from k3lab.nn.ema import EMA
from k3lab.nn.first_stage import FirstStage, LatentScale
from k3lab.nn.lora import AdapterExport, LoraOptions, add_lora
from k3lab.nn.prior import PriorTransformer
from k3lab.nn.text_encoder import frozen_text_encoder
from k3lab.nn.unet import KandinskyUNet
from k3lab.stages.common import OptimizerFactory, clip_by_norm, with_warmup
from k3lab.stages.options import (
    SWITCH_VALUES,
    ConditioningOptions,
    LossOptions,
    OptimOptions,
    ValidationOptions,
    as_hparams,
    group_of,
)
from k3lab.tracking import log_image

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf training loss; the message names the step and the batch's sample keys."""


def switch_on(value: bool | str, device: torch.device) -> bool:
    """A speed switch's value: true / false, or auto = on when training on a CUDA device."""
    return value is True or (value == "auto" and torch.device(device).type == "cuda")


def accepts_fused(factory: Callable[..., Optimizer]) -> bool:
    """Whether the optimizer factory has a fused kernel and was not told explicitly whether to use it."""
    target = getattr(factory, "func", factory)
    explicit = "fused" in (getattr(factory, "keywords", None) or {})
    return not explicit and target in (torch.optim.AdamW, torch.optim.Adam)


def lora_from(value: LoraOptions | Mapping[str, Any] | None) -> LoraOptions | None:
    """``stage.lora`` as options (None: full training); an unknown key or a bad value is refused by name."""
    return None if value is None else group_of(LoraOptions, value, "stage.lora")


class DiffusionStage(L.LightningModule):
    """Epsilon/v-prediction training with uniform t, caption dropout to the null embedding, EMA, AdamW with
    linear warm-up; validation reports the loss at fixed timesteps and samples ``validation.prompts`` into a grid."""

    def __init__(
        self,
        unet: KandinskyUNet,
        first_stage: FirstStage,  # frozen MoVQ or Identity (k3lab.nn.first_stage)
        text_encoder: nn.Module | None = None,  # frozen; None when batches carry precomputed embeddings
        encoder_dim: int | None = None,  # text-encoder width (default: text_encoder.dim)
        optimizer: OptimizerFactory = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01),
        optim: OptimOptions | Mapping[str, Any] | None = None,  # warm-up, decay, clipping, fused kernel
        loss: LossOptions | Mapping[str, Any] | None = None,  # schedule, prediction, weighting, noise seed
        conditioning: ConditioningOptions | Mapping[str, Any] | None = None,  # caption dropout, arm options
        validation: ValidationOptions | Mapping[str, Any] | None = None,  # prompts, seed, resolution, sampling
        ema_decay: float | None = 0.9999,  # EMA of the U-Net and conditioning (None: no EMA)
        latent_scale: float | str = 1.0,  # multiply latents by this; "auto" = 1/std of the first batch
        init_weights: str | None = None,  # start from a checkpoint folder's unet/conditioning exports (fine-tuning)
        compile_blocks: bool | str = "auto",  # regional torch.compile of the U-Net blocks; auto = on a CUDA device
        clip: Clip | None = None,  # mapping-prior arm: frozen conditioning CLIP (None: Kandinsky 3's text arm)
        prior: PriorTransformer | None = None,  # mapping-prior arm: frozen trained prior, used for sampling
        lora: LoraOptions | Mapping[str, Any] | None = None,  # LoRA fine-tune: only adapters train (None: all)
    ) -> None:
        super().__init__()
        self.lora_options = lora_from(lora)
        self.optim_options = group_of(OptimOptions, optim, "stage.optim")
        self.loss_options = group_of(LossOptions, loss, "stage.loss")
        self.conditioning_options = group_of(ConditioningOptions, conditioning, "stage.conditioning")
        self.validation_options = group_of(ValidationOptions, validation, "stage.validation")
        if compile_blocks not in SWITCH_VALUES:
            raise ValueError(f"stage.compile_blocks={compile_blocks!r}: use true, false or auto")
        if not (latent_scale == "auto" or (isinstance(latent_scale, (int, float)) and latent_scale > 0)):
            raise ValueError(f"stage.latent_scale={latent_scale!r}: a positive number or 'auto'")
        if ema_decay is not None and not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f"stage.ema_decay={ema_decay}: in (0, 1), or null for no EMA")
        self.save_hyperparameters(
            {
                "encoder_dim": encoder_dim,
                "optim": as_hparams(self.optim_options),
                "loss": as_hparams(self.loss_options),
                "conditioning": as_hparams(self.conditioning_options),
                "validation": as_hparams(self.validation_options),
                "ema_decay": ema_decay,
                "latent_scale": latent_scale,
                "init_weights": init_weights,
                "compile_blocks": compile_blocks,
                "lora": self.lora_options.as_dict() if self.lora_options else None,
            }
        )
        if text_encoder is not None:
            text_encoder = frozen_text_encoder(text_encoder, encoder_dim)
            encoder_dim = int(text_encoder.dim)
        elif encoder_dim is None:
            raise ValueError("stage.encoder_dim is needed when no text encoder is given (precomputed embeddings)")
        self.check_channels(int(first_stage.latent_channels), unet)
        if self.validation_options.resolution is not None:
            check_resolution(int(self.validation_options.resolution), first_stage, unet)
        self.unet = unet
        self.schedule = Schedule.named(self.loss_options.schedule, int(self.loss_options.num_timesteps))
        sampling = self.validation_options.sampling
        self.arm: ConditioningArm = make_arm(
            encoder_dim,
            unet,
            self.schedule,
            diffusers_compat=bool(self.conditioning_options.diffusers_compat),
            clip=clip,
            prior=prior,
            image_tokens=int(self.conditioning_options.image_tokens),
            prior_steps=sampling.prior_steps,
            prior_guidance=sampling.prior_guidance,
        )
        if init_weights:
            from k3lab.io.checkpoint import load_state_dict, load_weights

            folder = Path(init_weights)
            state = load_state_dict(folder / "unet.safetensors")
            if is_inpainting(self.unet):  # from a text-to-image run: the extra input channels start at zero
                state = expand_input_channels(state, int(self.unet.in_channels))
            load_weights(self.unet, state, folder / "unet.safetensors")
            name = self.arm.export_name
            load_weights(
                self.arm.conditioning, load_state_dict(folder / f"{name}.safetensors"), folder / f"{name}.safetensors"
            )
            log.info("initialised the U-Net and %s from %s", name, folder)
        if self.lora_options is not None:  # after init_weights: the adapters start on the base weights
            self.arm.conditioning.requires_grad_(False)
            targets = add_lora(self.unet, self.lora_options)
            trained = sum(p.numel() for p in self.unet.parameters() if p.requires_grad)
            log.info("LoRA rank %d on %d layers: %d trained parameters", self.lora_options.rank, len(targets), trained)
        self.strict_loading = self.lora_options is None  # a LoRA checkpoint holds the adapters, not the base
        self.first_stage = first_stage.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.optimizer_factory = optimizer
        self.unet_ema = EMA(unet, ema_decay) if ema_decay is not None else None
        self.conditioning_ema = EMA(self.arm.conditioning, ema_decay) if ema_decay is not None else None
        self.latent_scale = LatentScale(float("nan") if latent_scale == "auto" else float(latent_scale))

    @staticmethod
    def check_channels(latent_channels: int, unet: KandinskyUNet) -> None:
        """The U-Net reads and predicts first-stage latents (an inpainting stage overrides this)."""
        if (int(unet.in_channels), int(unet.out_channels)) != (latent_channels, latent_channels):
            raise ValueError(
                f"the first stage gives {latent_channels}-channel latents but model.unet.in_channels="
                f"{unet.in_channels}, out_channels={unet.out_channels} (both must be {latent_channels}; an inpainting "
                "U-Net belongs to stage=inpainting)"
            )

    # Lightning checkpoints written before the conditioning arm existed name its parts differently.
    LEGACY_KEYS = (
        ("text_conditioning_ema.", "conditioning_ema."),
        ("image_conditioning_ema.", "conditioning_ema."),
        ("text_conditioning.", "arm.conditioning."),
        ("image_conditioning.", "arm.conditioning."),
        ("clip.", "arm.clip."),
        ("prior.", "arm.prior."),
    )

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A LoRA fine-tune's checkpoint holds the adapters (live and EMA) and the buffers, not the frozen base,
        which ``stage.init_weights`` rebuilds on resume."""
        if self.lora_options is not None:
            buffers = {n for n, _ in self.named_buffers()}
            state = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: v for k, v in state.items() if ".lora_" in k or k in buffers}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume from checkpoints of older k3lab versions: their key names are mapped onto the arm's; a LoRA
        checkpoint must hold every adapter weight."""
        state = checkpoint.get("state_dict", {})
        if self.lora_options is not None:
            missing = [n for n, _ in self.named_parameters() if ".lora_" in n and n not in state]
            if missing:
                raise ValueError(f"the checkpoint lacks {len(missing)} LoRA weight(s) of stage.lora, e.g. {missing[0]}")
        for key in [k for k in state if not k.startswith(("arm.", "conditioning_ema."))]:
            for old, new in self.LEGACY_KEYS:
                if key.startswith(old):
                    state[new + key[len(old) :]] = state.pop(key)
                    break

    # ------------------------------------------------------------------ parts
    def exportable_modules(self) -> dict[str, nn.Module]:
        """The modules exported as safetensors: the U-Net, the arm's conditioning (EMA when kept), the latent scale."""
        unet, arm = self.eval_modules()
        if self.lora_options is not None:  # the adapter alone (lora.safetensors + lora.json); the base is init_weights
            adapter = AdapterExport(unet, self.lora_options, self.hparams.get("init_weights"))
            return {"lora": adapter, arm.export_name: arm.conditioning, "latent_scale": self.latent_scale}
        return {"unet": unet, arm.export_name: arm.conditioning, "latent_scale": self.latent_scale}

    def eval_modules(self) -> tuple[KandinskyUNet, ConditioningArm]:
        """The U-Net and the arm that sampling and export use: around the EMA copies when kept."""
        if self.unet_ema is not None and self.conditioning_ema is not None:
            return self.unet_ema.module, self.arm.with_conditioning(self.conditioning_ema.module)
        return self.unet, self.arm

    def generator(self) -> Generator:
        """A :class:`Generator` over this stage's current (EMA) modules, for validation and evaluation."""
        return Generator.from_stage(self)

    @override
    def configure_optimizers(self) -> dict:
        params = [p for p in [*self.unet.parameters(), *self.arm.conditioning.parameters()] if p.requires_grad]
        factory = self.optimizer_factory
        if switch_on(self.optim_options.fused, self.device) and accepts_fused(factory):
            factory = partial(cast(Callable[..., Optimizer], factory), fused=True)
        return with_warmup(
            factory(params),
            int(self.optim_options.warmup_steps),
            self.optim_options.lr_decay_steps,
            self.optim_options.lr_final,
        )

    @override
    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        clip_by_norm(self, optimizer, self.optim_options.grad_clip, gradient_clip_val)

    def on_fit_start(self) -> None:
        """The GPU switches (``compile_blocks``); every aspect bucket of the data must fit the first stage's and
        U-Net's downsampling (a clear error before the first step, naming the bucket); a half-size LoRA base needs the
        trainer's autocast."""
        base_dtype = self.lora_options.base_dtype if self.lora_options is not None else None
        if base_dtype is not None and "16" not in str(self.trainer.precision):
            raise ValueError(
                f"stage.lora.base_dtype={base_dtype} runs under autocast: use trainer=gpu (bf16-mixed) or "
                f"trainer.precision=bf16-mixed, or stage.lora.base_dtype=null for an fp32 base (precision "
                f"{self.trainer.precision})"
            )
        if switch_on(self.hparams["compile_blocks"], self.device):
            self.compile_blocks()
        shapes = getattr(getattr(self.trainer, "datamodule", None), "bucket_shapes", None) or []
        for shape in shapes:
            try:
                latent_size(shape, self.first_stage, self.unet)
            except ValueError as e:
                raise ValueError(f"data.aspect_buckets: bucket {shape[0]}x{shape[1]} (height x width): {e}") from e

    def compile_blocks(self) -> None:
        """Regional ``torch.compile``: each U-Net residual and attention block on its own (short compiles, one graph
        shared by identical blocks); the state dict keeps its names."""
        from k3lab.nn.sharding import compile_blocks

        log.info("compiled %d U-Net blocks (stage.compile_blocks)", compile_blocks(self.unet))

    # ------------------------------------------------------------------ inputs
    def latents(self, batch: Batch) -> torch.Tensor:
        """Scaled latents of the batch (precomputed or encoded); the first batch measures the scale when 'auto'."""
        z = batch["latent"].float() if "latent" in batch else self.first_stage.encode(batch["image"])  # type: ignore[typeddict-item]
        if not self.latent_scale.measured():
            std = z.float().std().clamp(min=1e-6).reshape(1)
            # every rank uses the same scale
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(std)
                std /= torch.distributed.get_world_size()
            self.latent_scale.value.fill_(1.0 / float(std))
            log.info("latent scale measured on the first batch: %.4f (1/std)", float(self.latent_scale.value))
        return z * self.latent_scale.value.to(z.dtype)

    def image_condition(self, batch: Batch, z: torch.Tensor, train: bool) -> torch.Tensor | None:
        """Extra U-Net input channels for this batch (none here; the inpainting stage's keep mask and masked
        latent)."""
        return None

    def denoiser(
        self, unet: nn.Module, cond: tuple[torch.Tensor, ...], extra: torch.Tensor | None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``model(x_t, t)`` for the loss: the U-Net with its condition and any extra input channels."""
        return lambda x, t: unet(unet_input(x, extra), t, *cond)

    # ------------------------------------------------------------------ steps
    def step_generator(self, device: torch.device) -> torch.Generator | None:
        """The random stream of this optimizer step when ``noise_seed`` is set, else None (the global stream).

        Seeded by (noise_seed, step, rank) alone, so two runs that differ only in an ablated choice (block, text
        encoder, prior) draw the same timesteps, noise and caption dropout at every step (common random numbers for a
        paired comparison), and a resumed run draws what the uninterrupted one would have."""
        seed = self.loss_options.noise_seed
        if seed is None:
            return None
        rank = int(self.trainer.global_rank) if self._trainer is not None else 0
        state = np.random.SeedSequence([int(seed), int(self.global_step), rank]).generate_state(2, np.uint64)[0]
        return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        z = self.latents(batch)
        gen = self.step_generator(z.device)
        drop = torch.rand(z.shape[0], device=z.device, generator=gen) < self.conditioning_options.dropout
        cond = self.arm.condition(batch, self.text_encoder, drop)
        extra = self.image_condition(batch, z, train=True)
        loss = diffusion_loss(
            self.denoiser(self.unet, cond, extra),
            z,
            self.schedule,
            self.loss_options.prediction,
            generator=gen,
            min_snr_gamma=self.loss_options.min_snr_gamma,
        )
        if not torch.isfinite(loss):
            keys = batch.get("key", [])[:4]
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at optimizer step {self.global_step}, batch {batch_idx} "
                f"(sample keys {keys}); "
                "training stopped before this update, the last checkpoint and an on-exception checkpoint are kept in "
                "the run's checkpoints folder"
            )
        self.log("train/loss", loss.detach(), batch_size=z.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=z.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update: inside the step, so a checkpoint written at the batch's end (by
        any callback) holds the EMA of the weights it holds (exact resume)."""
        super().optimizer_step(*args, **kwargs)
        if self.unet_ema is not None and self.conditioning_ema is not None:
            self.unet_ema.update(self.unet)
            self.conditioning_ema.update(self.arm.conditioning)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Loss of the EMA model at 10 fixed timesteps with fixed noise (comparable across runs and steps)."""
        unet, arm = self.eval_modules()
        z = self.latents(batch)
        cond = arm.condition(batch, self.text_encoder)
        extra = self.image_condition(batch, z, train=False)
        gen = torch.Generator(device=z.device).manual_seed(self.validation_options.seed + batch_idx)
        losses, prediction, denoiser = [], self.loss_options.prediction, self.denoiser(unet, cond, extra)
        for t in torch.linspace(0, self.schedule.num_steps - 1, 10).long():
            tt = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
            losses.append(diffusion_loss(denoiser, z, self.schedule, prediction, generator=gen, t=tt))
        self.log("val/loss", torch.stack(losses).mean(), batch_size=z.shape[0], prog_bar=True)

    @override
    def on_validation_epoch_end(self) -> None:
        prompts = list(self.validation_options.prompts)
        if not prompts or self.text_encoder is None or self.trainer.sanity_checking or not self.arm.can_sample:
            return
        if not self.trainer.is_global_zero:  # one grid per validation, from rank 0 (no collectives in sampling)
            return
        res = int(self.validation_options.resolution or 0)
        if not res:
            return
        seeds = [self.validation_options.seed + i for i in range(len(prompts))]
        images = self.generator().generate(self.validation_options.sampling, prompts, seeds, res)
        grid = torchvision.utils.make_grid(images, nrow=min(8, len(prompts)), padding=1)
        log_image(self.loggers, grid, "val/samples", int(self.global_step), self.validation_options.image_dir)
