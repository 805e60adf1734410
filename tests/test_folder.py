"""data=folder: a folder of captioned images (sidecar .txt/.caption, metadata.jsonl/captions.jsonl, metadata.csv) is
packed once into shards and read like any shards (buckets, counted skips, repeats, held-out images), and a diffusion
stage trains on it end to end."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from k3lab.data.datamodule import ShardDataModule
from k3lab.data.folder import ImageFolder
from k3lab.run.config import compose


def image(size: tuple[int, int], fmt: str, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """12 images in 4 formats and 3 caption layouts, one corrupt, one without a caption, a non-image file."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i in range(4):
        (root / f"wide_{i}.jpg").write_bytes(image((96, 48), "JPEG"))
        (root / f"wide_{i}.txt").write_text(f"a wide red photo {i}\n")
    for i in range(3):
        (root / f"tall_{i}.png").write_bytes(image((40, 80), "PNG", (20, 200, 20)))
        (root / f"tall_{i}.caption").write_text(f"a tall green photo {i}")
    (root / "sub" / "square.webp").write_bytes(image((64, 64), "WEBP"))
    (root / "sub" / "square.bmp").write_bytes(image((64, 64), "BMP"))
    (root / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "square.webp", "text": "a square webp"})
        + "\n"
        + json.dumps({"file_name": "square.bmp", "caption": "a square bmp"})
        + "\n"
    )
    (root / "from_csv.png").write_bytes(image((64, 48), "PNG"))
    (root / "metadata.csv").write_text('file_name,text\nfrom_csv.png,"a photo, captioned in a csv"\n')
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "broken.txt").write_text("a broken file")
    (root / "uncaptioned.png").write_bytes(image((64, 64), "PNG"))
    (root / "notes.md").write_text("not an image")
    (root / ".hidden" / "skip.png").write_bytes(image((64, 64), "PNG"))
    return root


def datamodule(source: ImageFolder, batch_size: int = 2) -> ShardDataModule:
    return ShardDataModule(
        source=source,
        resolution=32,
        batch_size=batch_size,
        format={"image_keys": ["jpg", "jpeg", "png", "webp", "bmp"], "min_image_size": 0, "skip_examples": 5},
        aspect_buckets={"ratios": [0.5, 1.0, 2.0], "multiple": 16},
        shuffle_buffer=0,
    )


