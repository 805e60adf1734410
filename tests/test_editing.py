"""Editing: the 9-channel inpainting input in the official order and convention, paste-back, outpainting,
image-to-image, negative prompts, the mask generator, the inpainting stage and its sampling CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from k3lab.data.masks import MaskGenerator
from k3lab.diffusion import Schedule
from k3lab.diffusion.samplers import strided_timesteps
from k3lab.inference.conditioning import TextArm
from k3lab.inference.editing import expand_input_channels, img2img_first_step, outpaint_canvas, parse_outpaint
from k3lab.inference.generator import Generator
from k3lab.inference.loading import load_generator
from k3lab.io.imaging import load_image, load_mask, to_uint8
from k3lab.nn.first_stage import FrozenMoVQ, IdentityFirstStage
from k3lab.nn.movq import MoVQ
from k3lab.nn.text_conditioning import TextConditioning
from k3lab.nn.unet import KandinskyUNet
from k3lab.train import train

from conftest import SMALL_WORLD, T2I_PIXEL_16, compose_config
from test_extension_points import CharEncoder

UNET = dict(
    model_channels=16,
    init_channels=8,
    time_embed_dim=32,
    context_dim=16,
    groups=4,
    head_dim=8,
    expansion_ratio=2,
    dim_mult=(1, 2),
    num_blocks=(1, 1),
    add_cross_attention=(False, True),
    add_self_attention=(False, True),
)


def pixel16(experiment: str, in_channels: int) -> list[str]:
    """conftest.T2I_PIXEL_16 with another experiment and U-Net input width (3-channel pixel space at 16 px)."""
    skip = ("experiment=", "model.unet.in_channels=")
    return [o for o in T2I_PIXEL_16 if not o.startswith(skip)] + [
        f"experiment={experiment}",
        f"model.unet.in_channels={in_channels}",
    ]


def perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values in every parameter (zero-initialised output layers would hide the inputs' effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


class Spy(nn.Module):
    """Wraps a U-Net and records every call's inputs."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet, self.calls = unet, []
        self.in_channels, self.out_channels = unet.in_channels, unet.out_channels
        self.downsample_factor, self.context_dim = unet.downsample_factor, unet.context_dim

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor, *rest: object):
        self.calls.append({"x": x.clone(), "t": t.clone(), "context": context.clone(), "mask": mask.clone()})
        return self.unet(x, t, context, mask, *rest)


class RecordingFirstStage(nn.Module):
    """A deterministic 2x first stage (average pool + a fixed channel map) that records what it encodes."""

    downsample_factor, latent_channels = 2, 4

    def __init__(self) -> None:
        super().__init__()
        self.encoded: list[torch.Tensor] = []
        self.weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encoded.append(x.clone())
        return torch.einsum("oc,bchw->bohw", self.weight, F.avg_pool2d(x, 2))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(torch.einsum("oc,bohw->bchw", self.weight, z), scale_factor=2).tanh()


def generator_for(unet: nn.Module, first_stage: nn.Module, prediction: str = "v") -> Generator:
    encoder = CharEncoder(dim=24)
    arm = TextArm(perturb(TextConditioning(24, unet.context_dim), 1))
    return Generator(unet, arm, encoder, first_stage, Schedule.cosine(), prediction, 1.0, x0_threshold=None)


