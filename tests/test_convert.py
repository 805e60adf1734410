"""Weight interop: diffusers and official layouts in, diffusers out; numerical parity with diffusers as a peer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only parity peer (pip install -e '.[test]')")

from k3lab.convert.formats import (  # noqa: E402
    OFFICIAL_UNET,
    diffusers_movq_config,
    load_diffusers_movq,
    load_diffusers_unet,  # noqa: E402
    load_official,
    movq_state_to_diffusers,
    unet_state_to_diffusers,
)
from k3lab.io.checkpoint import CheckpointError  # noqa: E402
from k3lab.nn.text_conditioning import TextConditioning  # noqa: E402
from k3lab.nn.unet import KandinskyUNet  # noqa: E402

UNET_CONFIGS = [
    dict(
        in_channels=4,
        time_embedding_dim=64,
        groups=8,
        attention_head_dim=16,
        layers_per_block=2,
        block_out_channels=(32, 64, 64, 128),
        cross_attention_dim=48,
        encoder_hid_dim=40,
    ),
    dict(
        in_channels=4,
        time_embedding_dim=96,
        groups=4,
        attention_head_dim=8,
        layers_per_block=3,
        block_out_channels=(16, 32, 64, 64),
        cross_attention_dim=32,
        encoder_hid_dim=64,
    ),
    dict(
        in_channels=9,
        time_embedding_dim=64,
        groups=8,
        attention_head_dim=32,
        layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        cross_attention_dim=64,
        encoder_hid_dim=24,
    ),
]
MOVQ_CONFIGS = [
    dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4, n_embed=64),
    dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=3, embed_dim=3, n_embed=32),
]


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (diffusers zero-initialises some layers, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def diffusers_unet(tmp_path: Path, i: int) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(i)
    model = perturbed(diffusers.Kandinsky3UNet(**UNET_CONFIGS[i]), i)
    model.save_pretrained(tmp_path / f"unet{i}")
    return model, tmp_path / f"unet{i}"


@pytest.mark.parametrize("i", range(len(UNET_CONFIGS)))
def test_unet_matches_diffusers_and_round_trips(i: int, tmp_path: Path) -> None:
    peer, folder = diffusers_unet(tmp_path, i)
    unet, cond, _ = load_diffusers_unet(folder)
    unet.eval()
    cfg = UNET_CONFIGS[i]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg["in_channels"], 16, 16, generator=g)
    t, hidden = torch.tensor([3, 777]), torch.randn(2, 6, cfg["encoder_hid_dim"], generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        ref = peer(x, t, hidden, mask).sample
        out = unet(x, t, *cond(hidden, mask.bool()))
    assert (ref - out).abs().max().item() <= 1e-4, (ref - out).abs().max().item()
    back, original = unet_state_to_diffusers(unet, cond), peer.state_dict()
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("i", range(len(MOVQ_CONFIGS)))
def test_movq_matches_diffusers_and_round_trips(i: int, tmp_path: Path) -> None:
    cfg = {k: v for k, v in diffusers_movq_config(MOVQ_CONFIGS[i]).items() if not k.startswith("_")}
    torch.manual_seed(i)
    peer = perturbed(diffusers.VQModel(**cfg), i)
    peer.save_pretrained(tmp_path / "movq")
    movq, _ = load_diffusers_movq(tmp_path / "movq")
    movq.eval()
    g = torch.Generator().manual_seed(1)
    factor = 2 ** (len(MOVQ_CONFIGS[i]["ch_mult"]) - 1)
    z, img = (
        torch.randn(2, MOVQ_CONFIGS[i]["embed_dim"], 32 // factor, 32 // factor, generator=g),
        torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
    )
    with torch.no_grad():
        assert (peer.decode(z, force_not_quantize=True).sample - movq.decode(z)).abs().max().item() <= 1e-5
        assert (peer.encode(img).latents - movq.encode(img)).abs().max().item() <= 1e-5
    back, original = movq_state_to_diffusers(movq), peer.state_dict()
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(layers_per_block=1), "layers_per_block=1"),
        (dict(layers_per_block=(2, 3, 2, 2)), "layers_per_block=(2, 3, 2, 2)"),
        (dict(block_out_channels=(32, 48, 64, 64)), "not multiples of the first width"),
        (dict(block_out_channels=(32, 64, 64, 128, 128)), "5 levels"),
        (dict(block_out_channels=(32, 64, 128)), "3 levels"),
    ],
)
def test_unet_configs_diffusers_cannot_run_are_refused_by_name(change: dict, named: str, tmp_path: Path) -> None:
    """diffusers' Kandinsky3UNet builds these but fails in its own forward: k3lab refuses them, naming the setting."""
    from k3lab.convert.formats import unet_kwargs_from_diffusers

    with pytest.raises(CheckpointError, match=re.escape(named)):
        unet_kwargs_from_diffusers({**UNET_CONFIGS[0], **change})