def test_a_folder_becomes_shards_with_every_caption_layout(photos: Path, tmp_path: Path, caplog) -> None:
    source = ImageFolder(photos, tmp_path / "packed", resolution=32, repeats=3, shard_size=4)
    urls = source.build()
    assert len(source.images()) == 12  # .hidden/ and notes.md left out
    assert set(urls) == {"train"} and len(urls["train"]) == 3 * 3  # 12 images in shards of 4, listed 3 times
    dm = datamodule(source)
    dm.setup("fit")
    captions, shapes, skipped = {}, set(), {}
    for batch in dm.datasets["train"]._iterate(dm.split_urls()["train"][:3], np.random.default_rng(0), "p"):
        captions[json.dumps(batch["metadata"])] = batch["caption"]
        shapes.add(tuple(batch["image"].shape[1:]))
        for k, v in batch["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    by_file = {json.loads(k)["file"]: v for k, v in captions.items()}
    assert by_file["wide_0.jpg"] == "a wide red photo 0" and by_file["tall_2.png"] == "a tall green photo 2"
    assert by_file["sub/square.webp"] == "a square webp" and by_file["sub/square.bmp"] == "a square bmp"
    assert by_file["from_csv.png"] == "a photo, captioned in a csv"
    assert len(by_file) == 10 and skipped == {"undecodable_image": 1, "missing_caption": 1}
    assert shapes == {(16, 48), (48, 16), (32, 32)}  # wide, tall, square: each in its bucket (h, w)
    mtime = (Path(urls["train"][0])).stat().st_mtime_ns
    assert source.build() == urls and Path(urls["train"][0]).stat().st_mtime_ns == mtime  # packed once
    (photos / "new.png").write_bytes(image((64, 64), "PNG"))
    (photos / "new.txt").write_text("a new photo")
    assert source.build() != urls  # a changed folder is packed again


def test_held_out_images_repeats_and_bad_folders(photos: Path, tmp_path: Path) -> None:
    source = ImageFolder(photos, tmp_path / "packed", resolution=32, val_count=3, shard_size=100)
    urls = source.build()
    assert len(urls["train"]) == 1 and len(urls["val"]) == 1
    again = ImageFolder(photos, tmp_path / "other", resolution=32, val_count=3, shard_size=100).build()
    held = sorted(n for n in tarfile.open(urls["val"][0]).getnames() if n.endswith(".json"))
    assert held == sorted(n for n in tarfile.open(again["val"][0]).getnames() if n.endswith(".json"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolder(tmp_path / "nope", tmp_path / "packed")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(empty, tmp_path / "packed").build()
    (photos / "captions.jsonl").write_text('{"file_name": "wide_0.jpg"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:1: needs file_name and text"):
        ImageFolder(photos, tmp_path / "packed").build()
    with pytest.raises(ValueError, match="repeats=0"):
        ImageFolder(photos, tmp_path / "packed", repeats=0)


def test_an_unreadable_file_is_counted_when_packing(
    photos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (photos / "locked.png").write_bytes(image((64, 64), "PNG"))
    read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:  # a file the OS refuses (permissions, a dead network mount)
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied")
        return read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    source = ImageFolder(photos, tmp_path / "packed")
    with caplog.at_level(logging.WARNING):
        urls = source.build()
    assert source.skipped == {"unreadable_file": 1}
    assert "skipping locked.png (Permission denied): unreadable_file" in caplog.text
    assert len(urls["train"]) == 1  # the other 12 images packed


def test_a_diffusion_stage_trains_on_a_folder(photos: Path, tmp_path: Path) -> None:
    from k3lab.run.fitting import fit

    cfg = compose(
        [
            "experiment=text2image_tiny",
            "data=folder",
            f"data.source.path={photos}",
            f"paths.root_dir={tmp_path}",
            "data.resolution=32",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.aspect_buckets.multiple=16",
            "data.source.repeats=2",
            "stage.first_stage.checkpoint=null",
            "model.unet.in_channels=3",
            "model.unet.out_channels=3",
            "stage.latent_scale=1.0",
            "model/text_encoder=t5_tiny",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=0",
            "logger=csv",
        ],
        output_dir=tmp_path / "run",
    )
    fit(cfg)
    losses = [line for line in (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[1:] if line]
    assert losses and all("nan" not in line for line in losses)
    assert "undecodable_image" in (tmp_path / "run" / "skipped_samples.md").read_text()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_thousand_broken_files_give_a_summary_not_a_thousand_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 broken files out of 1,100 (600 undecodable, 400 without a caption): the counts per reason are exact and the
    log holds a bounded number of lines: 3 files per reason, one summary line per 1,000 skips, one table per pass."""
    folder = tmp_path / "noisy"
    folder.mkdir()
    small = image((64, 64), "PNG")
    for i in range(1100):
        if i % 11 == 0:  # 100 good ones
            (folder / f"{i:04d}.png").write_bytes(small)
            (folder / f"{i:04d}.txt").write_text("a red circle")
        elif i % 11 <= 6:  # 600 undecodable
            (folder / f"{i:04d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
            (folder / f"{i:04d}.txt").write_text("a broken photo")
        else:  # 400 without a caption
            (folder / f"{i:04d}.png").write_bytes(small)
    dm = datamodule(ImageFolder(folder, tmp_path / "packed", resolution=32))
    dm.setup("fit")
    dm.datasets["train"].skip_log.examples_per_reason = 3
    with caplog.at_level(logging.INFO):
        kept, skipped = 0, {}
        for sample in dm.datasets["train"]._iterate(dm.split_urls()["train"], np.random.default_rng(0), "pass 0"):
            kept += 1
            for k, v in sample["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
    counted = dm.datasets["train"].skip_log.total  # every skip of the pass, by reason
    assert kept == 100 and counted == {"undecodable_image": 600, "missing_caption": 400}
    assert all(skipped[k] <= counted[k] for k in skipped)  # the batches carry those before their last sample
    lines = [r for r in caplog.records if r.name == "k3lab.data.skips"]
    assert len(lines) == 3 + 3 + 1 + 1, [r.getMessage()[:80] for r in lines]  # files, summary at 1,000, the table
    assert any("1000 samples skipped so far" in r.getMessage() for r in lines)


def test_precompute_caches_a_folder_and_training_reads_it(photos: Path, tmp_path: Path) -> None:
    """``python -m k3lab.precompute`` over data=folder writes each image once (repeats aside) with its text embedding,
    whatever its format; data=precomputed then trains on the embeddings without the text encoder."""
    from k3lab.data.precompute import precompute
    from k3lab.run.fitting import fit

    common = [f"paths.root_dir={tmp_path}", "model/text_encoder=t5_tiny", "data.resolution=32"]
    cfg = compose(
        [
            "experiment=text2image_tiny",
            "data=folder",
            f"data.source.path={photos}",
            "data.source.repeats=3",
            "data.aspect_buckets=null",
            *common,
        ],
        output_dir=tmp_path / "pc",
    )
    out = precompute(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 10 and manifest["skipped"]["train"] == {
        "undecodable_image": 1,
        "missing_caption": 1,
    }
    train = compose(
        [
            "experiment=text2image_tiny",
            "data=precomputed",
            "stage.text_encoder=null",
            *common,
            "stage.first_stage.checkpoint=null",
            "model.unet.in_channels=3",
            "model.unet.out_channels=3",
            "stage.latent_scale=1.0",
            "data.batch_size=2",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            "trainer.val_check_interval=2",
            "logger=csv",
        ],
        output_dir=tmp_path / "run",
    )
    fit(train)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
