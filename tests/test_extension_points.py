"""The extension points, exercised the way a researcher would use them, without editing package files: a throwaway
U-Net block type, a text encoder from a family k3lab does not know, and a metric that the ablation report shows.
The classes below live in this test module; configs point at them with ``_target_`` (what a user's own module does)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from conftest import SMALL_WORLD, T2I_PIXEL_16, compose_config


class TwoConvBlock(nn.Module):
    """A residual block k3lab does not ship: conv -> time-conditioned shift -> conv, with the factory's signature."""

    def __init__(
        self, in_channels: int, out_channels: int, time_dim: int, groups: int = 32, resample: str | None = None
    ) -> None:
        super().__init__()
        self.resample = resample
        self.up = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2) if resample == "up" else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, stride=2 if resample == "down" else 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=2 if resample == "down" else 1)

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        h = F.silu(self.conv1(x)) + self.time(time_embed)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(h))


class CharEncoder(nn.Module):
    """A text encoder from no Hugging Face family: a learned-free embedding of each character (the contract: ``dim``
    and ``encode(prompts) -> (hidden [B, L, dim] float32, mask [B, L] bool)``)."""

    def __init__(self, dim: int = 24, max_length: int = 32) -> None:
        super().__init__()
        self.dim, self.max_length = dim, max_length
        self.table = nn.Embedding(128, dim)
        torch.nn.init.normal_(self.table.weight, generator=torch.Generator().manual_seed(0))

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [[min(ord(c), 127) for c in p[: self.max_length]] or [0] for p in prompts]
        length = max(map(len, ids)) + 1
        tokens = torch.tensor([row + [0] * (length - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids], dtype=torch.bool)
        with torch.no_grad():
            return self.table(tokens).float() * mask[..., None], mask


def _t2i(tmp_path: Path, data_root: Path, *overrides: str) -> DictConfig:
    base = [
        *T2I_PIXEL_16,
        f"paths.data_dir={data_root}",
        f"paths.weights_dir={tmp_path / 'weights'}",
        *SMALL_WORLD,
        "sampling.steps=2",
        "stage.validation.prompts=[a red circle]",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "model.unet.model_channels=32",
        "model.unet.init_channels=16",
    ]
    return compose_config([*base, *overrides], tmp_path)


def test_a_new_block_type_is_one_class(tmp_path: Path, data_root: Path) -> None:
    """Files touched to add a block: the class (here, this test module) and a YAML under conf/model/unet/block/ (here,
    the same node given on the command line)."""
    from k3lab.inference.loading import load_generator
    from k3lab.train import train

    cfg = _t2i(
        tmp_path, data_root, "model/unet/block=resnet", "model.unet.block._target_=test_extension_points.TwoConvBlock"
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    gen, _ = load_generator(cfg.paths.checkpoint_dir)
    blocks = [m for m in gen.unet.modules() if isinstance(m, TwoConvBlock)]
    assert len(blocks) >= 6 and {b.resample for b in blocks} >= {"up", "down", None}
    images = gen(["a red circle"], [0], 16, "ddim", 2, 3.0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_a_text_encoder_from_a_new_family_is_one_class(tmp_path: Path, data_root: Path) -> None:
    """Files touched to add an encoder: the class (here, this test module) and a YAML under conf/model/text_encoder/
    (here, the same node on the command line). Its width comes from the model: the config's dim is checked against
    it."""
    from k3lab.inference.loading import load_generator
    from k3lab.train import train

    enc = [
        "~model.text_encoder.encoder",
        "+model.text_encoder.encoder={_target_: test_extension_points.CharEncoder, dim: 24}",
    ]
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="outputs 24-d states but the config says 64"):
        train(_t2i(tmp_path / "wrong", data_root, *enc))  # t5_tiny's dim (64) left in place: named, before training
    cfg = _t2i(tmp_path, data_root, *enc, "model.text_encoder.dim=24")
    train(cfg)
    gen, _ = load_generator(cfg.paths.checkpoint_dir)
    assert isinstance(gen.text_encoder, CharEncoder) and not any(p.requires_grad for p in gen.text_encoder.parameters())
    a, b = gen.encode(["a red circle"], [0]), gen.encode(["a big circle"], [0])  # same length, other words
    assert a[0].shape == b[0].shape and not torch.allclose(a[0], b[0])  # the prompt reaches the U-Net's context
    assert gen(["a red circle"], [0], 16, "ddim", 2, 3.0).shape == (1, 3, 16, 16)


def test_a_new_metric_is_one_register_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files touched to add a metric: one ``register`` call (here) and its name in the preset's
    ablation.evaluation.metrics. The ablation evaluation computes it and the report tabulates it, as lower-is-better."""
    from evaluation import metrics as registry
    from k3lab.ablation.report import cells, default_metrics, effects, lower_is_better, markdown

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))  # the throwaway entry leaves with the test

    def mean_brightness(inputs: registry.EvalInputs) -> dict[str, float]:
        return {
            "darkness": float(
                1 - sum(r.image.mean() / 255 for r in inputs.samples["seen"]) / len(inputs.samples["seen"])
            )
        }

    registry.register(
        registry.Metric("darkness", mean_brightness, False, ("samples",), "1 - mean pixel value of the seen samples")
    )
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Metric("darkness", mean_brightness, False, ("samples",), "again"))
    import numpy as np

    from evaluation.images import ImageRecord

    seen = [ImageRecord(np.full((4, 4, 3), 51, dtype=np.uint8), "p", "a prompt")]
    assert registry.compute(["darkness"], registry.EvalInputs({"seen": seen})) == {"eval/darkness": pytest.approx(0.8)}
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        registry.compute(["darkness", "nope"], registry.EvalInputs({"seen": seen}))
    with pytest.raises(ValueError, match=r"needs \['reference_clip'"):
        registry.compute(["clip_score"], registry.EvalInputs({"seen": seen}))

    assert (
        "eval/darkness" in default_metrics()
        and lower_is_better("eval/darkness")
        and not lower_is_better("eval/clip_score")
    )
    runs = pd.DataFrame(
        [
            {"seed": s, "status": "FINISHED", "override/block": b, "eval/darkness": v}
            for s, (b, v) in enumerate([("big", 0.5), ("res", 0.7), ("big", 0.4), ("res", 0.8)])
        ]
    )
    runs["seed"] = [0, 0, 1, 1]
    metrics = [m for m in default_metrics() if m in runs]
    table, cell_table = effects(runs, metrics), cells(runs, metrics)
    assert table.iloc[0]["effect"] == pytest.approx(0.3) and "darkness" in markdown(runs, table, cell_table, metrics)
