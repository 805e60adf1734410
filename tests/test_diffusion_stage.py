"""The diffusion stage end to end on CPU: it learns (overfits a handful of scenes), exports, samples, and fails
clearly on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from k3lab.inference.loading import load_generator
from k3lab.io.checkpoint import CheckpointError
from k3lab.train import train

from conftest import SMALL_WORLD, T2I_PIXEL_16, compose_config

FAST_UNET = ["model.unet.model_channels=32", "model.unet.init_channels=16"]


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")  # the tiny T5 is built here once


@pytest.fixture
def t2i_cfg(tmp_path: Path, data_root: Path, weights_dir: Path) -> Callable[..., DictConfig]:
    """``t2i_cfg(*overrides)``: experiment=text2image_tiny in pixel space at 16 px, shrunk for CPU tests."""

    def make(*overrides: str, root: Path | None = None, scene_world: bool = True) -> DictConfig:
        base = [
            *T2I_PIXEL_16,
            f"paths.data_dir={data_root}",
            f"paths.weights_dir={weights_dir}",
            *(SMALL_WORLD if scene_world else []),
            "sampling.steps=4",
            "stage.validation.prompts=[a red circle,a blue square]",
        ]
        return compose_config([*base, *overrides], root or tmp_path)

    return make


def test_overfits_a_handful_of_scenes(t2i_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    """8 training scenes, 400 steps: samples from their captions are their images (nearest training image is the
    own one for every caption; pixel error far below the other images', a blank mean image's, and noise's)."""
    cfg = t2i_cfg(
        "data.source.num_train=8",
        "data.source.shard_size=8",
        "+data.source.kind_weights={single: 1.0}",
        "data.shuffle_buffer=1",
        "trainer.max_steps=400",
        "trainer.val_check_interval=400",
        "stage.conditioning.dropout=0.0",
        "stage.ema_decay=0.99",
        "stage.optimizer.lr=3e-3",
        "stage.optim.warmup_steps=0",
        "stage.validation.prompts=[]",
        *FAST_UNET,
        f"paths.data_dir={tmp_path}/data",
    )
    train(cfg)
    generator, _ = load_generator(cfg.paths.checkpoint_dir)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.split_dataloader("train", 8)))
    images = (batch["image"] + 1) / 2
    samples = generator(batch["caption"], list(range(8)), 16, "kandinsky3", 25, guidance_weight=0.0)
    err = ((samples[:, None] - images[None]) ** 2).mean(dim=(2, 3, 4))  # [sample, training image]
    own, other = err.diag().mean().item(), err[~torch.eye(8, dtype=torch.bool)].mean().item()
    blank = ((images.mean(0, keepdim=True) - images) ** 2).mean().item()
    noise = ((torch.rand_like(images) - images) ** 2).mean().item()
    print(
        f"pixel MSE own {own:.4f}, other training images {other:.4f}, mean image {blank:.4f}, uniform noise {noise:.4f}"
    )
    assert (err.argmin(dim=1) == torch.arange(8)).all(), err
    assert own < 0.25 * other and own < 0.5 * blank and own < 0.02 * noise


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_root: Path, weights_dir: Path) -> DictConfig:
    """A few steps of the real path (tiny MoVQ first stage from an autoencoder run, latent scale 'auto')."""
    root = tmp_path_factory.mktemp("t2i")
    ae = compose_config(
        [
            "experiment=autoencoder_tiny",
            f"paths.data_dir={data_root}",
            *SMALL_WORLD,
            "logger=csv",
            "data.batch_size=8",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
        ],
        root / "ae",
    )
    train(ae)
    ckpt = Path(ae.paths.checkpoint_dir) / "autoencoder.safetensors"
    cfg = compose_config(
        [
            "experiment=text2image_tiny",
            f"paths.data_dir={data_root}",
            f"paths.weights_dir={weights_dir}",
            *SMALL_WORLD,
            f"stage.first_stage.checkpoint={ckpt}",
            "logger=csv",
            "data.batch_size=8",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "sampling.steps=3",
            "stage.validation.prompts=[a red circle,a blue square]",
        ],
        root / "t2i",
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    return cfg


def test_trains_on_movq_latents_and_exports_everything(trained: DictConfig) -> None:
    ckpt = Path(trained.paths.checkpoint_dir)
    for name in ("unet", "text_conditioning", "latent_scale"):
        assert (ckpt / f"{name}.safetensors").is_file()
    generator, cfg = load_generator(ckpt)
    assert generator.latent_scale > 0 and generator.latent_scale != 1.0  # measured from the tiny MoVQ's latents
    assert generator.first_stage.downsample_factor == 8 and cfg.choices["model/unet"] == "tiny"
    a = generator(["a red circle", "a blue square"], [0, 1], 64, "kandinsky3", 3, 3.0)
    b = generator(["a red circle", "a blue square"], [0, 1], 64, "kandinsky3", 3, 3.0)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)  # seeded: the same images again
    grids = list((Path(trained.paths.output_dir) / "images").glob("val_samples_*.png"))
    assert len(grids) == 2  # validation at steps 2 and 4 sampled the prompts
    from_ckpt, _ = load_generator(ckpt / "last.ckpt")  # the Lightning checkpoint gives the same EMA weights
    torch.testing.assert_close(
        from_ckpt(["a red circle"], [0], 64, "ddim", 3, 0.0), generator(["a red circle"], [0], 64, "ddim", 3, 0.0)
    )
    # a checkpoint of an older version (before the conditioning arm: text_conditioning[_ema].* keys) still loads
    legacy = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=True)
    renamed = {"arm.conditioning.": "text_conditioning.", "conditioning_ema.": "text_conditioning_ema."}
    for key in list(legacy["state_dict"]):
        for new, old in renamed.items():
            if key.startswith(new):
                legacy["state_dict"][old + key[len(new) :]] = legacy["state_dict"].pop(key)
    assert not any(k.startswith(("arm.", "conditioning_ema.")) for k in legacy["state_dict"])
    torch.save(legacy, ckpt / "legacy.ckpt")
    old_gen, _ = load_generator(ckpt / "legacy.ckpt")
    torch.testing.assert_close(old_gen.arm.conditioning.null_embedding, from_ckpt.arm.conditioning.null_embedding)
    stage = instantiate(cfg.stage)
    stage.on_load_checkpoint(legacy)
    stage.load_state_dict(legacy["state_dict"], strict=True)  # a resume maps the old names onto the arm's


