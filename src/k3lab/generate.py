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
from k3lab.conditioning import ConditioningArm, PriorArm, TextArm, make_arm
from k3lab.diffusion import Schedule, cfg_denoiser, get_sampler, to_epsilon
from k3lab.nn.first_stage import LatentScale
from k3lab.nn.text_encoder import frozen_text_encoder

log = logging.getLogger(__name__)


def check_resolution(resolution: int, first_stage: nn.Module, unet: nn.Module) -> int:
    """The latent size for ``resolution``; a clear error when it is not divisible by first-stage x U-Net factors."""
    factor = int(getattr(first_stage, "downsample_factor", 1)) * int(unet.downsample_factor)
    if resolution <= 0 or resolution % factor:
        raise ValueError(
            f"resolution {resolution} is not divisible by {factor} (= first-stage factor "
            f"{getattr(first_stage, 'downsample_factor', 1)} "
            f"x U-Net factor {unet.downsample_factor}); use e.g. {max(factor, round(resolution / factor) * factor)}"
        )
    return resolution // int(getattr(first_stage, "downsample_factor", 1))


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

    def model_fn(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor,
        time_extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.unet(x, t, context, mask, time_extra)
        return (
            to_epsilon(self.prediction, out, x, self.schedule.alpha_bar(t, x)) if self.prediction != "epsilon" else out
        )

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
        resolution: int,
        sampler: str = "kandinsky3",
        steps: int = 50,
        guidance_weight: float = 3.0,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        **sampler_options: object,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from ``encode``'s condition; sample i starts from ``manual_seed(seeds[i])``
        noise."""
        if cond[0].shape[0] != len(seeds):
            raise ValueError(f"{cond[0].shape[0]} prompts but {len(seeds)} seeds")
        size = check_resolution(resolution, self.first_stage, self.unet)
        shape = (self.unet.in_channels, size, size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
            self.device
        )
        sample_fn = get_sampler(sampler)
        if "x0_threshold" in inspect.signature(sample_fn).parameters:
            sampler_options.setdefault("x0_threshold", self.x0_threshold)
        with self._placed(self.unet, self.arm):
            denoise = cfg_denoiser(self.model_fn, cond, self.null(cond), guidance_weight)
            gen = torch.Generator(device=self.device).manual_seed(int(seeds[0]) + 1) if len(seeds) else None
            z = sample_fn(denoise, noise, self.schedule, steps, generator=gen, callback=callback, **sampler_options)
        with self._placed(self.first_stage):
            images = self.first_stage.decode(z / self.latent_scale)
        return ((images.float() + 1) / 2).clamp(0, 1)

    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        resolution: int,
        sampler: str = "kandinsky3",
        steps: int = 50,
        guidance_weight: float = 3.0,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        **sampler_options: object,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] for ``prompts``."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        check_resolution(resolution, self.first_stage, self.unet)
        return self.sample(
            self.encode(prompts, seeds), seeds, resolution, sampler, steps, guidance_weight, callback, **sampler_options
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
