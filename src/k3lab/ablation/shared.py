"""Parts an ablation's cells share, trained once and reused: the autoencoder, the mapping arm's CLIP, one prior per
text encoder, and the evaluation's reference CLIP.

Each part lives in ``<ablation.shared_dir>/<name>-<key>/``, where the key hashes the part's composed config (not
its paths), so every job of a sweep, later sweeps and re-runs find the same folder. A file lock makes parallel jobs
(joblib, SLURM with a shared filesystem) wait for the one that trains it instead of training it twice. A folder
left without ``DONE.json`` by a killed job is moved aside (kept, renamed ``*.incomplete-<time>``) and retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DONE = "DONE.json"
# Config nodes that do not change what a part learns (where it is written, how it is logged).
_IGNORED = (
    "paths",
    "hydra",
    "logger",
    "callbacks",
    "tags",
    "task_name",
    "ablation",
    "optimized_metric",
    "ckpt_path",
    "debug",
)


def content_key(content: Any) -> str:
    """A short, stable hash of JSON-able content (the cache key of a shared part's folder)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:10]


def config_key(cfg: DictConfig) -> str:
    """A short hash of what a part learns from: its composed config without paths, logging and names."""
    container = OmegaConf.to_container(cfg, resolve=False)
    return content_key({k: v for k, v in container.items() if k not in _IGNORED})  # type: ignore[union-attr]


def compose_part(overrides: Sequence[str]) -> DictConfig:
    """The train config a part's overrides compose to (inside a Hydra app, or standalone)."""
    from k3lab.run.config import compose_in_place

    return compose_in_place(overrides)


def ensure(name: str, folder: Path, build: Callable[[Path], None], expected: str) -> Path:
    """``folder/expected`` once ``build(folder)`` has run to completion (under a lock; skipped when done)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    target = folder / expected
    with FileLock(str(folder) + ".lock"):
        if (folder / DONE).is_file() and target.is_file():
            log.info("shared %s: reusing %s", name, target)
            return target
        if folder.exists():
            aside = folder.with_name(f"{folder.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            log.warning(
                "shared %s: %s was left incomplete (a killed job?); kept as %s, training again", name, folder, aside
            )
        start = time.perf_counter()
        log.info("shared %s: training once into %s", name, folder)
        build(folder)
        if not target.is_file():
            raise RuntimeError(f"shared {name}: training finished but {target} was not written")
        (folder / DONE).write_text(
            json.dumps({"name": name, "file": expected, "seconds": round(time.perf_counter() - start, 1)}, indent=1)
        )
        log.info("shared %s: done in %.0f s -> %s", name, time.perf_counter() - start, target)
    return target


def run_part(
    name: str,
    module: str,
    overrides: Sequence[str],
    shared_dir: str | Path,
    expected: str,
    parent_run_id: str | None = None,
    folder_overrides: Sequence[str] = ("hydra.run.dir={out}",),
    threads: int | None = None,
) -> Path:
    """Run ``python -m <module> <overrides>`` once into the part's keyed folder; returns ``folder/expected``."""
    key = config_key(compose_part(overrides))
    folder = Path(shared_dir) / f"{name}-{key}"

    def build(out: Path) -> None:
        env = dict(os.environ)
        if threads is not None:  # e.g. all cores, where a parallel launcher gave each job one thread
            count = threads if threads > 0 else (os.cpu_count() or 1)
            env.update({v: str(count) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
        if parent_run_id:
            env.update(K3LAB_PARENT_RUN_ID=parent_run_id, K3LAB_RUN_ROLE="shared")
        cmd = [sys.executable, "-m", module, *overrides, *(o.format(out=out) for o in folder_overrides)]
        log.info("shared %s: %s", name, " ".join(cmd[1:]))
        result = subprocess.run(cmd, env=env)
        if result.returncode != 0:
            raise RuntimeError(
                f"shared {name}: {module} failed (exit {result.returncode}); its log: {out}/*.log; command: "
                f"{' '.join(cmd)}"
            )

    return ensure(name, folder, build, expected)


def train_part(
    name: str,
    overrides: Sequence[str],
    shared_dir: str | Path,
    export: str,
    parent_run_id: str | None = None,
    threads: int | None = None,
) -> Path:
    """Train one part with ``python -m k3lab.train <overrides>`` into its keyed folder (once); returns its export."""
    return run_part(name, "k3lab.train", overrides, shared_dir, f"checkpoints/{export}", parent_run_id, threads=threads)


def precompute_part(name: str, overrides: Sequence[str], shared_dir: str | Path, threads: int | None = None) -> Path:
    """Text embeddings and latents of every split, written once by ``python -m k3lab.precompute``; returns the
    folder."""
    path = run_part(
        name,
        "k3lab.precompute",
        [*overrides, "precompute.latents=true"],
        shared_dir,
        "manifest.json",
        None,
        ("hydra.run.dir={out}", "precompute.output_dir={out}"),
        threads,
    )
    return path.parent


def reference_clip(
    shared_dir: str | Path, train_shards: Sequence[str], val_shards: Sequence[str], settings: dict[str, Any]
) -> Path:
    """The evaluation package's reference CLIP (FID features and CLIP score), trained once on the training split."""
    from evaluation import reference_clip as ref
    from evaluation.images import load_shards

    steps, batch, seed = int(settings["steps"]), int(settings["batch_size"]), int(settings.get("seed", 0))
    content = {
        "train": sorted(Path(s).name for s in train_shards),
        "data": str(Path(train_shards[0]).parent.name),
        "steps": steps,
        "batch": batch,
        "seed": seed,
    }
    key = content_key(content)

    def build(out: Path) -> None:
        report = ref.train(
            load_shards(train_shards),
            list(load_shards(val_shards, limit=512)),
            out,
            steps=steps,
            batch_size=batch,
            seed=seed,
        )
        log.info("reference CLIP: held-out retrieval %s", report["heldout_retrieval"])

    return ensure("reference_clip", Path(shared_dir) / f"reference_clip-{key}", build, f"{ref.NAME}.pt").parent
