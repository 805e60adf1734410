"""Every experiment and every group option composes; config errors name the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from k3lab.nn.movq import count_parameters
from k3lab.run.config import CONF_DIR, ConfigError, validate

from conftest import compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str, tmp_path: Path) -> None:
    overrides = [f"experiment={experiment}"]
    if experiment.endswith("movq270m"):
        overrides.append(f"data.shards.train='{tmp_path}/shard-{{000..001}}.tar'")
    if experiment.startswith("text2image"):
        overrides.append(f"stage.first_stage.checkpoint={tmp_path}/autoencoder.safetensors")
    cfg = compose_config(overrides, tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.task_name == experiment
    assert cfg.stage._target_.startswith("k3lab.stages.")
    with torch.device("meta"):
        model = instantiate(cfg.model.autoencoder)
    assert count_parameters(model) > 0


@pytest.mark.parametrize(
    "group",
    [
        "trainer",
        "logger",
        "callbacks",
        "data",
        "model/autoencoder",
        "model/prior",
        "model/text_encoder",
        "model/unet",
        "model/unet/block",
        "model/clip",
        "debug",
        "stage",
        "paths",
        "sampling",
    ],
)
def test_every_group_option_composes(group: str, tmp_path: Path) -> None:
    """Each option composes and resolves, and every key its own file sets lands in the composed config with the file's
    value (interpolations compared as written), at the place its ``# @package`` directive names."""
    assert options(group), f"no options found for {group}"
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option == "webdataset":
            overrides.append(f"data.shards.train={tmp_path}/x.tar")
        cfg = compose_config(overrides, tmp_path)
        OmegaConf.resolve(cfg.copy())  # every interpolation resolves
        path = CONF_DIR / group / f"{option}.yaml"
        package = package_of(path)
        base = "" if package == "_global_" else (package or group).replace("/", ".")
        composed = OmegaConf.to_container(cfg, resolve=False)
        own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        assert isinstance(own, dict) and isinstance(composed, dict)
        own.pop("defaults", None)
        given = {o.partition("=")[0] for o in overrides} | {"paths.root_dir"}  # (compose_config sets the root)
        for key, value in flat(own, base):  # (an empty file, e.g. logger=none, sets nothing)
            if key in given:
                continue
            assert lookup(composed, key) == value, (
                f"{group}={option}: {key} = {lookup(composed, key)!r}, file: {value!r}"
            )


def package_of(path: Path) -> str | None:
    """The ``# @package`` directive of a config file's header (read from the text: YAML loading drops comments)."""
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            return line.split(maxsplit=2)[2].strip()
        if line.strip() and not line.startswith("#"):
            return None
    return None


def flat(node: dict, prefix: str) -> list[tuple[str, object]]:
    """(dotted key, value) for every leaf of a nested dict (a list is a leaf)."""
    out: list[tuple[str, object]] = []
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        out += flat(value, dotted) if isinstance(value, dict) and value else [(dotted, value)]
    return out


def lookup(node: object, dotted: str) -> object:
    """The value at a dotted key of a nested dict, or a marker naming the first missing part."""
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return f"<missing {part}>"
        node = node[part]
    return node


def test_the_option_check_reads_package_directives_and_catches_a_dropped_key(tmp_path: Path) -> None:
    """The check above can fail: a file whose key does not land (a planted package directive pointing elsewhere)."""
    global_file = CONF_DIR / "experiment" / "ablation_tiny.yaml"
    assert package_of(global_file) == "_global_" and package_of(CONF_DIR / "sampling" / "default.yaml") is None
    cfg = OmegaConf.to_container(compose_config(["sampling=default"], tmp_path), resolve=False)
    assert lookup(cfg, "sampling.steps") == 50
    assert lookup(cfg, "stage.sampling.steps") == "<missing sampling>"  # where a wrong package would put it


@pytest.mark.parametrize("launcher", options("hydra/launcher"))
def test_launchers_compose(launcher: str, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(
            "train", overrides=[f"hydra/launcher={launcher}", f"paths.root_dir={tmp_path}"], return_hydra_config=True
        )
    assert "_target_" in cfg.hydra.launcher
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


def test_unknown_preset_names_group_and_value(tmp_path: Path) -> None:
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as info:
        compose_config(["model/autoencoder=movq_9000"], tmp_path)
    message = str(info.value)
    assert "movq_9000" in message and "model/autoencoder" in message


def test_negative_resolution_fails_before_training(tmp_path: Path) -> None:
    cfg = compose_config(["data.source.resolution=-64"], tmp_path)
    with pytest.raises(ConfigError, match=r"data\.resolution=-64"):
        validate(cfg)


def test_resolution_must_divide_by_downsampling(tmp_path: Path) -> None:
    cfg = compose_config(["data.source.resolution=60"], tmp_path)
    with pytest.raises(ConfigError, match=r"data\.resolution=60: must be divisible by .* 8"):
        validate(cfg)


def test_missing_shard_path_names_key_and_path(tmp_path: Path) -> None:
    cfg = compose_config(["data=webdataset", f"data.shards.train='{tmp_path}/nope-{{000..003}}.tar'"], tmp_path)
    with pytest.raises(ConfigError, match=r"data\.shards\.train=.*nope-000\.tar"):
        validate(cfg)


def test_valid_default_passes_validation(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    validate(cfg)  # raises ConfigError listing every problem otherwise
    broken = compose_config(["data.batch_size=0"], tmp_path)
    with pytest.raises(ConfigError, match=r"data\.batch_size=0: must be a positive integer"):
        validate(broken)  # the same check sees a bad value: the pass above is not vacuous


def test_mlflow_uri_is_absolute_sqlite_and_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_config([], tmp_path)
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{tmp_path}/logs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    cfg = compose_config([], tmp_path)
    assert cfg.logger.mlflow.tracking_uri == "http://tracking.example:5000"


def test_every_path_comes_from_paths(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=autoencoder_tiny"], tmp_path)
    OmegaConf.resolve(cfg)
    paths = {k: str(v) for k, v in cfg.paths.items() if k != "mlflow_uri"}
    assert all(v.startswith(str(tmp_path)) for v in paths.values()), paths
    assert cfg.callbacks.model_checkpoint.dirpath == cfg.paths.checkpoint_dir
    assert cfg.data.source.root.startswith(cfg.paths.data_dir)


def test_resume_from_truncated_or_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, path)
    validate(compose_config([f"ckpt_path={path}"], tmp_path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match=r"ckpt_path=.*last\.ckpt': not a torch checkpoint archive"):
        validate(compose_config([f"ckpt_path={path}"], tmp_path))
    with pytest.raises(ConfigError, match=r"ckpt_path=.*missing\.ckpt': no such file"):
        validate(compose_config([f"ckpt_path={tmp_path}/missing.ckpt"], tmp_path))


def test_non_numeric_optimizer_values_are_named(tmp_path: Path) -> None:
    from k3lab.run.config import ConfigError, validate

    cfg = compose_config(["stage.optimizer.lr=abc", "stage.optimizer.betas=[0.9,x]"], tmp_path)
    with pytest.raises(ConfigError, match=r"stage\.optimizer\.lr='abc': must be a number") as info:
        validate(cfg)
    assert "stage.optimizer.betas=[0.9, 'x']: must be a number (a list of numbers)" in str(info.value)
    with pytest.raises(ConfigError, match=r"stage\.optimizer\.lr=0\.0: must be positive"):
        validate(compose_config(["stage.optimizer.lr=0.0"], tmp_path))
