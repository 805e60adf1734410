"""PickScore and HPSv2 from local files in their published layouts, checked against each formula computed by hand on
small random models (no download, no reference package: hpsv2 pins pytest 7.2 and protobuf < 4, and its ``score``
fetches ViT-H-14 from the hub before reading a local checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation import metrics
from evaluation.images import ImageRecord
from evaluation.preference import load_hpsv2, load_pickscore, sha256_file, sha256_files
from evaluation.reference_clip import NAME, OPENAI_MEAN, OPENAI_STD, model_config


def clip_tokenizer():  # the real CLIP BPE (shipped inside open_clip) as a transformers tokenizer
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in st.encoder.items()}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in sorted(st.bpe_ranks, key=st.bpe_ranks.get)])


def save_pickscore(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random CLIPModel + CLIP processor in PickScore_v1's layout (save_pretrained)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=16,
        logit_scale_init_value=4.6052,  # PickScore's trained temperature is ~100 (exp 4.6)
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=clip_tokenizer(),
    )
    processor.save_pretrained(folder)
    return folder


def test_pickscore_is_temperature_times_cosine_of_the_published_pipeline(tmp_path: Path) -> None:
    from transformers import CLIPModel

    folder = save_pickscore(tmp_path / "pickscore")
    scorer = load_pickscore(folder)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    prompts = ["a red circle", "two blue squares", "a cat on a mat", "x" * 400, "a green triangle above a star"]
    got = scorer.score(images, prompts)
    # by hand: 32 px images need no resize or crop, so pixels = (x / 255 - mean) / std; text = CLIP BPE, 77 tokens
    model = CLIPModel.from_pretrained(folder).eval()
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    tok = clip_tokenizer()(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
        txt = model.text_projection(model.text_model(**tok).pooler_output)
    expected = model.logit_scale.exp() * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    assert got == pytest.approx(expected.tolist(), abs=1e-4)
    assert scorer.scale == pytest.approx(100.0, rel=1e-3)  # the temperature multiplies, as in the authors' snippet
    assert scorer.weights_sha256 == sha256_files([folder / "model.safetensors"])


def test_pickscore_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="PickScore model: folder not found"):
        load_pickscore(tmp_path / "nope")
    folder = save_pickscore(tmp_path / "p")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no \*\.safetensors"):
        load_pickscore(folder)


def save_hpsv2(tmp_path: Path, image_size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random open_clip model saved as HPSv2 does: ``{"state_dict": ...}`` in a .pt file."""
    import open_clip

    config = tmp_path / f"{NAME}.json"
    config.write_text(json.dumps(model_config(image_size)))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(NAME)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, config


def test_hpsv2_is_the_cosine_after_resize_longest_and_black_padding(tmp_path: Path) -> None:
    import open_clip

    path, config = save_hpsv2(tmp_path)
    scorer = load_hpsv2(path, config=config)
    assert scorer.weights_sha256 == sha256_file(path)
    model = open_clip.create_model(NAME)
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    model.eval()
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (24, 48, 3), dtype=np.uint8)  # H 24, W 48: longer side -> 32, height 16, pad 8 + 8
    square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "two blue squares"]
    got = scorer.score([wide, square], prompts)
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)

    def by_hand(image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(16, 32), mode="bicubic", antialias=True, align_corners=False)
            x = torch.cat([torch.zeros(1, 3, 8, 32), x, torch.zeros(1, 3, 8, 32)], dim=2)  # black, then normalised
        return ((x[0] - mean) / std)[None]

    with torch.no_grad():
        img = torch.cat([model.encode_image(by_hand(wide)), model.encode_image(by_hand(square))])
        txt = model.encode_text(open_clip.get_tokenizer(NAME)(prompts))
    expected = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)  # no temperature: HPSv2 is the cosine
    assert got == pytest.approx(expected.tolist(), abs=1e-4)


def test_hpsv2_bad_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="HPSv2 checkpoint not found"):
        load_hpsv2(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match="not an HPSv2 checkpoint"):
        load_hpsv2(bad)


def test_preference_scores_are_registry_metrics(tmp_path: Path) -> None:
    path, config = save_hpsv2(tmp_path)
    rng = np.random.default_rng(2)
    records = [ImageRecord(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), f"p{i}", f"prompt {i}") for i in range(3)]
    inputs = metrics.EvalInputs(samples={"seen": records}, settings={"hpsv2": str(path), "hpsv2_config": str(config)})
    out = metrics.compute(["hpsv2"], inputs)
    per = inputs.per_image["seen"]["hpsv2"]
    expected = load_hpsv2(path, config=config).score([r.image for r in records], [r.prompt for r in records])
    assert per == pytest.approx(expected, abs=1e-5) and out["eval/hpsv2"] == pytest.approx(np.mean(expected))
    with pytest.raises(ValueError, match=r"metric 'pickscore' needs settings\['pickscore'\]"):
        metrics.compute(["pickscore"], metrics.EvalInputs(samples={"seen": records}))
