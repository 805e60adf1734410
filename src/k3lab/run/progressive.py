"""The progressive chain behind ``python -m k3lab.progressive`` (usage and chain layout: :mod:`k3lab.progressive`):
one diffusion run per resolution stage, each from the previous stage's exports."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from k3lab.io.checkpoint import atomic_write_bytes
from k3lab.run.config import ConfigError

log = logging.getLogger(__name__)

CHAIN_FILE = "chain.json"


def stage_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(folder name, config) per stage: the base config without ``progressive``, the stage's overrides applied, its
    own run folder. Raises naming the stage for a malformed entry or an override of a key the config lacks."""
    stages = OmegaConf.select(cfg, "progressive.stages")
    if not stages:
        raise ConfigError("progressive.stages: give a non-empty list of {name, overrides}")
    if str(cfg.stage._target_).rsplit(".", 1)[-1] not in ("DiffusionStage", "InpaintingStage"):
        raise ConfigError(f"progressive training chains diffusion stages; stage._target_ is {cfg.stage._target_}")
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    assert isinstance(base, DictConfig)  # a copy of a DictConfig
    with open_dict(base):
        del base["progressive"]
    out, names = [], set()
    root = Path(str(cfg.paths.output_dir))
    for i, entry in enumerate(stages):
        name = str(entry.get("name") or "")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise ConfigError(f"progressive.stages[{i}].name={name!r}: a unique name of letters, digits, _ . -")
        names.add(name)
        stage_cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=False))
        for key, value in (entry.get("overrides") or {}).items():
            if OmegaConf.select(stage_cfg, str(key), default="__missing__") == "__missing__":
                raise ConfigError(f"progressive.stages[{i}] ({name}): override {key!r} names no config key")
            OmegaConf.update(stage_cfg, str(key), value, merge=False)
        with open_dict(stage_cfg):
            stage_cfg.paths.output_dir = str(root / f"{i}_{name}")
        out.append((f"{i}_{name}", stage_cfg))
    return out


def read_chain(root: Path) -> dict[str, Any]:
    """A progressive run folder's chain file (its finished stages): none when absent, an error when corrupt."""
    path = root / CHAIN_FILE
    if not path.is_file():
        return {"stages": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); remove it to rerun the chain from its first stage") from e


def run_chain(cfg: DictConfig) -> list[dict[str, Any]]:
    """Train the stages in order; returns one record per stage (folder, checkpoint dir, latent scale, metrics)."""
    from k3lab.run.fitting import fit

    root = Path(str(cfg.paths.output_dir))
    root.mkdir(parents=True, exist_ok=True)
    stages = stage_configs(cfg)
    chain = read_chain(root)
    done = {r["folder"]: r for r in chain["stages"]}
    previous: dict[str, Any] | None = None
    for i, (folder, stage_cfg) in enumerate(stages):
        if folder in done:
            previous = record = done[folder]
            log.info("progressive: stage %d (%s) already finished, reusing %s", i, folder, record["checkpoint_dir"])
            continue
        if previous is not None:
            with open_dict(stage_cfg):
                stage_cfg.stage.init_weights = previous["checkpoint_dir"]
                if previous.get("latent_scale") is not None:
                    stage_cfg.stage.latent_scale = previous["latent_scale"]
        log.info(
            "progressive: stage %d of %d (%s) at %s px%s",
            i + 1,
            len(stages),
            folder,
            stage_cfg.data.resolution,
            f", from {previous['checkpoint_dir']}" if previous else "",
        )
        result = fit(stage_cfg, role="progressive_stage")
        scale = getattr(result.stage, "latent_scale", None)
        previous = {
            "folder": folder,
            "resolution": int(stage_cfg.data.resolution),
            "checkpoint_dir": str(stage_cfg.paths.checkpoint_dir),
            "latent_scale": float(scale.value) if scale is not None and scale.measured() else None,
            "init_weights": stage_cfg.stage.get("init_weights"),
            "metrics": result.metrics,
        }
        chain["stages"].append(previous)
        atomic_write_bytes(root / CHAIN_FILE, json.dumps(chain, indent=2).encode())
    return chain["stages"]
