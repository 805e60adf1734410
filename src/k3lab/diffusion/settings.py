"""How images are sampled, as one typed object: :class:`SamplingSettings` is built from ``conf/sampling`` and passed
whole to the generator, the ablation evaluation, the editing benchmark and ``python -m k3lab.sample``. Every default
is written here once; ``conf/sampling/default.yaml`` states the same values (a test keeps them equal)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class SamplingSettings:
    """Kandinsky 3's own sampling settings by default."""

    sampler: str = "kandinsky3"  # kandinsky3 | ddim | dpmpp_2m | diffusers_ddpm
    steps: int = 50
    guidance: float = 3.0  # w in eps = (w+1) eps_cond - w eps_uncond
    x0_threshold: float | None = 0.99  # dynamic thresholding quantile of x0 (floor 1); None = off
    negative_prompt: str | None = None  # replaces the empty prompt in the unconditional branch
    prior_steps: int = 25  # the mapping prior's own sampler (prior arm only)
    prior_guidance: float = 3.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.prior_steps < 1:
            raise ValueError(f"sampling.steps={self.steps}, sampling.prior_steps={self.prior_steps}: must be >= 1")
        if self.x0_threshold is not None and not 0.0 < self.x0_threshold <= 1.0:
            raise ValueError(f"sampling.x0_threshold={self.x0_threshold}: a quantile in (0, 1], or null for off")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> SamplingSettings:
        """From a ``sampling`` config node (a DictConfig or a dict); missing keys keep their defaults, unknown keys
        are an error that names them."""
        if node is None:
            return cls()
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(node) - set(known))
        if unknown:
            raise ValueError(f"sampling: unknown keys {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key in node:
            value = node[key]
            if value is None:
                values[key] = None
            elif key in ("steps", "prior_steps"):
                values[key] = int(value)
            elif key in ("guidance", "prior_guidance", "x0_threshold"):
                values[key] = float(value)
            else:
                values[key] = str(value)
        return cls(**values)

    @classmethod
    def of_run(cls, cfg: Any) -> SamplingSettings:
        """A saved run's settings: its ``sampling`` group, or (runs older than the group) its stage's validation
        settings."""
        sampling = cfg.get("sampling") if hasattr(cfg, "get") else None
        if sampling is not None:
            return cls.from_config(sampling)
        stage = cfg.get("stage") or {}
        old = {"sampler": "sampler", "steps": "sample_steps", "guidance": "guidance_weight"}
        old |= {"x0_threshold": "x0_threshold", "prior_steps": "prior_steps", "prior_guidance": "prior_guidance"}
        return cls.from_config({new: stage[key] for new, key in old.items() if key in stage})

    def updated(self, **overrides: Any) -> SamplingSettings:
        """A copy with the overrides that are not None (command-line flags left unset keep the run's value)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for JSON reports and MLflow params."""
        return asdict(self)


DEFAULT_SAMPLING = SamplingSettings()
