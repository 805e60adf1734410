"""LoRA fine-tuning (stage.lora, k3lab.nn.lora through peft): only the adapters train, checkpoint and average; the run
exports the adapter alone; sampling puts it on its base unmerged (scale 0 = the base exactly); merge-lora writes a
normal export with the same outputs; a resumed LoRA run continues exactly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from k3lab.inference.loading import load_generator
from k3lab.io.checkpoint import load_state_dict
from k3lab.nn.lora import LoraOptions, adapter_state, add_lora, lora_from, merge_lora, set_scale
from k3lab.run.fitting import fit

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


@pytest.fixture(scope="module")
def base(root: Path) -> Path:
    """A tiny pixel-space text-to-image run: the base the adapters fine-tune."""
    cfg = compose_config(
        [*T2I_PIXEL_16, *SMALL_WORLD, "trainer.max_steps=4", "trainer.val_check_interval=4"], root / "base"
    )
    fit(cfg)
    return Path(cfg.paths.checkpoint_dir)


def lora_run(root: Path, base: Path, name: str, steps: int, *extra: str) -> Path:
    cfg = compose_config(
        [
            *T2I_PIXEL_16,
            *SMALL_WORLD,
            f"stage.init_weights={base}",
            "+stage.lora={rank: 4, alpha: 8}",
            "stage.optimizer.lr=3e-3",
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=3",
            *extra,
        ],
        root / name,
    )
    fit(cfg)
    return Path(cfg.paths.checkpoint_dir)


def test_a_lora_run_trains_only_adapters_and_exports_them(root: Path, base: Path) -> None:
    run = lora_run(root, base, "lora", 6)
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    weights = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and v.numel() > 1]
    assert weights and all(".lora_" in k for k in weights)  # the frozen base is not in the checkpoint
    adapter = load_state_dict(run / "lora.safetensors")
    meta = json.loads((run / "lora.json").read_text())
    assert meta["base"] == str(base) and meta["lora"]["rank"] == 4
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)  # it trained
    assert not (run / "unet.safetensors").exists()

    base_gen, _ = load_generator(base)
    off, _ = load_generator(base, lora=run, lora_scale=0.0)
    on, _ = load_generator(run)  # the LoRA run's own folder finds its base in lora.json
    inputs = unet_inputs(base_gen.unet, int(base_gen.unet.context_dim))
    with torch.no_grad():
        y_base, y_off, y_on = base_gen.unet(*inputs), off.unet(*inputs), on.unet(*inputs)
    assert torch.equal(y_off, y_base)  # scale 0: the base model bit for bit
    assert not torch.allclose(y_on, y_base, atol=1e-6)
    base_state = load_state_dict(base / "unet.safetensors")
    for name, p in on.unet.named_parameters():  # the base under the adapters is the base export, untouched
        if ".base_layer." in name:
            assert torch.equal(p, base_state[name.replace(".base_layer.", ".")])

    from k3lab.convert.__main__ import main as convert

    assert convert(["merge-lora", str(run), "--out", str(root / "merged")]) == 0
    merged, _ = load_generator(root / "merged")
    assert set(load_state_dict(root / "merged" / "unet.safetensors")) == set(base_state)  # plain base keys
    with torch.no_grad():
        assert torch.allclose(merged.unet(*inputs), y_on, atol=1e-5)
    half = merge_lora(on.unet, scale=0.5)
    set_scale(off.unet, 0.0)
    assert not any(".lora_" in n for n, _ in half.named_parameters())
    assert convert(["merge-lora", str(run), "--base", str(base), "--out", str(base)]) == 2  # never over the base


def test_a_resumed_lora_run_continues_exactly(root: Path, base: Path, caplog: pytest.LogCaptureFixture) -> None:
    whole = lora_run(root, base, "whole", 6)
    first = lora_run(root, base, "split", 3)
    with caplog.at_level(logging.INFO, logger="k3lab.run.resume"):
        split = lora_run(root, base, "split", 6, "ckpt_path=last")
    assert f"resuming from {first / 'last.ckpt'}" in caplog.text  # the base from init_weights, adapters from here
    a, b = load_state_dict(whole / "lora.safetensors"), load_state_dict(split / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