# diffusers VQModel configs outside k3lab's presets: other encoder group counts (diffusers keeps 32 in the decoder's
# spatial norms), attention at other or all levels, more layers, other image channels, the pipeline-only settings.
DIFFUSERS_MOVQ_CONFIGS = [
    dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16),
    dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        latent_channels=3,
        norm_num_groups=8,
        num_vq_embeddings=48,
        down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"),
    ),
    dict(
        block_out_channels=(64, 128),
        layers_per_block=1,
        latent_channels=4,
        vq_embed_dim=4,
        norm_num_groups=64,
        in_channels=4,
        out_channels=1,
        act_fn="swish",
        down_block_types=("AttnDownEncoderBlock2D",) * 2,
        up_block_types=("AttnUpDecoderBlock2D",) * 2,
        scaling_factor=0.5,
        force_upcast=True,
        sample_size=64,
    ),
]


@pytest.mark.parametrize("i", range(len(DIFFUSERS_MOVQ_CONFIGS)))
def test_movq_matches_diffusers_on_configs_k3lab_presets_do_not_use(i: int, tmp_path: Path) -> None:
    cfg = DIFFUSERS_MOVQ_CONFIGS[i]
    n = len(cfg["block_out_channels"])
    cfg = {
        "norm_type": "spatial",
        "down_block_types": ("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
        "up_block_types": ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
        **cfg,
    }
    torch.manual_seed(i)
    peer = perturbed(diffusers.VQModel(**cfg), 10 + i)
    peer.save_pretrained(tmp_path / "movq")
    movq, kwargs = load_diffusers_movq(tmp_path / "movq")
    movq.eval()
    g = torch.Generator().manual_seed(2)
    size = 16 * 2 ** (n - 1)
    z = torch.randn(2, cfg["latent_channels"], size // 2 ** (n - 1), size // 2 ** (n - 1), generator=g)
    img = torch.rand(2, cfg.get("in_channels", 3), size, size, generator=g) * 2 - 1
    with torch.no_grad():  # float32 rounding only (a wrong group count differs by ~0.5)
        torch.testing.assert_close(movq.decode(z), peer.decode(z, force_not_quantize=True).sample, rtol=1e-4, atol=5e-5)
        torch.testing.assert_close(movq.encode(img), peer.encode(img).latents, rtol=1e-4, atol=5e-5)
    back, original = movq_state_to_diffusers(movq), peer.state_dict()
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    again = diffusers_movq_config(movq.config)  # and back out: the same model in diffusers' own config
    for key in (
        "norm_num_groups",
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "in_channels",
        "out_channels",
    ):
        assert (
            tuple(again[key]) == tuple(peer.config[key])
            if isinstance(again[key], list)
            else again[key] == peer.config[key]
        ), key


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(act_fn="gelu"), "act_fn='gelu'"),
        (dict(mid_block_add_attention=False), "mid_block_add_attention=False"),
        (dict(lookup_from_codebook=True), "lookup_from_codebook=True"),
        (dict(norm_type="group"), "norm_type='group'"),
        (dict(block_out_channels=(32, 48)), "block_out_channels=[32, 48]"),
        (dict(down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D")), "do not mirror"),
        (dict(vq_embed_dim=8), "vq_embed_dim=8 != latent_channels=4"),
        (dict(down_block_types=("DownBlock2D", "DownEncoderBlock2D")), "block types ['DownBlock2D']"),
    ],
)
def test_movq_configs_k3lab_cannot_reproduce_are_refused_by_name(change: dict, named: str) -> None:
    from k3lab.convert.formats import movq_kwargs_from_diffusers

    cfg = {
        "norm_type": "spatial",
        "block_out_channels": (32, 64),
        "latent_channels": 4,
        "norm_num_groups": 16,
        "down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        "up_block_types": ("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
    }
    with pytest.raises(CheckpointError, match=re.escape(named)):
        movq_kwargs_from_diffusers({**cfg, **change})


def test_movq_export_keeps_its_groups_or_refuses() -> None:
    from k3lab.nn.movq import MoVQ

    tiny = MoVQ(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, n_embed=16, num_groups=8)
    # movq_tiny-like: diffusers cannot express it
    with pytest.raises(CheckpointError, match="decoder norms with 8 groups"):
        diffusers_movq_config(tiny.config)
    ok = MoVQ(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        z_channels=4,
        embed_dim=4,
        n_embed=16,
        num_groups=8,
        decoder_num_groups=32,
    )
    assert diffusers_movq_config(ok.config)["norm_num_groups"] == 8


def test_padding_semantics_default_official_and_diffusers_compat(tmp_path: Path) -> None:
    """Official: project, THEN zero pads (pads add nothing to the pooling mean); diffusers: zero pads, then project
    (pads carry the LayerNorm bias). Each k3lab mode equals its reference computed on the diffusers U-Net."""
    peer, folder = diffusers_unet(tmp_path, 0)
    unet, compat, _ = load_diffusers_unet(folder)
    official = TextConditioning(compat.encoder_dim, compat.context_dim)
    official.load_state_dict(compat.state_dict())
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([50, 500])
    hidden = torch.randn(2, 8, 40, generator=g)
    mask = torch.tensor([[1] * 3 + [0] * 5, [1] * 6 + [0] * 2])
    with torch.no_grad():
        # diffusers' pipeline: zero pads, crop to longest + 1, the U-Net projects inside
        keep = int(mask.sum(1).max()) + 1
        ref_compat = peer(x, t, (hidden * mask[..., None])[:, :keep], mask[:, :keep]).sample
        # the official order, fed to the same U-Net with its projection bypassed
        proj = peer.encoder_hid_proj
        peer.encoder_hid_proj = torch.nn.Identity()
        ref_official = peer(x, t, (proj(hidden) * mask[..., None])[:, :keep], mask[:, :keep]).sample
        peer.encoder_hid_proj = proj
        out_compat = unet(x, t, *compat(hidden, mask.bool()))
        out_official = unet(x, t, *official(hidden, mask.bool()))
    assert (out_compat - ref_compat).abs().max() <= 1e-4 and (out_official - ref_official).abs().max() <= 1e-4
    assert (out_official - out_compat).abs().max() > 1e-3  # the two semantics really differ with padded text


def test_diffusers_ddpm_sampler_reproduces_the_scheduler() -> None:
    from k3lab.diffusion import Schedule, get_sampler

    sched = diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=True, steps_offset=1, timestep_spacing="leading"
    )
    sched.set_timesteps(10)
    denoise = lambda x, t: 0.3 * x + (t.float() / 1000).reshape(-1, 1, 1, 1)  # noqa: E731
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x, g = noise.clone(), torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        x = sched.step(denoise(x, t.expand(2)), t, x, generator=g).prev_sample
    ours = get_sampler("diffusers_ddpm")(
        denoise, noise, Schedule.cosine(), 10, generator=torch.Generator().manual_seed(5)
    )
    assert [int(t) for t in sched.timesteps] == list(range(901, 0, -100))
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def tiny_official_kwargs() -> dict:
    return dict(
        OFFICIAL_UNET,
        model_channels=16,
        init_channels=8,
        time_embed_dim=32,
        context_dim=24,
        groups=4,
        head_dim=8,
        num_blocks=(1, 1, 1, 1),
    )


