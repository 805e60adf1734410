"""``hydra/sweeper=fractional``: Hydra's basic sweeper (the Cartesian product of ``params``), keeping only the jobs
of a two-level half fraction (``fraction: {factors: [...], sign: -1}``; see :mod:`k3lab.ablation.design`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from k3lab.ablation.design import fraction_from

log = logging.getLogger(__name__)


class FractionalSweeper(BasicSweeper):
    """The basic sweeper over a half fraction of the swept two-level factors (the other swept keys crossed)."""

    def __init__(
        self, max_batch_size: int | None = None, params: dict[str, str] | None = None, fraction: Any = None
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        spec = OmegaConf.to_container(fraction) if OmegaConf.is_config(fraction) else fraction
        if spec is not None and not isinstance(spec, Mapping):
            raise ValueError(f"hydra.sweeper.fraction={spec!r}: a mapping {{factors, sign}} or null")
        self.fraction: Mapping[str, Any] | None = spec

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:  # type: ignore[override]
        """The basic sweeper's batches, less the jobs outside the fraction (batches re-cut to ``max_batch_size``)."""
        swept: dict[str, list[str] | None] = {}  # the last override of a key wins, as in the basic sweeper
        for o in overrides:
            discrete = o.is_sweep_override() and o.is_discrete_sweep()
            swept[o.get_key_element()] = list(o.sweep_string_iterator()) if discrete else None
        levels = {k: v for k, v in swept.items() if v is not None}
        design = fraction_from(self.fraction, levels, [k for k, v in swept.items() if v is None])
        batches = BasicSweeper.split_arguments(overrides, None)
        jobs = batches[0] if batches else []
        if design is not None:
            kept = [job for job in jobs if design.keeps(dict(item.split("=", 1) for item in job))]
            log.info("fractional design: %d of %d jobs. %s", len(kept), len(jobs), design.describe())
            jobs = kept
        size = max_batch_size or len(jobs) or 1
        return [jobs[i : i + size] for i in range(0, len(jobs), size)] or [[]]
