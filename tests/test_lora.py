"""LoRA fine-tuning (stage.lora, k3lab.nn.lora through peft) of an imported diffusers model on a folder of images: only
the adapters train, checkpoint and average; the run exports the adapter alone; sampling puts it on its base unmerged
(scale 0 = the base exactly); merge-lora writes a normal export (base + scale B A per layer) that diffusers' own
pipeline samples like k3lab; a resumed LoRA run continues exactly; the memory plan's arithmetic."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from test_convert import tiny_pipeline  # noqa: F401 - the module-scoped fixture: a random tiny diffusers pipeline

from k3lab.inference.loading import load_generator
from k3lab.io.checkpoint import load_state_dict
from k3lab.nn.lora import LoraOptions, adapter_state, add_lora
from k3lab.run.fitting import fit
from k3lab.stages.diffusion import lora_from

from conftest import SMALL_WORLD, T2I_PIXEL_16, compose_config


def unet_inputs(unet: torch.nn.Module, ctx_dim: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, int(unet.in_channels), 16, 16, generator=g)
    return x, torch.tensor([10, 700]), torch.randn(2, 5, ctx_dim, generator=g), torch.ones(2, 5, dtype=torch.bool)


def test_adapters_start_as_the_base_and_only_they_train(root: Path) -> None:
    cfg = compose_config([*T2I_PIXEL_16, *SMALL_WORLD], root)
    unet = instantiate(cfg.model.unet).eval()
    inputs = unet_inputs(unet, int(cfg.model.unet.context_dim))
    before = unet(*inputs)
    targets = add_lora(unet, {"rank": 4, "alpha": 8})
    assert targets and all(t.rsplit(".", 1)[-1] in ("to_query", "to_key", "to_value", "output_layer") for t in targets)
    assert torch.equal(unet(*inputs), before)  # B = 0 at the start
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert len(adapter_state(unet)) == len(trained) == 2 * len(targets)
    with pytest.raises(ValueError, match="'nothing_here' matches no Linear or Conv2d layer"):
        add_lora(instantiate(cfg.model.unet), {"target_modules": ["nothing_here"]})
    with pytest.raises(ValueError, match=r"stage.lora: unknown keys \['r'\]"):
        lora_from({"r": 4})
    with pytest.raises(ValueError, match="stage.lora.rank=0"):
        LoraOptions(rank=0)
    convs = add_lora(instantiate(cfg.model.unet), {"target_modules": [r".*resnet_blocks\.\d+\.projection"]})
    assert convs and all(t.endswith(".projection") for t in convs)  # a regex reaches the blocks' convolutions


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora")


COLOURS, SHAPES = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "cross"]


def photo_folder(root: Path, count: int = 50) -> Path:
    """~50 captioned images in mixed formats and sizes (captions in the tiny T5's vocabulary), 3 broken files."""
    from PIL import Image, ImageDraw

    folder = root / "photos"
    folder.mkdir()
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP")]
    sizes = [(64, 64), (96, 64), (64, 96), (80, 80), (128, 64)]
    for i in range(count):
        colour, shape = COLOURS[i % 4], SHAPES[(i // 4) % 4]
        img = Image.new("RGB", sizes[i % len(sizes)], (240, 240, 240))
        ImageDraw.Draw(img).ellipse(
            (16, 16, 48, 48),
            fill={"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}[
                colour
            ],
        )
        ext, fmt = formats[i % len(formats)]
        img.save(folder / f"img_{i:03d}.{ext}", format=fmt)
        (folder / f"img_{i:03d}.txt").write_text(f"a {colour} {shape}")
    for i in range(3):  # broken files: counted and skipped, never a crash
        (folder / f"broken_{i}.jpg").write_bytes(b"\xff\xd8 truncated")
        (folder / f"broken_{i}.txt").write_text("a red circle")
    return folder


def finetune(root: Path, base: Path, folder: Path, name: str, steps: int, *extra: str) -> Path:
    """``experiment=kandinsky3_lora`` on the folder, its U-Net and text encoder the converted tiny pipeline's."""
    import yaml

    saved = yaml.safe_load((base / "config.yaml").read_text())
    unet = [f"model.unet.{k}={json.dumps(v)}" for k, v in saved["model"]["unet"].items() if not isinstance(v, dict)]
    cfg = compose_config(
        [
            "experiment=kandinsky3_lora",
            "trainer=cpu",
            "logger=csv",
            f"stage.init_weights={base}",
            f"data.source.path={folder}",
            "data.resolution=64",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.source.repeats=4",
            *unet,
            "model.unet.gradient_checkpointing=false",
            f"model.text_encoder.encoder.path={saved['model']['text_encoder']['encoder']['path']}",
            "model.text_encoder.encoder.dtype=float32",
            f"model.text_encoder.dim={saved['model']['text_encoder']['dim']}",
            f"stage.encoder_dim={saved['stage']['encoder_dim']}",
            "stage.conditioning.diffusers_compat=true",
            "stage.lora.rank=4",
            "stage.lora.alpha=8",
            "stage.lora.base_dtype=null",  # fp32 on CPU (the bf16 base has its own test)
            "stage.optimizer.lr=1e-2",
            "stage.optim.warmup_steps=0",
            "stage.validation.prompts=[]",
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=1000",
            "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1",
            *extra,
        ],
        root / name,
    )
    fit(cfg)
    return Path(cfg.paths.checkpoint_dir)


def test_lora_fine_tune_of_an_imported_diffusers_model_on_a_folder(
    tiny_pipeline: Path,  # noqa: F811 - test_convert's fixture
    root: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    """From a diffusers checkpoint (random weights written by diffusers) converted by k3lab, a LoRA fine-tune on a
    folder of 50 images with 3 broken files: the loss falls, checkpoints hold only the adapters, resume is exact, the
    merged export is base + scale x (alpha / rank) B A per layer, and diffusers' pipeline on the exported merge samples
    what k3lab samples."""
    import diffusers
    from test_convert import assert_the_pipeline_samples_what_k3lab_samples

    from k3lab.convert.__main__ import main as convert

    base = root / "k3"
    assert convert(["diffusers", str(tiny_pipeline), "--out", str(base)]) == 0
    folder = photo_folder(root)
    run = finetune(root, base, folder, "whole", 24)
    rows = [r for r in csv.DictReader(open(run.parent / "csv" / "metrics.csv")) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) >= 8 and sum(losses[-4:]) < sum(losses[:4]), losses  # it trains
    assert (root / "whole" / "run" / "skipped_samples.md").read_text().count("undecodable_image") == 1
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    tensors = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and v.numel() > 1]
    assert tensors and all(".lora_" in k for k in tensors)
    sizes = {name: (run / name).stat().st_size for name in ("last.ckpt", "lora.safetensors")}
    base_size = (base / "unet.safetensors").stat().st_size
    with capsys.disabled():
        print(f"\nLoRA checkpoint {sizes['last.ckpt']:,} B, adapter {sizes['lora.safetensors']:,} B", end="")
        print(f"; the base U-Net {base_size:,} B")
    assert sizes["last.ckpt"] < base_size / 5

    first = finetune(root, base, folder, "split", 12)
    with caplog.at_level(logging.INFO, logger="k3lab.run.resume"):
        split = finetune(root, base, folder, "split", 24, "ckpt_path=last")
    assert f"resuming from {first / 'last.ckpt'}" in caplog.text
    a, b = load_state_dict(run / "lora.safetensors"), load_state_dict(split / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed = uninterrupted

    assert convert(["merge-lora", str(run), "--scale", "0.5", "--out", str(root / "merged")]) == 0
    merged, plain = load_state_dict(root / "merged" / "unet.safetensors"), load_state_dict(base / "unet.safetensors")
    assert merged.keys() == plain.keys()
    layers = {k.rsplit(".lora_", 1)[0] for k in a}
    for layer in layers:
        delta = a[f"{layer}.lora_B.weight"] @ a[f"{layer}.lora_A.weight"]
        want = plain[f"{layer}.weight"] + 0.5 * (8 / 4) * delta
        assert torch.allclose(merged[f"{layer}.weight"], want, atol=1e-6), layer
    untouched = [k for k in plain if k.rsplit(".", 1)[0] not in layers]
    assert untouched and all(torch.equal(merged[k], plain[k]) for k in untouched)

    off, _ = load_generator(base, lora=run, lora_scale=0.0, text_encoder_dtype="float32")
    ref, _ = load_generator(base, text_encoder_dtype="float32")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx, mask = ref.encode(["a red circle"])
    with torch.no_grad():
        assert torch.equal(off.unet(x, torch.tensor([500]), ctx, mask), ref.unet(x, torch.tensor([500]), ctx, mask))
    assert convert(["to-diffusers", str(root / "merged"), "--out", str(root / "merged_diffusers")]) == 0
    pipe = diffusers.Kandinsky3Pipeline.from_pretrained(root / "merged_diffusers")
    assert_the_pipeline_samples_what_k3lab_samples(root / "merged", pipe)


def test_the_lora_memory_plan_counts_adapters_and_measures_activations_with_them() -> None:
    """benchmarks/lora_memory.py's model: adapter parameters by hand (rank x (in + out) per targeted Linear), the
    activations of the adapted U-Net on the meta device equal to the same count on real tensors, and the batch is the
    free memory over them."""
    from k3lab.nn.sharding import GIB, activation_bytes, lora_memory_plan

    cfg = compose_config([*T2I_PIXEL_16, *SMALL_WORLD], Path("/tmp"))
    with torch.device("meta"):
        unet = instantiate(cfg.model.unet)
    [row] = lora_memory_plan(unet, [4], [16], [2.0], context_tokens=8, other_gib=0.5)
    linears = [
        m for n, m in unet.named_modules() if n.rsplit(".", 1)[-1] in ("to_query", "to_key", "to_value", "output_layer")
    ]
    assert row.adapter_params == sum(4 * (m.in_features + m.out_features) for m in linears)
    frozen = sum(p.numel() for p in unet.parameters())
    assert row.frozen_gib == pytest.approx(frozen * 4 / GIB) and row.adapter_gib == pytest.approx(
        row.adapter_params * 20 / GIB
    )
    static = (frozen * 4 + row.adapter_params * 20) / GIB + 0.5
    assert row.batch[2.0] == int((2.0 - static) // row.activation_gib)
    import copy

    adapted = copy.deepcopy(unet)
    add_lora(adapted, {"rank": 4, "alpha": 4})
    assert row.activation_gib == pytest.approx(activation_bytes(adapted, 16, 8).checkpointed / GIB)
    real = instantiate(cfg.model.unet)  # the meta count is what real tensors save (fp32 here: CPU)
    add_lora(real, {"rank": 4, "alpha": 4})
    on_meta = activation_bytes(copy.deepcopy(adapted), 16, 8, dtype=torch.float32).checkpointed
    assert on_meta == pytest.approx(activation_bytes(real, 16, 8, dtype=torch.float32).checkpointed, rel=0.01)


def test_a_bf16_base_trains_under_autocast_with_fp32_adapters(root: Path) -> None:
    """stage.lora.base_dtype=bfloat16 (kandinsky3_lora): the frozen base is stored at half size, shared by the EMA,
    the adapters stay fp32, and the step and the validation samples run under bf16 autocast (CPU here)."""
    base_cfg = compose_config(
        [*T2I_PIXEL_16, *SMALL_WORLD, "trainer.max_steps=2", "trainer.val_check_interval=2"], root / "b16"
    )
    fit(base_cfg)
    cfg = compose_config(
        [
            *T2I_PIXEL_16,
            *SMALL_WORLD,
            f"stage.init_weights={base_cfg.paths.checkpoint_dir}",
            "+stage.lora={rank: 4, alpha: 4, base_dtype: bfloat16}",
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "stage.validation.prompts=[a red circle]",
            "trainer.log_every_n_steps=1",
        ],
        root / "b16_lora",
    )
    stage = instantiate(cfg.stage)
    dtypes = {n: p.dtype for n, p in stage.unet.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    shared = dict(stage.unet_ema.module.named_parameters())
    assert all(shared[n] is p for n, p in stage.unet.named_parameters() if ".lora_" not in n)  # not copied
    fit(cfg)
    run = Path(cfg.paths.checkpoint_dir)
    rows = [r for r in csv.DictReader(open(run.parent / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert rows and all(math.isfinite(float(r["train/loss"])) for r in rows), (
        run.parent / "csv" / "metrics.csv"
    ).read_text()
    adapter = load_state_dict(run / "lora.safetensors")
    assert adapter and {v.dtype for v in adapter.values()} == {torch.float32}