def official_30(unet: torch.nn.Module, cond: TextConditioning) -> dict:
    """A checkpoint in the official 3.0 layout (unet, null_embedding, projections)."""
    return {
        "unet": unet.state_dict(),
        "null_embedding": cond.null_embedding.detach().clone(),
        "projections": {
            "t5.0.weight": cond.projection[0].weight,
            "t5.1.weight": cond.projection[1].weight,
            "t5.1.bias": cond.projection[1].bias,
        },
    }


@pytest.mark.parametrize("layout", ["3.0", "3.1"])
def test_official_layouts_load_strictly(layout: str, tmp_path: Path) -> None:
    kwargs = tiny_official_kwargs()
    torch.manual_seed(0)
    unet, cond = KandinskyUNet(**kwargs), TextConditioning(40, 24)
    proj = {
        "0.weight": cond.projection[0].weight,
        "1.weight": cond.projection[1].weight,
        "1.bias": cond.projection[1].bias,
    }
    ckpt = {"unet": unet.state_dict(), "null_embedding": cond.null_embedding.detach().clone()}
    projection = None
    if layout == "3.0":
        ckpt["projections"] = {f"t5.{k}": v for k, v in proj.items()}
    else:
        projection = tmp_path / "projection.pt"
        torch.save(proj, projection)
    torch.save(ckpt, tmp_path / "kandinsky3.pt")
    loaded, lcond, _ = load_official(tmp_path / "kandinsky3.pt", projection, unet_kwargs=kwargs)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values(), strict=False)
    )
    torch.testing.assert_close(lcond.state_dict(), cond.state_dict())
    # strict: a missing and a mis-shaped key are named
    del ckpt["unet"]["in_layer.bias"]
    ckpt["unet"]["out_layer.2.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing \['in_layer.bias'\].*out_layer.2.weight: \(1,\)"):
        load_official(tmp_path / "broken.pt", projection, unet_kwargs=kwargs)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "kandinsky3.pt").read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_official(tmp_path / "cut.pt", projection, unet_kwargs=kwargs)
    if layout == "3.1":
        with pytest.raises(CheckpointError, match="3.1 checkpoint"):
            load_official(tmp_path / "kandinsky3.pt", None, unet_kwargs=kwargs)


