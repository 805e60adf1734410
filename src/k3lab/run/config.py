"""Config helpers: OmegaConf resolvers and up-front validation that names the bad key and value."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

# The checkout's conf/ (source tree or editable install), else the copy a wheel ships inside the package.
_PACKAGE = Path(__file__).resolve().parents[1]  # src/k3lab (or site-packages/k3lab)
_CHECKOUT_CONF = _PACKAGE.parents[1] / "conf"
CONF_DIR = _CHECKOUT_CONF if (_CHECKOUT_CONF / "train.yaml").is_file() else _PACKAGE / "conf"


class ConfigError(ValueError):
    """A config value that cannot work; the message names each key and value."""


def project_root() -> str:
    """``$K3LAB_ROOT``, else the nearest folder up from the cwd with k3lab's ``conf/``, else the cwd."""
    if os.environ.get("K3LAB_ROOT"):
        return str(Path(os.environ["K3LAB_ROOT"]).resolve())
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "conf" / "train.yaml").is_file() and (folder / "pyproject.toml").is_file():
            return str(folder)
    return str(here)


def register_resolvers() -> None:
    """Register k3lab's OmegaConf resolvers once (idempotent)."""
    if not OmegaConf.has_resolver("k3lab.root"):
        OmegaConf.register_new_resolver("k3lab.root", project_root)


register_resolvers()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


_NUMERIC_OPTIMIZER_KEYS = ("lr", "weight_decay", "eps", "momentum", "betas")


def _optimizer_problems(stage: DictConfig) -> list[str]:
    """Numeric optimizer settings that are not numbers (``stage.optimizer.lr=abc`` would fail deep inside torch)."""
    problems = []
    for name in ("optimizer", "disc_optimizer"):
        node = stage.get(name) if name in stage else None
        if not isinstance(node, DictConfig):
            continue
        for key in _NUMERIC_OPTIMIZER_KEYS:
            value = node.get(key) if key in node else None
            values = list(value) if isinstance(value, ListConfig) else [value]
            if value is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                problems.append(
                    f"stage.{name}.{key}={OmegaConf.to_container(value) if OmegaConf.is_list(value) else value!r}: "
                    "must be a number" + (" (a list of numbers)" if key == "betas" else "")
                )
            elif key == "lr" and isinstance(value, (int, float)) and value <= 0:
                problems.append(f"stage.{name}.lr={value!r}: must be positive")
    return problems