def test_sample_cli_writes_images_and_metadata(
    trained: DictConfig, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from k3lab.sample import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"id": "p1", "prompt": "a green cross", "category": "single"}\n{"id": "p2", "prompt": "two red disks"}\n'
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                str(trained.paths.checkpoint_dir),
                "--prompt",
                "a red circle",
                "--prompt-file",
                str(prompts),
                "--out",
                str(out),
                "--steps",
                "3",
                "--sampler",
                "dpmpp_2m",
                "--num-per-prompt",
                "2",
                "--seed",
                "7",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and [r["seed"] for r in rows[:2]] == [7, 8]
    assert rows[2]["prompt_id"] == "p1" and rows[2]["category"] == "single" and rows[4]["prompt"] == "two red disks"
    assert (
        {r["sampler"] for r in rows} == {"dpmpp_2m"}
        and rows[0]["steps"] == 3
        and rows[0]["guidance"] == 3.0
        and rows[0]["resolution"] == 64
    )
    assert (
        rows[0]["x0_threshold"] is None
    )  # the tiny preset turns the official thresholding off (unit-variance latents)
    assert (
        main(
            [
                str(trained.paths.checkpoint_dir),
                "--prompt",
                "a red circle",
                "--out",
                str(tmp_path / "thr"),
                "--steps",
                "3",
                "--x0-threshold",
                "0.5",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "thr" / "metadata.jsonl").read_text())["x0_threshold"] == 0.5
    for r in rows:
        assert Image.open(out / r["file"]).size == (64, 64)
    from evaluation.images import load_folder  # the evaluation package reads the folder as is

    assert len(load_folder(out, expected=6)) == 6
    capsys.readouterr()
    # bad input: one line naming the problem (exit 2), no traceback
    assert (
        main(
            [
                str(trained.paths.checkpoint_dir),
                "--prompt",
                "x",
                "--out",
                str(out),
                "--resolution",
                "60",
                "--steps",
                "2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.strip().splitlines()[-1].startswith("error: resolution 60 is not divisible by 32")
        and "Traceback" not in err
    )
    assert main([str(tmp_path / "no" / "such" / "path"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such checkpoint:") and "Traceback" not in err and err.count("\n") == 1
    # the sampling defaults come from the run's sampling group (the tiny preset: 25 steps, no thresholding)
    assert main([str(trained.paths.checkpoint_dir), "--prompt", "x", "--out", str(tmp_path / "defaults")]) == 0
    row = json.loads((tmp_path / "defaults" / "metadata.jsonl").read_text())
    assert (row["sampler"], row["steps"], row["guidance"], row["x0_threshold"]) == (
        trained.sampling.sampler,
        trained.sampling.steps,
        3.0,
        None,
    )


def test_checkpoint_of_another_stage_or_preset_is_refused(
    trained: DictConfig, tmp_path: Path, t2i_cfg: Callable[..., DictConfig]
) -> None:
    from k3lab.io.checkpoint import load_first_stage

    first = Path(trained.stage.first_stage.checkpoint)
    with pytest.raises(CheckpointError, match=r"autoencoder stage .*the diffusion stage's checkpoint is needed"):
        load_generator(first)
    with pytest.raises(
        CheckpointError, match=r"diffusion stage \(.*model/unet=tiny.*\).*autoencoder stage's checkpoint is needed"
    ):
        load_first_stage(str(Path(trained.paths.checkpoint_dir) / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="holds the model/unet=tiny preset, not model/unet=kandinsky3"):
        load_generator(trained.paths.checkpoint_dir, unet_preset="kandinsky3")
    resume = t2i_cfg(
        f"stage.first_stage.checkpoint={first}",
        "model.unet.in_channels=4",
        "model.unet.out_channels=4",
        "model/unet/block=resnet",
        f"ckpt_path={trained.paths.checkpoint_dir}/last.ckpt",
    )
    with pytest.raises(CheckpointError, match="model/unet/block: checkpoint biggan_deep vs this run resnet"):
        train(resume)
    other_stage = t2i_cfg(f"ckpt_path={first.parent}/last.ckpt")
    with pytest.raises(CheckpointError, match="autoencoder stage.*this run trains the diffusion stage"):
        train(other_stage)


def test_resolution_not_divisible_is_a_clear_error(t2i_cfg: Callable[..., DictConfig]) -> None:
    cfg = t2i_cfg("data.resolution=18")
    from hydra.errors import InstantiationException

    with pytest.raises(
        (ValueError, InstantiationException),
        match=r"resolution 18 is not divisible by 4 \(= first-stage factor 1 x U-Net factor 4\)",
    ):
        instantiate(cfg.stage)


def test_nan_loss_stops_naming_step_and_batch_and_keeps_checkpoints(
    t2i_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    import k3lab.stages.diffusion as stage_module

    real, calls = stage_module.diffusion_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 4:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(stage_module, "diffusion_loss", poisoned)
    cfg = t2i_cfg("trainer.max_steps=8", "trainer.val_check_interval=2", "stage.validation.prompts=[]")
    with pytest.raises(stage_module.NonFiniteLossError, match=r"at optimizer step 3, batch 3 \(sample keys \['train-"):
        train(cfg)
    ckpt = Path(cfg.paths.checkpoint_dir)
    assert (ckpt / "step0000002.ckpt").is_file() and (ckpt / "on_exception.ckpt").is_file()
    from k3lab.io.checkpoint import load_state_dict

    assert all(torch.isfinite(v).all() for v in load_state_dict(ckpt / "unet.safetensors").values())


def test_precomputed_embeddings_and_latents_replace_the_encoders(
    t2i_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    from k3lab.data.precompute import precompute

    cfg = t2i_cfg("precompute.latents=true", "precompute.shard_size=100", f"precompute.output_dir={tmp_path}/pre")
    out = precompute(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["counts"] == {"train": 256, "val": 64, "test": 32, "heldout": 32}
        and len(manifest["shards"]["train"]) == 3
    )
    pre = t2i_cfg(
        "data=precomputed",
        f"data.source.root={out}",
        "data.resolution=16",
        "data.format.feature_keys=[text.npy,latent.npy]",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        scene_world=False,
    )
    dm = instantiate(pre.data)
    dm.setup()
    batch = next(iter(dm.split_dataloader("val", 4)))
    encoder = instantiate(pre.model.text_encoder.encoder)
    hidden, mask = encoder.encode(batch["caption"])
    torch.testing.assert_close(
        batch["text_embedding"], hidden * mask[..., None], rtol=1e-4, atol=1e-5
    )  # both: longest + 1
    assert torch.equal(batch["text_mask"], mask) and torch.equal(
        batch["latent"], batch["image"]
    )  # pixel space: latent = image
    stage = instantiate(pre.stage, text_encoder=None)  # trains with no text encoder at all
    stage.text_encoder = None
    calls = []
    stage.first_stage.encode = lambda x: calls.append(1) or x  # would be called without precomputed latents
    assert torch.isfinite(stage.training_step(batch, 0)) and not calls


def test_trains_on_aspect_buckets_of_mixed_sizes(t2i_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    """Wide, tall and square images: every training batch one bucket shape through the U-Net, the samples per
    bucket logged as data metrics; a bucket the U-Net cannot take is refused by name before the first step."""
    import csv

    from test_datamodule import mixed_shard

    shard, want = mixed_shard(tmp_path / "mixed-000.tar")
    common = [
        "data=webdataset",
        f"data.shards.train={shard}",
        f"data.shards.val={shard}",
        "data.num_workers=0",
        "data.format.min_image_size=16",
        "data.format.image_keys=[png]",
        "data.batch_size=3",
        "trainer.max_steps=8",
        "trainer.val_check_interval=8",
    ]
    cfg = t2i_cfg(*common, "+data.aspect_buckets={ratios: [0.5, 1.0, 2.0], multiple: 8}", scene_world=False)
    train(cfg)
    rows = list(csv.DictReader(open(next(Path(cfg.paths.output_dir).rglob("metrics.csv")))))
    last = {k: v for row in rows for k, v in row.items() if v}
    buckets = {k.removeprefix("data/train_bucket_"): float(v) for k, v in last.items() if "train_bucket" in k}
    assert set(buckets) == {"8x24", "16x16", "24x8"} and sum(buckets.values()) == 24  # 8 steps x 3, one pass
    assert buckets == {"8x24": 12.0, "16x16": 6.0, "24x8": 6.0}
    assert 0 < float(last["val/loss"]) < float("inf")  # validation (square 16 px) ran after bucketed training
    bad = t2i_cfg(
        *common, "+data.aspect_buckets={ratios: [2.0], multiple: 2}", root=tmp_path / "bad", scene_world=False
    )
    with pytest.raises(ValueError, match=r"data.aspect_buckets: bucket 12x22"):
        train(bad)


def test_gpu_speed_switches_resolve_by_device_and_reach_the_optimizer(t2i_cfg: Callable[..., DictConfig]) -> None:
    from k3lab.nn.sharding import units
    from k3lab.stages.diffusion import switch_on

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (
        switch_on("auto", cuda) and not switch_on("auto", cpu) and switch_on(True, cpu) and not switch_on(False, cuda)
    )
    assert not instantiate(t2i_cfg().stage).configure_optimizers()["optimizer"].defaults["fused"]  # auto, on CPU
    stage = instantiate(t2i_cfg("stage.optim.fused=true").stage)
    assert stage.configure_optimizers()["optimizer"].defaults["fused"] is True
    told = instantiate(t2i_cfg("stage.optim.fused=true", "+stage.optimizer.fused=false").stage)
    assert not told.configure_optimizers()["optimizer"].defaults["fused"]  # an explicit optimizer value wins
    with pytest.raises(Exception, match="stage.compile_blocks='maybe'"):  # (hydra wraps the ValueError)
        instantiate(t2i_cfg("stage.compile_blocks=maybe").stage)
    before = {k: v.clone() for k, v in stage.unet.state_dict().items()}
    stage.compile_blocks()
    blocks = list(units(stage.unet))
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert stage.unet.state_dict().keys() == before.keys()  # checkpoints and exports keep their names