def scene(size: int = 16, seed: int = 0) -> torch.Tensor:
    """A uint8-exact image [1, 3, size, size] in [-1, 1] (as loaded from a PNG)."""
    u8 = torch.randint(0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return u8.float() / 127.5 - 1


def test_the_unet_input_follows_the_official_order_and_mask_convention() -> None:
    """The official pipeline: the user's mask is 1 where to inpaint; the U-Net gets keep = 1 - mask; the masked
    image is the image with the hole set to 0 before encoding; keep is resized to the latent grid by
    nearest-neighbour; input = [x_t, keep, masked latent]; both guidance branches see the same image condition."""
    torch.manual_seed(0)
    spy = Spy(perturb(KandinskyUNet(in_channels=9, out_channels=4, **UNET)))
    first = RecordingFirstStage()
    gen = generator_for(spy, first)
    image = scene(16)
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 3:9, 5:14] = 1
    gen(["a red circle"], [0], 16, "ddim", 2, 3.0, image=image, mask=hole)
    encoded = first.encoded[0]  # the first encode is the masked image
    assert torch.equal(encoded[hole.bool().expand_as(encoded)], torch.zeros(int(hole.sum()) * 3))
    assert torch.equal(encoded[~hole.bool().expand_as(encoded)], image[~hole.bool().expand_as(image)])
    call = spy.calls[0]
    assert call["x"].shape == (2, 9, 8, 8)  # [cond; uncond], 4 + 1 + 4 channels on the 8x8 latent grid
    keep = 1 - F.interpolate(hole, size=(8, 8), mode="nearest")
    masked_latent = first.encode(image.masked_fill(hole.bool().expand_as(image), 0))
    for half in (call["x"][:1], call["x"][1:]):
        assert torch.equal(half[:, 4:5], keep)  # channel 4: keep, 1 outside the hole
        torch.testing.assert_close(half[:, 5:], masked_latent)  # channels 5-8: the masked image's latent
    assert torch.equal(call["x"][:1, :4], call["x"][1:, :4])  # x_t first, the same in both halves
    assert keep[0, 0, 0, 0] == 1 and keep[0, 0, 3, 4] == 0  # outside / inside the hole