def validate(cfg: DictConfig) -> None:
    """Fail before training on values that cannot work. Raises ConfigError listing every problem."""
    from k3lab.data.shards import expand_urls, missing_local_shards

    problems: list[str] = []
    data = cfg.get("data")
    if data is not None:
        for key in ("resolution", "batch_size"):
            value = OmegaConf.select(data, key)
            if not _positive_int(value):
                problems.append(f"data.{key}={value!r}: must be a positive integer")
        if data.get("source") is None:
            shards = data.get("shards") or {}
            if not shards.get("train"):
                problems.append("data.shards.train is not set: give a shard path, brace pattern or pipe: url")
            for split, spec in shards.items():
                if spec:
                    missing = missing_local_shards(
                        expand_urls(spec if isinstance(spec, str) else [str(u) for u in spec])
                    )
                    if missing:
                        problems.append(f"data.shards.{split}={spec!r}: missing shard file {missing[0]!r}")
        resolution = OmegaConf.select(data, "resolution")
        ch_mult = OmegaConf.select(cfg, "model.autoencoder.ch_mult")
        if _positive_int(resolution) and ch_mult is not None:
            factor = 2 ** (len(ch_mult) - 1)
            if resolution % factor:
                problems.append(
                    f"data.resolution={resolution}: must be divisible by the autoencoder's down-sampling factor "
                    f"{factor}"
                )
    trainer = cfg.get("trainer")
    if trainer is not None:
        max_steps = trainer.get("max_steps", -1)
        if not isinstance(max_steps, int) or (max_steps <= 0 and max_steps != -1):
            problems.append(f"trainer.max_steps={max_steps!r}: must be a positive integer (or -1 with max_epochs)")
    stage = cfg.get("stage")
    if stage is not None:
        for key in ("disc_start", "perceptual_weight", "disc_weight", "codebook_weight"):
            value = stage.get(key)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                problems.append(f"stage.{key}={value!r}: must be a number >= 0")
        problems += _optimizer_problems(stage)
        first = OmegaConf.select(stage, "first_stage.checkpoint", throw_on_missing=False, default=None)
        if OmegaConf.is_missing(stage, "first_stage") or (
            stage.get("first_stage") is not None and OmegaConf.is_missing(stage.first_stage, "checkpoint")
        ):
            problems.append(
                "stage.first_stage.checkpoint is not set: give the autoencoder stage's autoencoder.safetensors (python "
                "-m k3lab.train experiment=autoencoder_tiny writes one), or null for pixel space"
            )
        elif first and not Path(first).is_file():
            problems.append(
                f"stage.first_stage.checkpoint={first!r}: no such file (train the autoencoder first: python -m "
                "k3lab.train experiment=autoencoder_tiny)"
            )
        if stage.get("perceptual_weight", 0) and stage.get("vgg_weights") and not Path(stage.vgg_weights).is_file():
            problems.append(
                f"stage.vgg_weights={stage.vgg_weights!r}: no such file (LPIPS needs a local VGG16 state dict)"
            )
    mapping = cfg.get("mapping")
    if mapping is not None and mapping.get("clip") is not None:
        clip = mapping.clip
        if "checkpoint" in list(clip.keys()) and OmegaConf.is_missing(clip, "checkpoint"):
            problems.append(
                "mapping.clip.checkpoint is not set: give the clip stage's clip.safetensors (python -m k3lab.train "
                "experiment=clip_tiny writes one)"
            )
        for key in ("checkpoint", "weights"):
            value = clip.get(key) if key in clip else None  # `in` is False for a missing (???) value
            if value and "k3lab-reference-clip" in str(value):
                problems.append(
                    f"mapping.clip.{key}={value!r}: that is the evaluation's reference CLIP; the prior must condition "
                    "on another CLIP"
                )
            elif value and not Path(value).is_file():
                problems.append(f"mapping.clip.{key}={value!r}: CLIP weights file not found")
        prior = mapping.get("prior")
        value = prior.get("checkpoint") if prior is not None and "checkpoint" in prior else None
        if value and not Path(value).is_file():
            problems.append(f"mapping.prior.checkpoint={value!r}: no such file (train it with experiment=prior_tiny)")
    ckpt = cfg.get("ckpt_path")
    if ckpt and ckpt != "last":  # last: this run folder's last.ckpt when there is one (k3lab.run.resume)
        if not Path(ckpt).is_file():
            problems.append(f"ckpt_path={ckpt!r}: no such file")
        elif not zipfile.is_zipfile(ckpt):
            problems.append(f"ckpt_path={ckpt!r}: not a torch checkpoint archive (truncated or a foreign file)")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def compose_in_place(
    overrides: Sequence[str] = (), config_name: str = "train", return_hydra_config: bool = False
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml``: inside the running Hydra app when there is one (its state is kept), else
    in a temporary context."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(
            config_name=config_name, return_hydra_config=return_hydra_config, overrides=list(overrides)
        )
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return hydra_compose(
            config_name=config_name, return_hydra_config=return_hydra_config, overrides=list(overrides)
        )


def compose(
    overrides: Sequence[str] = (), output_dir: str | Path | None = None, config_name: str = "train"
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as ``python -m k3lab.train`` would, outside a Hydra app
    (tests, benchmarks, notebooks). ``${hydra:runtime.output_dir}`` resolves to ``output_dir``.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    cfg = compose_in_place(overrides, config_name, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or Path.cwd() / "outputs")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg
