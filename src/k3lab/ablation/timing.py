"""Time that travels: at the start of an ablation sweep, this machine's fp32 matmul rate and the sweep's expected
wall time, scaled from a measured reference (``ablation.reference_time`` in the preset)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

from k3lab.io.options import plain_dict

log = logging.getLogger(__name__)


def matmul_gflops(n: int = 1024, repeats: int = 8) -> float:
    """fp32 matmul throughput of this machine (GFLOP/s, best of ``repeats`` n x n products): printed beside every
    time (the sweeps' start, the benchmarks) so a reader can scale it to their own machine."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    _ = a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        _ = a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def count_jobs(config: DictConfig) -> int:
    """The number of jobs a multirun launches (the product of its swept values' counts; of a half fraction, half)."""
    from k3lab.ablation.design import fraction_from
    from k3lab.tracking.sweep import swept_values

    params = config.hydra.sweeper.get("params")
    sweeps = {k: str(v) for k, v in plain_dict(params, "hydra.sweeper.params").items()}
    values = swept_values(sweeps, list(config.hydra.overrides.task))
    spec = config.hydra.sweeper.get("fraction")
    pinned = [o.partition("=")[0].lstrip("+~") for o in config.hydra.overrides.task if "," not in o]
    design = fraction_from(plain_dict(spec, "hydra.sweeper.fraction") if spec is not None else None, values, pinned)
    if design is None:
        return math.prod(len(v) for v in values.values())
    return len(design.runs()) * math.prod(len(v) for k, v in values.items() if k not in design.factors)


def estimate_minutes(reference: dict[str, float], jobs: int, gflops: float) -> float:
    """(shared parts + jobs x one cell) at the reference machine's rate, scaled by the matmul rates."""
    seconds = float(reference["shared_seconds"]) + jobs * float(reference["cell_seconds"])
    return seconds * float(reference["gflops"]) / gflops / 60


class TimeEstimateCallback(Callback):
    """Hydra callback: prints the machine's matmul GFLOP/s and the sweep's expected duration at its start."""

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        gflops = matmul_gflops()
        reference = OmegaConf.select(config, "ablation.reference_time")
        jobs = count_jobs(config)
        if reference is None:
            log.info("this machine: %.0f GFLOP/s fp32 matmul; %d job(s)", gflops, jobs)
            return
        ref = OmegaConf.to_container(reference, resolve=True)
        log.info(
            "this machine: %.0f GFLOP/s fp32 matmul; %d job(s): expect about %.0f min (%.0f min if the shared parts "
            "are cached), scaled from %.0f GFLOP/s: %s",
            gflops,
            jobs,
            estimate_minutes(ref, jobs, gflops),  # type: ignore[arg-type]
            estimate_minutes({**ref, "shared_seconds": 0}, jobs, gflops),  # type: ignore[dict-item]
            float(ref["gflops"]),  # type: ignore[index]
            ref.get("measured", ""),  # type: ignore[union-attr]
        )
