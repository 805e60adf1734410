"""Text-to-image generation from parts (U-Net, conditioning arm, text encoder, first stage): used by the
diffusion stage's validation and by ``python -m k3lab.sample``. No LightningModule in here."""

from __future__ import annotations

import gc
import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from k3lab.diffusion import Schedule, cfg_denoiser, get_sampler, to_epsilon
from k3lab.diffusion.samplers import timesteps_for
from k3lab.diffusion.settings import DEFAULT_SAMPLING, SamplingSettings
from k3lab.inference.conditioning import ConditioningArm, match_lengths
from k3lab.inference.editing import (
    BLENDS,
    binarize,
    img2img_first_step,
    inpainting_channels,
    is_inpainting,
    latent_keep,
    masked_image,
    paste_back,
    unet_input,
)
from k3lab.nn.first_stage import FirstStage
from k3lab.nn.text_encoder import TextEncoderModule
from k3lab.nn.unet import KandinskyUNet

log = logging.getLogger(__name__)


def check_resolution(resolution: int | Sequence[int], first_stage: FirstStage, unet: KandinskyUNet) -> int:
    """The latent size for ``resolution`` (one side, or the first of (height, width)); a clear error when a side is not
    divisible by first-stage x U-Net factors."""
    return latent_size(resolution, first_stage, unet)[0]


def latent_size(resolution: int | Sequence[int], first_stage: FirstStage, unet: KandinskyUNet) -> tuple[int, int]:
    """(h, w) of the latent grid for an image of ``resolution`` (a side, or (height, width)); a clear error when a
    side is not divisible by first-stage x U-Net factors."""
    first = int(first_stage.downsample_factor)
    factor = first * int(unet.downsample_factor)
    sides = (int(resolution), int(resolution)) if isinstance(resolution, (int, float)) else tuple(map(int, resolution))
    for side in sides:
        if side <= 0 or side % factor:
            raise ValueError(
                f"resolution {side} is not divisible by {factor} (= first-stage factor {first} "
                f"x U-Net factor {unet.downsample_factor}); use e.g. {max(factor, round(side / factor) * factor)}"
            )
    return sides[0] // first, sides[1] // first


