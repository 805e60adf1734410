"""Text-to-image generation from parts (U-Net, text conditioning, text encoder, first stage): used by the
diffusion stage's validation and by ``python -m k3lab.sample``. No LightningModule in here."""

from __future__ import annotations

import gc
import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from k3lab.checkpoint import CheckpointError
from k3lab.diffusion import Schedule, cfg_denoiser, get_sampler, to_epsilon
from k3lab.mapping import PriorMapping
from k3lab.nn.first_stage import LatentScale
from k3lab.nn.text_conditioning import TextConditioning

log = logging.getLogger(__name__)


def check_resolution(resolution: int, first_stage: nn.Module, unet: nn.Module) -> int:
    """The latent size for ``resolution``; a clear error when it is not divisible by first-stage x U-Net factors."""
    factor = int(getattr(first_stage, "downsample_factor", 1)) * int(unet.downsample_factor)
    if resolution <= 0 or resolution % factor:
        raise ValueError(
            f"resolution {resolution} is not divisible by {factor} (= first-stage factor {getattr(first_stage, 'downsample_factor', 1)} "
            f"x U-Net factor {unet.downsample_factor}); use e.g. {max(factor, round(resolution / factor) * factor)}"
        )
    return resolution // int(getattr(first_stage, "downsample_factor", 1))


