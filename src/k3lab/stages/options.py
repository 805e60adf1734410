"""The diffusion stage's option groups: typed, documented, each a ``stage.<group>`` node in ``conf/stage``.

A group is given as its dataclass, a mapping (a Hydra node) or None (its defaults); an unknown key is an error that
names it and the known ones. Runs saved before the groups existed wrote the same options as flat ``stage.*`` keys:
:data:`k3lab.io.checkpoint.MOVED_STAGE_KEYS` maps them here when such a run's config is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from k3lab.diffusion.settings import DEFAULT_SAMPLING, SamplingSettings
from k3lab.io.options import group_of

__all__ = [
    "SWITCH_VALUES",
    "ConditioningOptions",
    "LossOptions",
    "OptimOptions",
    "ValidationOptions",
    "as_hparams",
    "group_of",
]

SWITCH_VALUES = (True, False, "auto")


@dataclass(frozen=True)
class OptimOptions:
    """Learning-rate schedule and update rules around the optimizer (``stage.optim``)."""

    warmup_steps: int = 1000  # linear learning-rate warm-up (optimizer steps)
    lr_decay_steps: int | None = None  # cosine decay of the learning rate to ``lr_final`` at this step (None: none)
    lr_final: float = 0.0  # the decay ends at this fraction of the learning rate
    grad_clip: float | None = 1.0  # global gradient-norm clip (None: off)
    fused: bool | str = "auto"  # the optimizer's fused kernel (AdamW/Adam); auto = on a CUDA device

    def __post_init__(self) -> None:
        if int(self.warmup_steps) < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be >= 0")
        if self.lr_decay_steps is not None and int(self.lr_decay_steps) < 1:
            raise ValueError(f"lr_decay_steps={self.lr_decay_steps}: a step >= 1, or null for no decay")
        if not 0.0 <= float(self.lr_final) <= 1.0:
            raise ValueError(f"lr_final={self.lr_final}: a fraction of the learning rate in [0, 1]")
        if self.fused not in SWITCH_VALUES:
            raise ValueError(f"fused={self.fused!r}: use true, false or auto")


@dataclass(frozen=True)
class LossOptions:
    """What the U-Net is trained to predict, on which noise schedule, with which weighting (``stage.loss``)."""

    schedule: str = "cosine"  # the noise schedule (k3lab.diffusion.Schedule.named)
    num_timesteps: int = 1000
    prediction: str = "epsilon"  # epsilon | v
    min_snr_gamma: float | None = None  # Min-SNR-gamma weighting (arXiv 2303.09556), e.g. 5; None = the simple loss
    noise_seed: int | None = None  # common random numbers: step s draws t, noise and dropout from (seed, s, rank)

    def __post_init__(self) -> None:
        if self.prediction not in ("epsilon", "v"):
            raise ValueError(f"prediction={self.prediction!r}: use epsilon or v")
        if int(self.num_timesteps) < 2:
            raise ValueError(f"num_timesteps={self.num_timesteps}: must be >= 2")
        if self.min_snr_gamma is not None and float(self.min_snr_gamma) <= 0:
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma}: a positive number, or null for the simple loss")


@dataclass(frozen=True)
class ConditioningOptions:
    """How captions reach the U-Net during training (``stage.conditioning``)."""

    dropout: float = 0.1  # p of training a caption as the null embedding (for classifier-free guidance)
    diffusers_compat: bool = False  # text conditioning as diffusers does it (see TextConditioning)
    image_tokens: int = 10  # mapping-prior arm: context tokens made from the image embedding

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout={self.dropout}: must be in [0, 1)")
        if int(self.image_tokens) < 1:
            raise ValueError(f"image_tokens={self.image_tokens}: must be >= 1")


@dataclass(frozen=True)
class ValidationOptions:
    """What validation measures and samples (``stage.validation``); ``sampling`` is the run's sampling group."""

    prompts: tuple[str, ...] = ()  # sampled into a grid after each validation (empty: no grid)
    seed: int = 0  # fixed noise for the validation loss and the grid
    resolution: int | None = None  # image size of the grid (checked against the model's factors up front)
    image_dir: str | None = None  # where grids are written (besides the loggers)
    sampling: SamplingSettings = field(default_factory=lambda: DEFAULT_SAMPLING)

    def __post_init__(self) -> None:
        prompts = self.prompts
        if isinstance(prompts, str) or not all(isinstance(p, (str, int, float)) for p in prompts):
            raise ValueError(f"prompts={prompts!r}: a list of strings (quote prompts that contain ': ')")
        object.__setattr__(self, "prompts", tuple(str(p) for p in prompts))
        if not isinstance(self.sampling, SamplingSettings):
            object.__setattr__(self, "sampling", SamplingSettings.from_config(self.sampling))


def as_hparams(group: Any) -> dict[str, Any]:
    """An option group as plain values (the checkpoint's hyperparameters load with ``weights_only=True``)."""
    values = asdict(group)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