@dataclass
class Generator:
    """Everything needed to turn prompts into images (all modules in eval mode): the U-Net, a conditioning arm
    (:mod:`k3lab.inference.conditioning`: text, or the mapping prior), the text encoder and the first stage.

    Memory options for large models: ``sequential=True`` keeps every module on the CPU and moves each one to
    ``device`` only while it runs (text encoder, then U-Net, then MoVQ); ``free_text_encoder()`` drops the
    encoder once every prompt is encoded (``encode`` first, then ``sample``).
    """

    unet: KandinskyUNet
    arm: ConditioningArm
    text_encoder: TextEncoderModule | None
    first_stage: FirstStage
    schedule: Schedule
    prediction: str = "epsilon"
    latent_scale: float = 1.0
    device: str = "cpu"
    sequential: bool = False
    x0_threshold: float | None = (
        DEFAULT_SAMPLING.x0_threshold
    )  # samplers' dynamic thresholding (None: off), see stage.x0_threshold
    unet_dtype: str = "float32"  # "bfloat16"/"float16": the U-Net runs under torch.autocast (the fast GPU path)

    def compile_unet(self, mode: str | None = None) -> None:
        """Regional ``torch.compile``: each residual and attention block compiled on its own (short compiles; the
        identical blocks reuse one graph). ``mode="reduce-overhead"`` adds CUDA graphs on a GPU."""
        from k3lab.nn.sharding import compile_blocks

        compile_blocks(self.unet, mode)

    @classmethod
    def from_stage(cls, stage: Any) -> Generator:
        """The generator of a diffusion stage: its EMA weights when kept, its own arm, encoders and schedule."""
        unet, arm = stage.eval_modules()
        if stage.text_encoder is None:
            raise RuntimeError("sampling needs a text encoder (this stage was built for precomputed embeddings)")
        generator = cls(
            unet,
            arm,
            stage.text_encoder,
            stage.first_stage,
            stage.schedule,
            str(stage.loss_options.prediction),
            float(stage.latent_scale.value),
            str(stage.device),
            x0_threshold=stage.validation_options.sampling.x0_threshold,
        )
        half = sorted({str(p.dtype) for p in unet.parameters()} & {"torch.bfloat16", "torch.float16"})
        if half:  # a LoRA fine-tune's base stored at half size (stage.lora.base_dtype) samples under autocast
            generator.unet_dtype = half[0].removeprefix("torch.")
        return generator

    @contextmanager
    def _placed(self, *modules: nn.Module) -> Iterator[None]:
        if not self.sequential:
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @property
    def inpainting(self) -> bool:
        """Whether the U-Net is an inpainting one (9 input channels: x_t, keep mask, masked latent)."""
        return is_inpainting(self.unet)

    def model_fn(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """eps for x_t; ``cond`` is the arm's condition, followed by the inpainting channels for an inpainting U-Net."""
        with torch.autocast(
            torch.device(self.device).type, getattr(torch, self.unet_dtype), enabled=self.unet_dtype != "float32"
        ):
            if self.inpainting:
                *cond, extra = cond  # type: ignore[assignment]
                out = self.unet(unet_input(x, extra), t, *cond)
            else:
                out = self.unet(x, t, *cond)
        out = out.float()
        return (
            to_epsilon(self.prediction, out, x, self.schedule.alpha_bar(t, x)) if self.prediction != "epsilon" else out
        )

    def latent(self, image: torch.Tensor) -> torch.Tensor:
        """The scaled first-stage latent of images [B, 3, H, W] in [-1, 1] (what the U-Net sees)."""
        with self._placed(self.first_stage):
            return self.first_stage.encode(image.to(self.device)).float() * self.latent_scale

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
        """The U-Net's condition for ``prompts`` (on ``device``), from the arm: (context, mask) in the text arm;
        (context, mask, time_extra) in the mapping-prior arm, where the prior samples an embedding per prompt
        (seeded)."""
        if self.text_encoder is None:
            raise RuntimeError("the text encoder was freed: encode every prompt before free_text_encoder()")
        with self._placed(self.text_encoder, self.arm):
            cond = self.arm.encode(
                self.text_encoder, prompts, list(seeds if seeds is not None else range(len(prompts)))
            )
        return tuple(c.to(self.device) for c in cond)

    def null(self, cond: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The unconditional condition with the shapes of ``cond``."""
        return self.arm.null(cond)

    def free_text_encoder(self) -> None:
        """Drop the text encoder (Flan-UL2 is 17 GB in bf16) once all prompts are encoded."""
        self.text_encoder = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def sample(
        self,
        cond: tuple[torch.Tensor, ...],
        seeds: Sequence[int],
        resolution: int | Sequence[int],
        sampler: str = DEFAULT_SAMPLING.sampler,
        steps: int = DEFAULT_SAMPLING.steps,
        guidance_weight: float = DEFAULT_SAMPLING.guidance,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        *,
        negative: tuple[torch.Tensor, ...] | None = None,
        image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        strength: float = 1.0,
        blend: str = "pixel",
        **sampler_options: object,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from ``encode``'s condition; sample i starts from ``manual_seed(seeds[i])``
        noise. ``resolution`` is a side or (height, width).

        Editing (:mod:`k3lab.inference.editing`): ``negative`` (``encode`` of negative prompts) replaces the
        unconditional branch of guidance. ``image`` [B, 3, H, W] in [-1, 1] with ``mask`` (1 = regenerate) inpaints
        with an inpainting U-Net, the kept pixels pasted back (``blend``: pixel, latent or none); ``image`` with
        ``strength`` < 1 is image-to-image: the sampler starts from the input's latent noised to the matching step
        (strength 0 returns its reconstruction, strength 1 is text-to-image from the same noise)."""
        if cond[0].shape[0] != len(seeds):
            raise ValueError(f"{cond[0].shape[0]} prompts but {len(seeds)} seeds")
        if self.unet_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unet_dtype={self.unet_dtype!r}: use float32, bfloat16 or float16")
        if blend not in BLENDS:
            raise ValueError(f"blend={blend!r}: use one of {list(BLENDS)}")
        if image is not None:
            resolution = tuple(image.shape[-2:])
            if image.shape[0] != len(seeds):
                raise ValueError(f"{image.shape[0]} images but {len(seeds)} seeds")
        size = latent_size(resolution, self.first_stage, self.unet)
        if mask is not None:
            if image is None:
                raise ValueError("a mask needs the image it applies to")
            if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
                raise ValueError(
                    f"mask size {tuple(mask.shape[-2:])} differs from image size {tuple(image.shape[-2:])}"
                )
            if not self.inpainting:
                raise ValueError(
                    "inpainting needs an inpainting U-Net (in_channels = 2 x latent + 1 = "
                    f"{2 * self.unet.out_channels + 1}); this one reads {self.unet.in_channels} channels (train "
                    "stage=inpainting, or convert with --inpainting)"
                )
            mask = binarize(mask).to(self.device)
        shape = (self.unet.out_channels, *size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
            self.device
        )
        uncond = self.null(cond) if negative is None else negative
        if guidance_weight != 0:  # (without guidance the unconditional branch is never run)
            cond, uncond = match_lengths(cond, uncond)
        if self.inpainting:  # no mask: everything is generated (the image, if any, only seeds image-to-image)
            factor = int(self.first_stage.downsample_factor)
            pixels = (size[0] * factor, size[1] * factor)
            hole = mask if mask is not None else torch.ones(len(seeds), 1, *pixels, device=self.device)
            blank = torch.zeros(len(seeds), 3, *pixels, device=self.device)
            source = image.to(self.device) if image is not None else blank
            extra = inpainting_channels(latent_keep(hole, size), self.latent(masked_image(source, hole)))
            cond, uncond = cond + (extra,), uncond + (extra,)
        sample_fn = get_sampler(sampler)
        threshold = sampler_options.pop("x0_threshold", self.x0_threshold)  # the call's, else the generator's
        if "x0_threshold" in inspect.signature(sample_fn).parameters:
            sampler_options["x0_threshold"] = threshold
        first = 0
        if image is not None and strength < 1.0:
            first = img2img_first_step(steps, strength)
            z_image = self.latent(image)
            if first < steps:
                t0 = timesteps_for(sampler, self.schedule.num_steps, steps)[first]
                noise = self.schedule.q_sample(z_image, torch.full((len(seeds),), t0, device=self.device), noise)
        if first >= steps:
            z = z_image
        else:
            with self._placed(self.unet, self.arm):
                denoise = cfg_denoiser(self.model_fn, cond, uncond, guidance_weight)
                gen = torch.Generator(device=self.device).manual_seed(int(seeds[0]) + 1) if len(seeds) else None
                z = sample_fn(
                    denoise,
                    noise,
                    self.schedule,
                    steps,
                    generator=gen,
                    callback=callback,
                    first_step=first,
                    **sampler_options,
                )
        if mask is not None and image is not None and blend == "latent":  # (a mask always comes with its image)
            z = torch.where(latent_keep(mask, size).bool().expand_as(z), self.latent(image), z)
        with self._placed(self.first_stage):
            images = ((self.first_stage.decode(z / self.latent_scale).float() + 1) / 2).clamp(0, 1)
        if mask is not None and image is not None and blend == "pixel":
            images = paste_back((image.to(images.device).float() + 1) / 2, images, mask)
        return images

    def sample_with(
        self,
        settings: SamplingSettings,
        cond: tuple[torch.Tensor, ...],
        seeds: Sequence[int],
        resolution: int | Sequence[int],
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """:meth:`sample` with the sampling settings passed whole (sampler, steps, guidance and x0 threshold; the
        negative prompt is encoded by the caller, which knows the batch)."""
        return self.sample(
            cond,
            seeds,
            resolution,
            settings.sampler,
            settings.steps,
            settings.guidance,
            callback,
            x0_threshold=settings.x0_threshold,
            **options,
        )

    def generate(
        self,
        settings: SamplingSettings,
        prompts: Sequence[str],
        seeds: Sequence[int],
        resolution: int | Sequence[int],
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Images for ``prompts`` under ``settings`` (its negative prompt, when set, for every image)."""
        negatives = None if settings.negative_prompt is None else [settings.negative_prompt] * len(prompts)
        return self(
            prompts,
            seeds,
            resolution,
            settings.sampler,
            settings.steps,
            settings.guidance,
            callback,
            negative_prompts=negatives,
            x0_threshold=settings.x0_threshold,
            **options,
        )

    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        resolution: int | Sequence[int],
        sampler: str = DEFAULT_SAMPLING.sampler,
        steps: int = DEFAULT_SAMPLING.steps,
        guidance_weight: float = DEFAULT_SAMPLING.guidance,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        *,
        negative_prompts: Sequence[str] | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] for ``prompts`` (``options``: :meth:`sample`'s editing and sampler options)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if negative_prompts is not None:
            if len(negative_prompts) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
            options["negative"] = self.encode(negative_prompts, seeds)
        return self.sample(
            self.encode(prompts, seeds), seeds, resolution, sampler, steps, guidance_weight, callback, **options
        )