def encode_prompts(text_encoder: nn.Module, conditioning: TextConditioning, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected context and mask; empty prompts become the unconditional (null) context, with a warning."""
    empty = torch.tensor([not p.strip() for p in prompts])
    if bool(empty.any()):
        log.warning("%d empty prompt(s): sampled unconditionally (null text embedding)", int(empty.sum()))
    hidden, mask = text_encoder.encode([p.strip() for p in prompts])
    device = conditioning.null_embedding.device
    context, mask = conditioning(hidden.to(device), mask.to(device))
    return conditioning.replace_with_null(context, mask, empty.to(device))


@dataclass
class Generator:
    """Everything needed to turn prompts into images (all modules in eval mode).

    Memory options for large models: ``sequential=True`` keeps every module on the CPU and moves each one to
    ``device`` only while it runs (text encoder, then U-Net, then MoVQ); ``free_text_encoder()`` drops the
    encoder once every prompt is encoded (``encode`` first, then ``sample``).
    """

    unet: nn.Module
    conditioning: TextConditioning | None           # text arm: Kandinsky 3's projection + null embedding
    text_encoder: nn.Module | None
    first_stage: nn.Module
    schedule: Schedule
    prediction: str = "epsilon"
    latent_scale: float = 1.0
    device: str = "cpu"
    sequential: bool = False
    image_conditioning: nn.Module | None = None     # mapping-prior arm: CLIP image embedding -> U-Net inputs
    mapping: PriorMapping | None = None             # mapping-prior arm: text -> sampled image embedding
    x0_threshold: float | None = 0.99               # samplers' dynamic thresholding (None: off), see stage.x0_threshold

    def _conditioning_modules(self) -> list[nn.Module]:
        parts = [self.conditioning, self.image_conditioning, self.mapping.prior if self.mapping is not None else None]
        return [m for m in parts if m is not None]

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

    def model_fn(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor, time_extra: torch.Tensor | None = None) -> torch.Tensor:
        out = self.unet(x, t, context, mask, time_extra)
        return to_epsilon(self.prediction, out, x, self.schedule.alpha_bar(t, x)) if self.prediction != "epsilon" else out

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
        """The U-Net's condition for ``prompts`` (on ``device``): (context, mask) in the text arm; (context, mask,
        time_extra) in the mapping-prior arm, where the prior samples an image embedding per prompt (seeded)."""
        if self.text_encoder is None:
            raise RuntimeError("the text encoder was freed: encode every prompt before free_text_encoder()")
        with self._placed(self.text_encoder, *self._conditioning_modules()):
            if self.mapping is None:
                assert self.conditioning is not None
                cond: tuple[torch.Tensor, ...] = encode_prompts(self.text_encoder, self.conditioning, prompts)
            else:
                assert self.image_conditioning is not None
                hidden, mask = self.text_encoder.encode([p.strip() for p in prompts])
                device = next(self.mapping.prior.parameters()).device
                emb = self.mapping.sample(hidden.to(device), mask.to(device), list(seeds if seeds is not None else range(len(prompts))))
                cond = self.image_conditioning(emb)
        return tuple(c.to(self.device) for c in cond)

    def null(self, cond: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The unconditional condition with the shapes of ``cond``."""
        if self.mapping is None:
            assert self.conditioning is not None
            return self.conditioning.null(*cond)
        assert self.image_conditioning is not None
        negative = self.image_conditioning.negative.expand(cond[0].shape[0], -1)
        return self.image_conditioning(negative)

    def free_text_encoder(self) -> None:
        """Drop the text encoder (Flan-UL2 is 17 GB in bf16) once all prompts are encoded."""
        self.text_encoder = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def sample(
        self, cond: tuple[torch.Tensor, ...], seeds: Sequence[int], resolution: int, sampler: str = "kandinsky3", steps: int = 50,
        guidance_weight: float = 3.0, callback: Callable[[int, int, torch.Tensor], None] | None = None, **sampler_options: object,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from ``encode``'s condition; sample i starts from ``manual_seed(seeds[i])`` noise."""
        if cond[0].shape[0] != len(seeds):
            raise ValueError(f"{cond[0].shape[0]} prompts but {len(seeds)} seeds")
        size = check_resolution(resolution, self.first_stage, self.unet)
        shape = (self.unet.in_channels, size, size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(self.device)
        sample_fn = get_sampler(sampler)
        if "x0_threshold" in inspect.signature(sample_fn).parameters:
            sampler_options.setdefault("x0_threshold", self.x0_threshold)
        with self._placed(self.unet, *self._conditioning_modules()):
            denoise = cfg_denoiser(self.model_fn, cond, self.null(cond), guidance_weight)
            gen = torch.Generator(device=self.device).manual_seed(int(seeds[0]) + 1) if len(seeds) else None
            z = sample_fn(denoise, noise, self.schedule, steps, generator=gen, callback=callback, **sampler_options)
        with self._placed(self.first_stage):
            images = self.first_stage.decode(z / self.latent_scale)
        return ((images.float() + 1) / 2).clamp(0, 1)

    def __call__(
        self, prompts: Sequence[str], seeds: Sequence[int], resolution: int, sampler: str = "kandinsky3", steps: int = 50,
        guidance_weight: float = 3.0, callback: Callable[[int, int, torch.Tensor], None] | None = None, **sampler_options: object,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] for ``prompts``."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        check_resolution(resolution, self.first_stage, self.unet)
        return self.sample(self.encode(prompts, seeds), seeds, resolution, sampler, steps, guidance_weight, callback, **sampler_options)


def _part_state(path: Path, part: str) -> dict[str, torch.Tensor]:
    """``part``'s weights from an exported ``<part>.safetensors`` beside ``path``, or from a Lightning ``.ckpt``."""
    from k3lab.checkpoint import _select_prefix, load_state_dict

    if path.suffix == ".ckpt":
        state = load_state_dict(path)
        sub = _select_prefix(state, part)
        if sub is state:
            raise CheckpointError(f"{path}: has no '{part}' weights")
        return sub
    return load_state_dict(path.parent / f"{part}.safetensors")


def load_generator(checkpoint: str | Path, device: str = "cpu", text_encoder_path: str | None = None, unet_preset: str | None = None,
                   sequential: bool = False, text_encoder_dtype: str | None = None) -> tuple[Generator, dict]:
    """Rebuild a :class:`Generator` from a diffusion run: its checkpoints folder, an exported ``unet.safetensors``
    in it, or a Lightning ``.ckpt`` in it (EMA weights when kept). Returns it with the run's saved config.
    ``unet_preset`` (e.g. 'kandinsky3') asserts which U-Net preset the checkpoint must hold."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from k3lab.checkpoint import check_stage, describe, load_weights

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "unet.safetensors"
    cfg = check_stage(path, "diffusion")
    found = (cfg.get("choices") or {}).get("model/unet")
    if unet_preset and found and found != unet_preset:
        raise CheckpointError(f"{path}: holds the model/unet={found} preset, not model/unet={unet_preset} ({describe(cfg)})")
    unet = instantiate(cfg.model.unet)
    try:
        load_weights(unet, _part_state(path, "unet"), path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n(the config beside it describes the {describe(cfg)})") from e
    schedule = Schedule.named(str(cfg.stage.schedule), int(cfg.stage.num_timesteps))
    conditioning: TextConditioning | None = None
    image_conditioning, mapping = None, None
    if OmegaConf.select(cfg, "stage.clip") is None:
        conditioning = TextConditioning(int(cfg.stage.encoder_dim), unet.context_dim, bool(cfg.stage.get("diffusers_compat", False)))
        load_weights(conditioning, _part_state(path, "text_conditioning"), path)
    else:  # the mapping-prior arm: text -> prior -> CLIP image embedding -> adapter -> U-Net
        from k3lab.nn.image_conditioning import ImageConditioning

        if OmegaConf.select(cfg, "stage.prior") is None:
            raise CheckpointError(f"{path}: a mapping-prior run without a trained prior (mapping.prior): it cannot sample from text")
        clip, prior = instantiate(cfg.stage.clip), instantiate(cfg.stage.prior)
        image_conditioning = ImageConditioning(int(clip.embed_dim), unet.context_dim, unet.time_embed_dim, int(cfg.stage.image_tokens))
        load_weights(image_conditioning, _part_state(path, "image_conditioning"), path)
        if int(prior.embedding_dim) != image_conditioning.clip_dim:
            raise CheckpointError(f"the prior predicts {prior.embedding_dim}-d embeddings but the U-Net adapter of {path} takes {image_conditioning.clip_dim}-d ones")
        mapping = PriorMapping(prior.to("cpu" if sequential else device).eval(), schedule, int(cfg.stage.prior_steps), float(cfg.stage.prior_guidance))
    scale = LatentScale()
    load_weights(scale, _part_state(path, "latent_scale"), path)
    if not scale.measured():
        raise CheckpointError(f"{path}: its latent scale was never measured (the run stopped before its first batch)")
    encoder_cfg = cfg.model.text_encoder.encoder
    if text_encoder_path:
        encoder_cfg.path = text_encoder_path
    if text_encoder_dtype:
        encoder_cfg.dtype = text_encoder_dtype
    text_encoder = instantiate(encoder_cfg)
    first_stage = instantiate(cfg.stage.first_stage)
    for m in (unet, conditioning, image_conditioning, text_encoder, first_stage):
        if m is not None:
            m.to("cpu" if sequential else device).eval()
    generator = Generator(unet, conditioning, text_encoder, first_stage, schedule, str(cfg.stage.prediction), float(scale.value), device, sequential,
                          image_conditioning, mapping, OmegaConf.select(cfg, "stage.x0_threshold", default=0.99))
    return generator, cfg