def test_paste_back_keeps_the_unmasked_pixels_bit_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = generator_for(perturb(KandinskyUNet(in_channels=7, out_channels=3, **UNET)), IdentityFirstStage(3))
    u8 = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(u8).save(tmp_path / "image.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:10] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image, hole = load_image(tmp_path / "image.png"), load_mask(tmp_path / "mask.png")
    assert hole.sum() == 64
    for blend in ("pixel", "latent", "none"):
        out = to_uint8(gen(["a red circle"], [0], 16, "dpmpp_2m", 3, 3.0, image=image, mask=hole, blend=blend))[0]
        inside = mask > 0
        assert not np.array_equal(out[inside], u8[inside])  # the hole was generated
        if blend == "pixel":
            assert np.array_equal(out[~inside], u8[~inside])  # every kept pixel, bit for bit
        elif blend == "none":
            assert not np.array_equal(out[~inside], u8[~inside])
        else:  # latent: pasted before decoding; the identity first stage makes it exact up to the float round trip
            assert np.abs(out[~inside].astype(int) - u8[~inside]).max() <= 1


def test_outpainting_grows_the_canvas_and_keeps_the_original() -> None:
    assert parse_outpaint("left=4, bottom=8") == {"left": 4, "right": 0, "top": 0, "bottom": 8}
    for bad in ("left=-4", "middle=4", "left=4px", ""):
        with pytest.raises(ValueError, match="--outpaint"):
            parse_outpaint(bad)
    image = scene(16)
    canvas, hole = outpaint_canvas(image, parse_outpaint("left=8,top=4,bottom=4"))
    assert canvas.shape == (1, 3, 24, 24) and hole.shape == (1, 1, 24, 24)
    assert torch.equal(canvas[..., 4:20, 8:], image) and hole[..., 4:20, 8:].sum() == 0
    assert hole.sum() == 24 * 24 - 16 * 16 and canvas[..., :, :8].abs().sum() == 0
    gen = generator_for(perturb(KandinskyUNet(in_channels=7, out_channels=3, **UNET)), IdentityFirstStage(3))
    out = gen(["a red circle"], [0], 16, "ddim", 2, 3.0, image=canvas, mask=hole)
    assert out.shape == (1, 3, 24, 24)  # non-square latents work (here square, 24 x 24)
    assert np.array_equal(to_uint8(out[..., 4:20, 8:]), to_uint8((image + 1) / 2))
    wide, wide_hole = outpaint_canvas(image, {"left": 8, "right": 8})
    assert gen(["x"], [0], 16, "ddim", 2, 3.0, image=wide, mask=wide_hole).shape == (1, 3, 16, 32)


def test_image_to_image_strength_zero_reconstructs_and_one_is_text_to_image() -> None:
    torch.manual_seed(0)
    movq = FrozenMoVQ(perturb(MoVQ(ch=8, ch_mult=(1, 2), num_res_blocks=1, n_embed=16, num_groups=4), 2))
    gen = generator_for(perturb(KandinskyUNet(in_channels=4, out_channels=4, **UNET)), movq)
    image = scene(16)
    recon = ((movq.decode(movq.encode(image)) + 1) / 2).clamp(0, 1)
    zero = gen(["a red circle"], [0], 16, "ddim", 4, 3.0, image=image, strength=0.0)
    torch.testing.assert_close(zero, recon, rtol=0, atol=1e-6)
    assert (zero - (image + 1) / 2).abs().max() > 0.05  # a reconstruction, not the input itself
    for sampler in ("kandinsky3", "dpmpp_2m"):
        t2i = gen(["a red circle"], [0], 16, sampler, 4, 3.0)
        assert torch.equal(gen(["a red circle"], [0], 16, sampler, 4, 3.0, image=image, strength=1.0), t2i)
        seen: list[int] = []
        record = lambda i, t, x0, s=seen: s.append(t)  # noqa: E731
        half = gen(["a red circle"], [0], 16, sampler, 4, 3.0, record, image=image, strength=0.5)
        assert seen == strided_timesteps(1000, 4)[2:]  # strength 0.5 of 4 steps: the last 2
        assert not torch.equal(half, t2i) and not torch.equal(half, recon)
    assert [img2img_first_step(50, s) for s in (0.0, 0.3, 1.0)] == [50, 35, 0]
    with pytest.raises(ValueError, match="strength"):
        img2img_first_step(10, 1.5)


def test_negative_prompts_change_the_unconditional_branch_and_nothing_else() -> None:
    torch.manual_seed(0)
    for in_ch, first in ((4, RecordingFirstStage()), (9, RecordingFirstStage())):
        spy = Spy(perturb(KandinskyUNet(in_channels=in_ch, out_channels=4, **UNET)))
        gen = generator_for(spy, first)
        extra = {"image": scene(16), "mask": torch.ones(1, 1, 16, 16)} if in_ch == 9 else {}
        plain = gen(["a red circle"], [0], 16, "ddim", 1, 3.0, **extra)
        call_plain = spy.calls[-1]
        negative = gen(["a red circle"], [0], 16, "ddim", 1, 3.0, negative_prompts=["a long blue square"], **extra)
        call_neg = spy.calls[-1]
        assert torch.equal(call_plain["x"], call_neg["x"])  # same noise, same image condition in both branches
        n = call_plain["context"].shape[1]  # the negative prompt is longer: the condition is padded, masked out
        assert torch.equal(call_neg["context"][:1, :n], call_plain["context"][:1])
        assert not call_neg["mask"][:1, n:].any() and call_neg["context"][:1, n:].abs().sum() == 0
        assert not torch.equal(call_neg["context"][1:, :n], call_plain["context"][1:])  # only uncond changed
        assert not torch.equal(plain, negative)
        # the empty negative prompt is the null text: the same images as no negative prompt
        assert torch.equal(gen(["a red circle"], [0], 16, "ddim", 1, 3.0, negative_prompts=[""], **extra), plain)
        # without guidance the unconditional branch is never computed, so a negative prompt changes nothing
        assert torch.equal(
            gen(["a red circle"], [0], 16, "ddim", 1, 0.0, negative_prompts=["a blue square"], **extra),
            gen(["a red circle"], [0], 16, "ddim", 1, 0.0, **extra),
        )


def test_an_inpainting_unet_starts_as_the_text_to_image_one() -> None:
    torch.manual_seed(0)
    t2i = perturb(KandinskyUNet(in_channels=4, out_channels=4, **UNET))
    inpaint = KandinskyUNet(in_channels=9, out_channels=4, **UNET).eval()
    inpaint.load_state_dict(expand_input_channels(t2i.state_dict(), 9))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 3, 16)
    mask = torch.ones(2, 3, dtype=torch.bool)
    extra = torch.randn(2, 5, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(inpaint(torch.cat([x, extra], 1), t, ctx, mask), t2i(x, t, ctx, mask))
    with pytest.raises(ValueError, match="reads 9 channels, more than the 4"):
        expand_input_channels(inpaint.state_dict(), 4)


def test_mask_generator_kinds_are_what_they_say() -> None:
    meta = {"objects": [{"bbox": [0.5, 0.25, 0.75, 0.5]}]}
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    only = lambda kind: MaskGenerator(weights={kind: 1.0})  # noqa: E731
    full = only("full")([meta], (16, 16), g())
    assert full.shape == (1, 1, 16, 16) and full.min() == 1
    obj = only("object")([meta], (32, 32), g())[0, 0]
    assert obj[8:16, 16:24].min() == 1 and obj[:6].max() == 0 and obj[:, :14].max() == 0
    outpaint = only("outpaint")([meta] * 8, (32, 32), g())
    assert outpaint[..., 13:19, 13:19].max() == 0  # bands < 0.5 of the side: the centre is always kept
    border = torch.cat([outpaint[..., 0, :], outpaint[..., -1, :], outpaint[..., :, 0], outpaint[..., :, -1]], -1)
    assert bool((border.amax(-1) == 1).all())  # every mask touches the border
    brush = only("brush")([{}] * 4, (32, 32), g())
    assert bool((brush.flatten(1).mean(1) > 0.01).all()) and bool((brush.flatten(1).mean(1) < 1).all())
    mixed = MaskGenerator()
    a, b = mixed([meta] * 6, (16, 16), g()), mixed([meta] * 6, (16, 16), g())
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert only("object")([{}], (16, 16), g()).sum() > 0  # no objects in the metadata: a box instead
    for bad in (
        {"weights": {"blob": 1.0}},
        {"weights": {"box": 0.0}},
        {"box_size": [0.5, 0.2]},
        {"outpaint_band": [0.1, 0.5]},
    ):
        with pytest.raises(ValueError, match="masks\\."):
            MaskGenerator(**bad)


@pytest.fixture(scope="module")
def inpainting_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A real inpainting run (stage=inpainting) in pixel space at 16 px: 4 steps of the masked-image objective."""
    root = tmp_path_factory.mktemp("inpaint")
    cfg = compose_config(
        [
            *pixel16("inpainting_tiny", 7),
            "model.unet.model_channels=32",
            "model.unet.init_channels=16",
            f"paths.data_dir={data_root}",
            f"paths.weights_dir={root / 'weights'}",
            *SMALL_WORLD,
            "sampling.steps=2",
            "stage.validation.prompts=[a red circle]",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
        ],
        root,
    )
    assert cfg.stage._target_.endswith("InpaintingStage") and cfg.stage.masks.weights.object > 0
    metrics = train(cfg)
    assert np.isfinite(metrics["val/loss"])
    return Path(cfg.paths.checkpoint_dir)


def test_the_inpainting_stage_trains_samples_and_serves_the_cli(
    inpainting_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from k3lab.sample import main

    gen, cfg = load_generator(inpainting_run)
    assert gen.inpainting and gen.unet.in_channels == 7
    assert len(list((inpainting_run.parent / "images").glob("val_samples_*.png"))) == 1  # sampled from scratch
    u8 = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(u8).save(tmp_path / "image.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[2:10, 6:14] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--steps", "2", "--prompt", "a red circle", "--image", str(tmp_path / "image.png")]
    assert main([str(inpainting_run), *common, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "a"),
                 "--negative", "a blue square"]) == 0  # fmt: skip
    row = json.loads((tmp_path / "a" / "metadata.jsonl").read_text())
    out = np.asarray(Image.open(tmp_path / "a" / row["file"]))
    assert np.array_equal(out[mask == 0], u8[mask == 0]) and row["negative"] == "a blue square"
    assert row["mask"].endswith("mask.png") and row["blend"] == "pixel"
    assert main([str(inpainting_run), *common, "--outpaint", "right=16", "--out", str(tmp_path / "b")]) == 0
    wide = np.asarray(Image.open(next((tmp_path / "b").glob("*.png"))))
    assert wide.shape == (16, 32, 3) and np.array_equal(wide[:, :16], u8)
    assert main([str(inpainting_run), *common, "--strength", "0.5", "--out", str(tmp_path / "c")]) == 0
    # clear one-line errors
    cases = [
        (["--prompt", "x", "--mask", str(tmp_path / "mask.png")], "--mask needs --image"),
        (common, "--image needs --mask"),
        ([*common[:-1], str(tmp_path / "missing.png"), "--strength", "0.5"], "no such image"),
        ([*common, "--mask", str(tmp_path / "mask.png"), "--outpaint", "up=3"], "--outpaint"),
    ]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    cases.append(([*common[:-1], str(tmp_path / "broken.png"), "--strength", "0.5"], "not a readable image"))
    for args, message in cases:
        assert main([str(inpainting_run), "--steps", "1", "--out", str(tmp_path / "e"), *args]) == 2
        assert message in capsys.readouterr().err


def test_inpainting_needs_an_inpainting_unet_and_the_stage_checks_channels(tmp_path: Path) -> None:
    gen = generator_for(perturb(KandinskyUNet(in_channels=4, out_channels=4, **UNET)), RecordingFirstStage())
    with pytest.raises(ValueError, match="inpainting needs an inpainting U-Net"):
        gen(["x"], [0], 16, "ddim", 1, 3.0, image=scene(16), mask=torch.ones(1, 1, 16, 16))
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = compose_config(pixel16("inpainting_tiny", 3), tmp_path)
    with pytest.raises(
        InstantiationException, match="stage=inpainting: with 3-channel latents the U-Net needs in_channels=7"
    ):
        instantiate(cfg.stage)
    cfg = compose_config(pixel16("text2image_tiny", 7), tmp_path)
    with pytest.raises(InstantiationException, match="an inpainting U-Net belongs to stage=inpainting"):
        instantiate(cfg.stage)


def test_the_inpainting_stage_starts_from_a_text_to_image_export(tmp_path: Path) -> None:
    """stage.init_weights=<text-to-image checkpoints folder>: the U-Net and text conditioning load; the input
    convolution's extra channels (five on MoVQ latents, four in 3-channel pixel space) start at zero."""
    from hydra.utils import instantiate

    from k3lab.io.checkpoint import export_model

    t2i = instantiate(compose_config([*pixel16("text2image_tiny", 3), "model/unet=fast"], tmp_path / "a").stage)
    perturb(t2i.unet, 4)
    export_model(t2i.unet, tmp_path / "unet.safetensors")
    export_model(t2i.arm.conditioning, tmp_path / "text_conditioning.safetensors")
    cfg = compose_config([*pixel16("inpainting_tiny", 7), f"stage.init_weights={tmp_path}"], tmp_path / "b")
    stage = instantiate(cfg.stage)
    weight = stage.unet.in_layer.weight
    assert torch.equal(weight[:, :3], t2i.unet.in_layer.weight) and weight[:, 3:].abs().sum() == 0
    ours, theirs = stage.unet.state_dict(), t2i.unet.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items() if k != "in_layer.weight")
    assert torch.equal(stage.arm.conditioning.null_embedding, t2i.arm.conditioning.null_embedding)
