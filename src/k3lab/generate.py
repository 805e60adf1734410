"""Text-to-image generation from parts (U-Net, conditioning arm, text encoder, first stage): used by the
diffusion stage's validation and by ``python -m k3lab.sample``. No LightningModule in here."""

from __future__ import annotations

import gc
import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from k3lab.checkpoint import CheckpointError
from k3lab.conditioning import ConditioningArm, PriorArm, TextArm, make_arm, match_lengths
from k3lab.diffusion import Schedule, cfg_denoiser, get_sampler, to_epsilon
from k3lab.diffusion.samplers import timesteps_for
from k3lab.editing import (
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
from k3lab.nn.first_stage import LatentScale
from k3lab.nn.text_encoder import frozen_text_encoder

log = logging.getLogger(__name__)


def check_resolution(resolution: int | Sequence[int], first_stage: nn.Module, unet: nn.Module) -> int:
    """The latent size for ``resolution`` (one side, or the first of (height, width)); a clear error when a side is not
    divisible by first-stage x U-Net factors."""
    return latent_size(resolution, first_stage, unet)[0]


def latent_size(resolution: int | Sequence[int], first_stage: nn.Module, unet: nn.Module) -> tuple[int, int]:
    """(h, w) of the latent grid for an image of ``resolution`` (a side, or (height, width)); a clear error when a
    side is not divisible by first-stage x U-Net factors."""
    first = int(getattr(first_stage, "downsample_factor", 1))
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
    (:mod:`k3lab.conditioning`: text, or the mapping prior), the text encoder and the first stage.

    Memory options for large models: ``sequential=True`` keeps every module on the CPU and moves each one to
    ``device`` only while it runs (text encoder, then U-Net, then MoVQ); ``free_text_encoder()`` drops the
    encoder once every prompt is encoded (``encode`` first, then ``sample``).
    """

    unet: nn.Module
    arm: ConditioningArm
    text_encoder: nn.Module | None
    first_stage: nn.Module
    schedule: Schedule
    prediction: str = "epsilon"
    latent_scale: float = 1.0
    device: str = "cpu"
    sequential: bool = False
    x0_threshold: float | None = 0.99  # samplers' dynamic thresholding (None: off), see stage.x0_threshold
    unet_dtype: str = "float32"  # "bfloat16"/"float16": the U-Net runs under torch.autocast (the fast GPU path)

    def compile_unet(self, mode: str | None = None) -> None:
        """Regional ``torch.compile``: each residual and attention block compiled on its own (short compiles; the
        identical blocks reuse one graph). ``mode="reduce-overhead"`` adds CUDA graphs on a GPU."""
        from k3lab.distributed import compile_blocks

        compile_blocks(self.unet, mode)

    @classmethod
    def from_stage(cls, stage: Any) -> Generator:
        """The generator of a diffusion stage: its EMA weights when kept, its own arm, encoders and schedule."""
        unet, arm = stage.eval_modules()
        if stage.text_encoder is None:
            raise RuntimeError("sampling needs a text encoder (this stage was built for precomputed embeddings)")
        return cls(
            unet,
            arm,
            stage.text_encoder,
            stage.first_stage,
            stage.schedule,
            str(stage.hparams.prediction),
            float(stage.latent_scale.value),
            str(stage.device),
            x0_threshold=stage.hparams.x0_threshold,
        )

    @classmethod
    def from_export(
        cls,
        checkpoint: str | Path,
        device: str = "cpu",
        text_encoder_path: str | None = None,
        unet_preset: str | None = None,
        sequential: bool = False,
        text_encoder_dtype: str | None = None,
    ) -> tuple[Generator, DictConfig]:
        """Rebuild from a diffusion run: its checkpoints folder, an exported ``unet.safetensors`` in it, or a Lightning
        ``.ckpt`` in it (EMA weights when kept). Returns it with the run's saved config. The arm is built by the
        stage's own builder (:func:`~k3lab.conditioning.make_arm`). ``unet_preset`` (e.g. 'kandinsky3') asserts which
        U-Net preset the checkpoint must hold."""
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from k3lab.checkpoint import check_stage, describe, load_weights

        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(
                f"no such checkpoint: {checkpoint} (give a diffusion run's checkpoints folder, its unet.safetensors or "
                "a .ckpt)"
            )
        if path.is_dir():
            path = path / "unet.safetensors"
        cfg = check_stage(path, "diffusion")
        found = (cfg.get("choices") or {}).get("model/unet")
        if unet_preset and found and found != unet_preset:
            raise CheckpointError(
                f"{path}: holds the model/unet={found} preset, not model/unet={unet_preset} ({describe(cfg)})"
            )
        unet = instantiate(cfg.model.unet)
        try:
            load_weights(unet, _part_state(path, "unet"), path)
        except CheckpointError as e:
            raise CheckpointError(f"{e}\n(the config beside it describes the {describe(cfg)})") from e
        schedule = Schedule.named(str(cfg.stage.schedule), int(cfg.stage.num_timesteps))
        clip = instantiate(cfg.stage.clip) if OmegaConf.select(cfg, "stage.clip") is not None else None
        prior = instantiate(cfg.stage.prior) if OmegaConf.select(cfg, "stage.prior") is not None else None
        try:
            arm = make_arm(
                int(cfg.stage.encoder_dim),
                unet,
                schedule,
                diffusers_compat=bool(cfg.stage.get("diffusers_compat", False)),
                clip=clip,
                prior=prior,
                image_tokens=int(cfg.stage.get("image_tokens", 10)),
                prior_steps=int(cfg.stage.get("prior_steps", 25)),
                prior_guidance=float(cfg.stage.get("prior_guidance", 3.0)),
            )
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
        if not arm.can_sample:
            raise CheckpointError(
                f"{path}: a mapping-prior run without a trained prior (mapping.prior): it cannot sample from text"
            )
        load_weights(arm.conditioning, _part_state(path, arm.export_name), path)
        scale = LatentScale()
        load_weights(scale, _part_state(path, "latent_scale"), path)
        if not scale.measured():
            raise CheckpointError(
                f"{path}: its latent scale was never measured (the run stopped before its first batch)"
            )
        encoder = instantiate(encoder_config(cfg.model.text_encoder.encoder, text_encoder_path, text_encoder_dtype))
        text_encoder = frozen_text_encoder(encoder, int(cfg.stage.encoder_dim))
        first_stage = instantiate(cfg.stage.first_stage)
        for m in (unet, arm, text_encoder, first_stage):
            m.to("cpu" if sequential else device).eval()
        generator = cls(
            unet,
            arm,
            text_encoder,
            first_stage,
            schedule,
            str(cfg.stage.prediction),
            float(scale.value),
            device,
            sequential,
            OmegaConf.select(cfg, "stage.x0_threshold", default=0.99),
        )
        return generator, cfg

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
        sampler: str = "kandinsky3",
        steps: int = 50,
        guidance_weight: float = 3.0,
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

        Editing (:mod:`k3lab.editing`): ``negative`` (``encode`` of negative prompts) replaces the unconditional
        branch of guidance. ``image`` [B, 3, H, W] in [-1, 1] with ``mask`` (1 = regenerate) inpaints with an
        inpainting U-Net, the kept pixels pasted back (``blend``: pixel, latent or none); ``image`` with
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
            factor = int(getattr(self.first_stage, "downsample_factor", 1))
            pixels = (size[0] * factor, size[1] * factor)
            hole = mask if mask is not None else torch.ones(len(seeds), 1, *pixels, device=self.device)
            blank = torch.zeros(len(seeds), 3, *pixels, device=self.device)
            source = image.to(self.device) if image is not None else blank
            extra = inpainting_channels(latent_keep(hole, size), self.latent(masked_image(source, hole)))
            cond, uncond = cond + (extra,), uncond + (extra,)
        sample_fn = get_sampler(sampler)
        if "x0_threshold" in inspect.signature(sample_fn).parameters:
            sampler_options.setdefault("x0_threshold", self.x0_threshold)
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
        if mask is not None and blend == "latent":
            z = torch.where(latent_keep(mask, size).bool().expand_as(z), self.latent(image), z)
        with self._placed(self.first_stage):
            images = ((self.first_stage.decode(z / self.latent_scale).float() + 1) / 2).clamp(0, 1)
        if mask is not None and blend == "pixel":
            images = paste_back((image.to(images.device).float() + 1) / 2, images, mask)
        return images

    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        resolution: int | Sequence[int],
        sampler: str = "kandinsky3",
        steps: int = 50,
        guidance_weight: float = 3.0,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        *,
        negative_prompts: Sequence[str] | None = None,
        **options: object,
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


def encoder_config(node: DictConfig, path: str | None = None, dtype: str | None = None) -> DictConfig:
    """The run's text-encoder config with the user's overrides. ``path`` swaps in a generic Hugging Face encoder from
    that folder (whatever factory the run used, e.g. the packaged MiniLM); ``dtype`` is passed to any target."""
    from omegaconf import OmegaConf, open_dict

    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    if path:
        keep = {k: node[k] for k in ("dtype", "max_length", "family") if k in node}
        node = OmegaConf.create({"_target_": "k3lab.nn.text_encoder.TextEncoder", "path": str(path), **keep})
    if dtype:
        with open_dict(node):
            node.dtype = dtype
    return node


def _part_state(path: Path, part: str) -> dict[str, torch.Tensor]:
    """``part``'s weights from an exported ``<part>.safetensors`` beside ``path``, or from a Lightning ``.ckpt`` (the
    arm's trained module, exported as ``text_conditioning``/``image_conditioning``, is the stage's
    ``arm.conditioning``)."""
    from k3lab.checkpoint import _select_prefix, load_state_dict

    if path.suffix == ".ckpt":
        state = load_state_dict(path)
        arm_part = part in (TextArm.export_name, PriorArm.export_name)
        # the arm's module, EMA first; then the names older versions used
        prefixes = ("conditioning_ema.module.", "arm.conditioning.", f"{part}_ema.module.", f"{part}.")
        sub = _select_prefix(state, part, prefixes if arm_part else None)
        if sub is state:
            raise CheckpointError(f"{path}: has no '{part}' weights")
        return sub
    return load_state_dict(path.parent / f"{part}.safetensors")


def load_generator(
    checkpoint: str | Path,
    device: str = "cpu",
    text_encoder_path: str | None = None,
    unet_preset: str | None = None,
    sequential: bool = False,
    text_encoder_dtype: str | None = None,
) -> tuple[Generator, DictConfig]:
    """:meth:`Generator.from_export` (kept as a function for scripts and notebooks)."""
    return Generator.from_export(checkpoint, device, text_encoder_path, unet_preset, sequential, text_encoder_dtype)