def test_exact_sizes_on_the_meta_device() -> None:
    from transformers import T5Config, T5EncoderModel

    from k3lab.nn.movq import MoVQ, count_parameters

    with torch.device("meta"):
        unet, cond = KandinskyUNet(**OFFICIAL_UNET), TextConditioning(4096, 4096)
        movq = MoVQ()
        ul2 = T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=4096,
                d_kv=256,
                d_ff=16384,
                num_layers=32,
                num_heads=16,
                feed_forward_proj="gated-silu",
                relative_attention_num_buckets=32,
                layer_norm_epsilon=1e-6,
            )
        )
    n_unet = sum(p.numel() for p in unet.parameters())
    n_proj = sum(p.numel() for p in cond.projection.parameters())
    assert (n_unet, n_proj, n_unet + n_proj) == (3_038_562_820, 16_785_408, 3_055_348_228)
    assert count_parameters(movq) == 270_669_103
    n_ul2 = sum(p.numel() for p in ul2.parameters())
    print(f"Flan-UL2 encoder: {n_ul2:,} parameters")
    assert n_ul2 == 8_721_797_632  # ~8.72B, from google/flan-ul2's config values


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny diffusers Kandinsky3Pipeline written with save_pretrained (tiny T5 + word tokenizer)."""
    from transformers import AutoTokenizer, T5EncoderModel

    from k3lab.data.scene_captions import caption_vocabulary
    from k3lab.nn.tiny_t5 import build_tiny_t5

    root = tmp_path_factory.mktemp("pipe")
    t5 = build_tiny_t5(root / "t5", caption_vocabulary())
    torch.manual_seed(0)
    unet = perturbed(
        diffusers.Kandinsky3UNet(
            in_channels=4,
            time_embedding_dim=64,
            groups=8,
            attention_head_dim=16,
            layers_per_block=2,
            block_out_channels=(32, 64, 64, 128),
            cross_attention_dim=48,
            encoder_hid_dim=64,
        ),
        0,
    )
    movq = perturbed(
        diffusers.VQModel(
            **{
                k: v
                for k, v in diffusers_movq_config(
                    dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4, n_embed=64)
                ).items()
                if not k.startswith("_")
            }
        ),
        1,
    )
    scheduler = diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=True, steps_offset=1, timestep_spacing="leading"
    )
    pipe = diffusers.Kandinsky3Pipeline(
        tokenizer=AutoTokenizer.from_pretrained(t5),
        text_encoder=T5EncoderModel.from_pretrained(t5),
        unet=unet,
        scheduler=scheduler,
        movq=movq,
    )
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


def test_diffusers_pipeline_to_k3lab_sample_and_back(
    tiny_pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from k3lab.convert.__main__ import main as convert
    from k3lab.inference.loading import load_generator
    from k3lab.sample import main as sample

    convert(["diffusers", str(tiny_pipeline), "--out", str(tmp_path / "k3")])
    gen, cfg = load_generator(
        tmp_path / "k3", text_encoder_dtype="float32"
    )  # experiment=kandinsky3 runs its encoder in bf16
    assert cfg.stage.conditioning.diffusers_compat and cfg.choices["model/unet"] == "converted"
    # one denoising step of the converted model equals diffusers' U-Net on the pipeline's own encoding
    load_pipeline = diffusers.Kandinsky3Pipeline.from_pretrained
    pipe = load_pipeline(tiny_pipeline)
    prompt_embeds, _, mask, _ = pipe.encode_prompt(
        "a red circle left of a blue square", do_classifier_free_guidance=False, _cut_context=True
    )
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        ref = pipe.unet(x, t, prompt_embeds, mask).sample
        ctx, m = gen.encode(["a red circle left of a blue square"])
        ours = gen.unet(x, t, ctx, m)
    assert (ref - ours).abs().max().item() <= 1e-4
    assert (
        sample(
            [
                str(tmp_path / "k3"),
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "s"),
                "--resolution",
                "64",
                "--sampler",
                "diffusers_ddpm",
                "--free-text-encoder",
                "--sequential",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "s" / "metadata.jsonl").read_text())["sampler"] == "diffusers_ddpm"
    assert (
        sample([str(tmp_path / "k3"), "--prompt", "x", "--unet-preset", "kandinsky3", "--out", str(tmp_path / "s2")])
        == 2
    )
    assert "holds the model/unet=converted preset, not model/unet=kandinsky3" in capsys.readouterr().err
    convert(["to-diffusers", str(tmp_path / "k3"), "--out", str(tmp_path / "back")])
    back = load_pipeline(tmp_path / "back")
    for name in ("unet", "movq", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    image = back("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert_the_pipeline_samples_what_k3lab_samples(tmp_path / "k3", back)

    # a LoRA fine-tune merged into this base (merge-lora) is a normal export for the client too
    from k3lab.io.safetensors_io import write_safetensors
    from k3lab.nn.lora import adapter_state, add_lora

    unet = gen.unet
    add_lora(unet, {"rank": 4, "alpha": 4})
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    adapter = tmp_path / "lora_run"
    adapter.mkdir()
    write_safetensors(adapter / "lora.safetensors", adapter_state(unet))
    (adapter / "lora.json").write_text(json.dumps({"lora": {"rank": 4, "alpha": 4}, "base": str(tmp_path / "k3")}))
    assert convert(["merge-lora", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert convert(["to-diffusers", str(tmp_path / "merged"), "--out", str(tmp_path / "merged_diffusers")]) == 0
    merged = load_pipeline(tmp_path / "merged_diffusers")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(merged.unet.state_dict().values(), pipe.unet.state_dict().values(), strict=True)
    )
    assert_the_pipeline_samples_what_k3lab_samples(tmp_path / "merged", merged)


def assert_the_pipeline_samples_what_k3lab_samples(k3lab_folder: Path, pipe: Any, steps: int = 4) -> None:
    """The real client: diffusers' Kandinsky3Pipeline on k3lab's to-diffusers export samples the images
    ``k3lab.sample --sampler diffusers_ddpm`` does from the same seed: pixel values in [0, 1] within 5e-3, 5e-4 on
    average (k3lab draws the start noise from seed s and the step noise from s + 1: the pipeline gets the same start
    latents and a generator seeded s + 1)."""
    from k3lab.inference.loading import load_generator

    gen, _ = load_generator(k3lab_folder, text_encoder_dtype="float32")
    prompts, seed = ["a red circle left of a blue square"], 7
    ours = gen.sample(gen.encode(prompts), [seed], 64, sampler="diffusers_ddpm", steps=steps, guidance_weight=3.0)
    start = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed))[None]
    theirs = pipe(
        prompts[0],
        num_inference_steps=steps,
        guidance_scale=3.0,
        height=64,
        width=64,
        latents=start,
        generator=torch.Generator().manual_seed(seed + 1),
        output_type="pt",
    ).images
    theirs = ((theirs + 1) / 2).clamp(0, 1)  # the pipeline's "pt" output is the decoder's [-1, 1]
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()  # fp32 on CPU, 4 steps: the same images up to float rounding
    assert diff.max().item() <= 5e-3 and diff.mean().item() <= 5e-4, (diff.max().item(), diff.mean().item())


def test_official_checkpoint_to_k3lab_sample(tiny_pipeline: Path, tmp_path: Path) -> None:
    """The official layout end to end on tiny random weights: convert with a MoVQ and a text encoder, then sample."""
    from k3lab.convert.__main__ import main as convert
    from k3lab.convert.formats import load_official
    from k3lab.convert.k3lab_io import copy_text_encoder, write_k3lab, write_movq
    from k3lab.inference.loading import load_generator

    kwargs = dict(tiny_official_kwargs(), context_dim=48)
    torch.manual_seed(0)
    unet, cond = perturbed(KandinskyUNet(**kwargs), 2), TextConditioning(64, 48)
    torch.save(official_30(unet, cond), tmp_path / "kandinsky3.pt")
    loaded, lcond, lkw = load_official(tmp_path / "kandinsky3.pt", unet_kwargs=kwargs)
    movq, mkw = load_diffusers_movq(tiny_pipeline / "movq")
    encoder = copy_text_encoder(tiny_pipeline, tmp_path / "t5")
    out = write_k3lab(
        tmp_path / "k3", loaded, lkw, lcond, write_movq(tmp_path / "k3" / "movq", movq, mkw), str(encoder), "official"
    )
    gen, cfg = load_generator(out)
    assert not cfg.stage.conditioning.diffusers_compat  # official semantics: learned null embedding
    torch.testing.assert_close(gen.arm.conditioning.null_embedding, cond.null_embedding)
    images = gen(["a red circle", ""], [0, 1], 64, "kandinsky3", 2, 3.0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    with pytest.raises(SystemExit):  # the CLI needs --out
        convert(["official", str(tmp_path / "kandinsky3.pt")])


def test_official_inpainting_checkpoint_converts_strictly_and_inpaints(tiny_pipeline: Path, tmp_path: Path) -> None:
    """The official inpainting layout (9-channel in_layer) on tiny random weights: --inpainting is required and checked,
    the folder samples with the inpainting stage's settings (0.95 thresholding) and pastes the kept pixels back."""
    from k3lab.convert.__main__ import check_inpainting
    from k3lab.convert.formats import read_official
    from k3lab.convert.k3lab_io import copy_text_encoder, write_k3lab, write_movq
    from k3lab.inference.loading import load_generator

    kwargs = dict(tiny_official_kwargs(), context_dim=48, in_channels=9)
    torch.manual_seed(0)
    unet, cond = perturbed(KandinskyUNet(**kwargs), 3), TextConditioning(64, 48)
    torch.save(official_30(unet, cond), tmp_path / "inpainting.pt")
    state, lcond, lkw = read_official(tmp_path / "inpainting.pt", unet_kwargs=dict(kwargs, in_channels=4))
    assert lkw["in_channels"] == 9 and lkw["out_channels"] == 4  # read from the file's in_layer
    check_inpainting("inpainting.pt", lkw, True)
    with pytest.raises(CheckpointError, match="the inpainting checkpoint, convert it with --inpainting"):
        check_inpainting("inpainting.pt", lkw, False)
    with pytest.raises(CheckpointError, match="--inpainting, but its U-Net reads 4 input channels"):
        check_inpainting("t2i.pt", dict(lkw, in_channels=4), True)
    movq, mkw = load_diffusers_movq(tiny_pipeline / "movq")
    encoder = copy_text_encoder(tiny_pipeline, tmp_path / "t5")
    out = write_k3lab(
        tmp_path / "k3",
        state,
        lkw,
        lcond,
        write_movq(tmp_path / "k3" / "movq", movq, mkw),
        str(encoder),
        "official",
        inpainting=True,
    )
    gen, cfg = load_generator(out)
    assert gen.inpainting and cfg.stage._target_.endswith("InpaintingStage") and gen.x0_threshold == 0.95
    loaded = gen.unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in unet.state_dict().items())  # bit for bit, strict
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    hole = torch.zeros(1, 1, 64, 64)
    hole[..., 16:48, 8:40] = 1
    result = gen(["a red circle"], [0], 64, "kandinsky3", 2, 3.0, image=image, mask=hole, negative_prompts=["blue"])
    keep = ~hole.bool().expand_as(result)
    assert torch.equal(result[keep], ((image + 1) / 2)[keep]) and torch.isfinite(result).all()
