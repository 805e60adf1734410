"""The diffusion stage's option groups (k3lab.stages.options): composed from conf/stage, checked key by key, saved as
plain hyperparameters, and runs saved with the older flat ``stage.*`` keys still load into the same options."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from k3lab.diffusion.settings import SamplingSettings
from k3lab.io.checkpoint import CONFIG_NAME, MOVED_STAGE_KEYS, load_config_beside
from k3lab.stages.diffusion import DiffusionStage
from k3lab.stages.options import (
    ConditioningOptions,
    LossOptions,
    OptimOptions,
    ValidationOptions,
    group_of,
)

from conftest import SMALL_WORLD, T2I_PIXEL_16, compose_config


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("options")


def t2i(root: Path, *overrides: str) -> DictConfig:
    base = [*T2I_PIXEL_16, *SMALL_WORLD, f"paths.weights_dir={root / 'weights'}", f"paths.data_dir={root / 'data'}"]
    return compose_config([*base, *overrides], root)


def test_groups_reach_the_stage_typed_and_the_constructor_stays_small(root: Path) -> None:
    cfg = t2i(root, "stage.optim.warmup_steps=7", "stage.loss.min_snr_gamma=5", "sampling.guidance=4.5")
    stage = instantiate(cfg.stage)
    assert stage.optim_options == OptimOptions(warmup_steps=7, grad_clip=1.0)
    assert stage.loss_options.prediction == "v" and stage.loss_options.min_snr_gamma == 5  # text2image_tiny: v
    assert stage.validation_options.sampling == SamplingSettings.of_run(cfg)
    assert stage.validation_options.sampling.guidance == 4.5  # the sampling group, passed whole
    assert stage.validation_options.prompts == tuple(cfg.stage.validation.prompts)
    assert len(inspect.signature(DiffusionStage.__init__).parameters) - 1 == 16  # the 16th: stage.lora


def test_the_largest_constructors_take_16_and_15_parameters() -> None:
    """docs/architecture.md: the largest constructor in the package takes 16 parameters (the diffusion stage), the
    next 15 (these two)."""
    import importlib
    import pkgutil

    import k3lab

    sizes: dict[str, int] = {}
    for info in pkgutil.walk_packages(k3lab.__path__, "k3lab."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and "__init__" in vars(cls):
                sizes[name] = len(inspect.signature(cls.__init__).parameters) - 1
    assert max(sizes.values()) == 16 and {n for n, k in sizes.items() if k == 16} == {"DiffusionStage"}
    assert {n for n, k in sizes.items() if k == 15} == {"AutoencoderStage", "KandinskyUNet"}


def test_hyperparameters_are_plain_values_that_load_without_pickle(root: Path, tmp_path: Path) -> None:
    stage = instantiate(t2i(root, "stage.validation.prompts=[a red circle]").stage)
    hparams = dict(stage.hparams)
    assert hparams["loss"]["prediction"] == "v" and hparams["validation"]["prompts"] == ["a red circle"]
    assert hparams["validation"]["sampling"]["sampler"] == stage.validation_options.sampling.sampler
    torch.save({"hyper_parameters": hparams}, tmp_path / "h.ckpt")
    loaded = torch.load(tmp_path / "h.ckpt", weights_only=True)["hyper_parameters"]
    assert group_of(ValidationOptions, loaded["validation"], "v") == stage.validation_options
    assert group_of(LossOptions, loaded["loss"], "l") == stage.loss_options


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+stage.optim.warmup=5", r"stage.optim: unknown keys \['warmup'\]"),
        ("stage.loss.prediction=x0", "stage.loss: prediction='x0'"),
        ("stage.conditioning.dropout=1.0", "stage.conditioning: dropout=1.0"),
        ("stage.optim.lr_final=2", "stage.optim: lr_final=2"),
        ("stage.optim.fused=sometimes", "stage.optim: fused='sometimes'"),
        ("stage.validation.prompts=a red circle", "stage.validation: prompts='a red circle'"),
        ("+stage.validation.sampling.cfg=3", r"unknown keys \['cfg'\]"),
    ],
)
def test_a_wrong_key_or_value_is_refused_by_name(root: Path, override: str, named: str) -> None:
    with pytest.raises(Exception, match=named):  # (hydra wraps the ValueError)
        instantiate(t2i(root, override).stage)


def test_group_of_takes_instances_mappings_and_none() -> None:
    assert group_of(ConditioningOptions, None, "c") == ConditioningOptions()
    given = ConditioningOptions(dropout=0.2)
    assert group_of(ConditioningOptions, given, "c") is given
    assert group_of(ConditioningOptions, {"dropout": 0.2}, "c") == given
    with pytest.raises(ValueError, match="stage.conditioning: expected a mapping"):
        group_of(ConditioningOptions, 0.2, "stage.conditioning")  # type: ignore[arg-type]


def flattened(cfg: DictConfig) -> DictConfig:
    """The config as a run older than the option groups saved it: every grouped stage option as a flat key."""
    old = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(old, DictConfig)
    for flat, grouped in MOVED_STAGE_KEYS.items():
        value = OmegaConf.select(old.stage, grouped, default=KeyError)
        if value is not KeyError:  # (nulls too: older runs wrote every key)
            old.stage[flat] = value
    for group in ("optim", "loss", "conditioning", "validation"):
        del old.stage[group]
    return old


def test_a_run_saved_with_flat_keys_loads_into_the_same_options(root: Path, tmp_path: Path) -> None:
    cfg = t2i(root, "stage.loss.noise_seed=3", "sampling.steps=7", "stage.validation.prompts=[a red circle]")
    old = flattened(cfg)
    assert "warmup_steps" in old.stage and "sample_steps" in old.stage and "optim" not in old.stage
    OmegaConf.save(old, tmp_path / CONFIG_NAME)
    loaded = load_config_beside(tmp_path / "last.ckpt")
    assert not set(MOVED_STAGE_KEYS) & set(loaded.stage)  # none left flat
    for group in ("optim", "loss", "conditioning"):
        assert OmegaConf.to_container(loaded.stage[group]) == OmegaConf.to_container(cfg.stage[group], resolve=True)
    sampling = SamplingSettings.from_config(loaded.stage.validation.sampling)
    assert sampling == SamplingSettings.from_config(cfg.stage.validation.sampling) and sampling.steps == 7
    now, then = instantiate(cfg.stage), instantiate(loaded.stage)
    for name in ("optim_options", "loss_options", "conditioning_options", "validation_options"):
        assert getattr(then, name) == getattr(now, name), name
    assert SamplingSettings.of_run(old) == SamplingSettings.of_run(cfg)  # the flat keys read directly, too
    other = OmegaConf.create({"stage": {"_target_": "k3lab.stages.prior.PriorStage", "warmup_steps": 5}})
    OmegaConf.save(other, tmp_path / CONFIG_NAME)
    assert load_config_beside(tmp_path / "last.ckpt").stage.warmup_steps == 5  # other stages keep their flat keys


def test_the_data_format_group_reads_old_runs_and_refuses_bad_values(root: Path, tmp_path: Path) -> None:
    from k3lab.data.options import SampleFormat

    cfg = t2i(root, "data.format.image_keys=[png,jpg]", "data.format.min_image_size=8")
    dm = instantiate(cfg.data)
    assert dm.format == SampleFormat(image_keys=("png", "jpg"), min_image_size=8)
    assert instantiate(t2i(root).data).format.min_image_size == 16  # null: the training resolution
    old = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    del old.data.format
    old.data.merge_with({"image_key": "png;jpg", "min_image_size": 8, "require_caption": True})  # as older runs did
    OmegaConf.save(old, tmp_path / CONFIG_NAME)
    loaded = load_config_beside(tmp_path / "last.ckpt")
    assert "image_key" not in loaded.data and instantiate(loaded.data).format == dm.format
    for override, named in (
        ("+data.format.image_key=png", r"data.format: unknown keys \['image_key'\]"),
        ("data.format.feature_keys=[text.npz]", r"data.format: feature_keys: unknown \['text.npz'\]"),
        ("data.format.decode_images=false", "data.format: decode_images=false needs precomputed latents"),
        ("data.format.image_keys=[]", "data.format: image_keys=.*at least one"),
    ):
        with pytest.raises(Exception, match=named):
            instantiate(t2i(root, override).data)
