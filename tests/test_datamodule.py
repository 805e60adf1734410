"""The shard data module: bad samples and corrupt shards are skipped and counted; shuffling is seeded."""

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

from k3lab.data.batch import collate
from k3lab.data.datamodule import ShardDataModule
from k3lab.data.shards import ShardDataset, expand_urls, load_image


def png(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def good(key: str, caption: str = "a red square") -> list[tuple[str, bytes]]:
    return [(f"{key}.png", png()), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps({"k": key}).encode())]


@pytest.fixture
def bad_shard(tmp_path: Path) -> Path:
    members = good("000") + good("001")
    members += [("002.png", b"\x89PNG this is not an image"), ("002.txt", b"a broken image")]  # undecodable
    members += [("003.png", png())]  # no caption
    members += [("004.png", png()), ("004.txt", b"   \n")]  # empty caption
    members += [("005.txt", b"caption without an image")]  # no image
    members += [("006.png", png((20, 20))), ("006.txt", b"too small")]  # below min size
    members += good("007", "a blue circle")
    return write_shard(tmp_path / "bad-000.tar", members)


def run(dataset: ShardDataset) -> tuple[list[str], dict[str, int]]:
    keys, skipped = [], {}
    for batch in torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate):
        keys += batch["key"]
        for k, v in batch["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return keys, skipped


def test_bad_samples_are_skipped_and_counted(bad_shard: Path) -> None:
    ds = ShardDataset([str(bad_shard)], resolution=32, format={"min_image_size": 32}, order={"shuffle": False})
    keys, skipped = run(ds)
    assert keys == ["bad-000.tar/000", "bad-000.tar/001", "bad-000.tar/007"]
    assert skipped == {
        "undecodable_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "missing_image": 1,
        "image_too_small": 1,
    }


def test_truncated_shard_is_counted_and_the_next_shard_still_read(bad_shard: Path, tmp_path: Path) -> None:
    whole = write_shard(tmp_path / "ok-000.tar", good("100") + good("101") + good("102"))
    data = whole.read_bytes()
    truncated = tmp_path / "trunc-000.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])
    later = write_shard(tmp_path / "ok-001.tar", good("200") + good("201"))
    ds = ShardDataset([str(truncated), str(later)], 32, format={"min_image_size": 32}, order={"shuffle": False})
    keys, skipped = run(ds)
    assert keys[-2:] == ["ok-001.tar/200", "ok-001.tar/201"]
    assert skipped.get("corrupt_shard") == 1
    assert all(k.startswith(("trunc-000.tar/", "ok-001.tar/")) for k in keys)


def test_batch_contents(bad_shard: Path) -> None:
    ds = ShardDataset([str(bad_shard)], resolution=32, format={"min_image_size": 32}, order={"shuffle": False})
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (2, 3, 32, 32)
    red = torch.tensor([200, 10, 10]) / 127.5 - 1
    assert torch.allclose(batch["image"][0, :, 16, 16], red, atol=1e-2)
    assert batch["caption"] == ["a red square", "a red square"]
    assert batch["metadata"] == [{"k": "000"}, {"k": "001"}]


def test_resize_and_centre_crop_keep_left_and_right() -> None:
    """A 128x64 image, left half red and right half blue -> 32x32 centre crop: left still red (no flips)."""
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    img.paste((0, 0, 255), (64, 0, 128, 64))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = load_image(buf.getvalue(), 32)
    assert x.shape == (3, 32, 32)
    assert x[0, 16, 2] > 0.9 and x[2, 16, 2] < -0.9  # left edge red
    assert x[2, 16, 29] > 0.9 and x[0, 16, 29] < -0.9  # right edge blue


def test_shards_split_by_rank_and_worker_cover_everything_once(tmp_path: Path) -> None:
    urls = [str(write_shard(tmp_path / f"s-{i:03d}.tar", good(f"{i}00"))) for i in range(8)]
    seen = []
    for rank in range(2):
        ds = ShardDataset(urls, resolution=32, order={"seed": 5, "rank": rank, "world_size": 2})
        for worker in range(2):
            seen += ds.my_urls(worker, 2)
    assert sorted(seen) == sorted(urls)


def test_shuffling_is_seeded_and_changes_per_epoch(tmp_path: Path) -> None:
    urls = [str(write_shard(tmp_path / f"s-{i:03d}.tar", good(f"{i}00") + good(f"{i}01"))) for i in range(6)]
    a, b = (ShardDataset(urls, 32, order={"seed": 1, "shuffle_buffer": 4}) for _ in range(2))
    order_a = [s["key"] for s in a]
    assert order_a == [s["key"] for s in b]
    assert sorted(order_a) == sorted(f"s-{i:03d}.tar/{i}0{j}" for i in range(6) for j in range(2))
    b.set_epoch(1)
    assert [s["key"] for s in b] != order_a


def test_datamodule_over_brace_pattern_and_epoch_loader(tmp_path: Path) -> None:
    for i in range(3):
        write_shard(tmp_path / f"d-{i:03d}.tar", good(f"{i}00") + good(f"{i}01"))
    dm = ShardDataModule(
        shards={"train": str(tmp_path / "d-{000..002}.tar"), "val": str(tmp_path / "d-000.tar")},
        resolution=32,
        batch_size=2,
        format={"min_image_size": 32},
        seed=3,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = [k for b in loader for k in b["key"]]
    second = [k for b in loader for k in b["key"]]
    assert sorted(first) == sorted(second) and len(first) == 6
    assert first != second  # a new epoch reshuffles
    assert [k for b in dm.val_dataloader() for k in b["key"]] == ["d-000.tar/000", "d-000.tar/001"]


def test_missing_shard_is_a_clear_error(tmp_path: Path) -> None:
    dm = ShardDataModule(shards={"train": str(tmp_path / "missing-{000..001}.tar")}, resolution=32)
    with pytest.raises(FileNotFoundError, match=r"data\.shards\.train: 2 of 2 shard\(s\) missing"):
        dm.setup("fit")


def test_expand_urls() -> None:
    assert expand_urls("a-{00..02}.tar") == ["a-00.tar", "a-01.tar", "a-02.tar"]
    assert expand_urls(["x.tar", "pipe:cat y-{0..1}.tar"]) == ["x.tar", "pipe:cat y-0.tar", "pipe:cat y-1.tar"]


def test_pipe_urls_are_read(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p-000.tar", good("000") + good("001"))
    ds = ShardDataset([f"pipe:cat {shard}"], resolution=32, format={"min_image_size": 32}, order={"shuffle": False})
    assert [s["caption"] for s in ds] == ["a red square", "a red square"]


def test_scene_world_through_the_datamodule(tmp_path: Path) -> None:
    from k3lab.data.scene_world import SceneWorld

    world = SceneWorld(root=str(tmp_path), num_train=40, num_val=8, num_test=8, num_heldout=8, shard_size=10)
    dm = ShardDataModule(source=world, resolution=64, batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 64, 64)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert all(m["caption"] == c for m, c in zip(batch["metadata"], batch["caption"], strict=False))
    held = [b for b in dm.split_dataloader("heldout")]
    assert sum(len(b["key"]) for b in held) == 8
    assert np.all([m["split"] == "heldout" for b in held for m in b["metadata"]])


def test_the_in_memory_path_yields_the_same_batches_as_the_shard_path(bad_shard: Path, tmp_path: Path) -> None:
    """data.in_memory=true: identical batches (keys, images bit for bit, captions, skip counts) for the same seed,
    over three epochs; from the second epoch on no shard is opened."""
    from k3lab.data import shards as shards_module

    whole = write_shard(tmp_path / "ok-000.tar", good("100") + good("101") + good("102", "a green cross"))
    data = whole.read_bytes()
    truncated = tmp_path / "trunc-000.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])
    more = [write_shard(tmp_path / f"m-{i:03d}.tar", good(f"{i}0") + good(f"{i}1") + good(f"{i}2")) for i in range(3)]
    urls = [str(bad_shard), str(truncated), *map(str, more)]

    def loader(in_memory: bool) -> ShardDataModule:
        dm = ShardDataModule(shards={"train": urls}, resolution=32, batch_size=3, format={"min_image_size": 32}, seed=5,
                             shuffle_buffer=4, in_memory=in_memory)  # fmt: skip
        dm.setup("fit")
        return dm.train_dataloader()

    streamed, cached = loader(False), loader(True)
    opened = []
    real_open = shards_module._open
    for epoch in range(3):
        if epoch:
            shards_module._open = lambda url: opened.append(url) or real_open(url)  # noqa: E731
        try:
            a, b = list(streamed), list(cached)
        finally:
            shards_module._open = real_open
        assert len(a) == len(b) > 2
        for x, y in zip(a, b, strict=True):
            assert x["key"] == y["key"] and x["caption"] == y["caption"] and torch.equal(x["image"], y["image"])
            assert x["skipped"] == y["skipped"] and x["metadata"] == y["metadata"]
        if epoch:
            assert len(opened) == len(urls)  # the shard path re-read every shard; the in-memory one none
            opened.clear()
    assert sum(sum(b["skipped"].values()) for b in a) >= 5  # bad samples and the truncated shard, counted each pass


def test_several_ranks_train_on_disjoint_shards_in_endless_streams_and_read_evaluation_splits_whole(
    tmp_path: Path,
) -> None:
    """With 2 ranks: each pass the shards are reshuffled and split, disjoint between the ranks; a rank's stream plays
    pass after pass (it never runs dry before the other); the first pass equals the single-pass stream; the val
    split is read whole by both; too few shards or no step budget are refused by name."""
    from types import SimpleNamespace

    urls = [str(write_shard(tmp_path / f"s-{i:03d}.tar", good(f"{i}0") + good(f"{i}1"))) for i in range(4)]
    val = str(write_shard(tmp_path / "v-000.tar", good("v0") + good("v1") + good("v2")))

    def module(rank: int, max_steps: int = 100, num_workers: int = 0) -> ShardDataModule:
        dm = ShardDataModule(shards={"train": urls, "val": val}, resolution=32, batch_size=2,
                             format={"min_image_size": 32}, seed=3, shuffle_buffer=2,
                             num_workers=num_workers)  # fmt: skip
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, max_steps=max_steps)  # type: ignore[assignment]
        dm.setup("fit")
        return dm

    ranks = [module(0), module(1)]
    keys = []
    for dm in ranks:
        stream = iter(dm.train_dataloader())
        batches = [next(stream) for _ in range(7)]  # 14 samples from 4: three and a half passes, no StopIteration
        keys.append([k for b in batches for k in b["key"]])
        assert [b["key"] for b in dm.val_dataloader()] == [[f"v-000.tar/v{i}" for i in range(2)], ["v-000.tar/v2"]]
    for start in (0, 4, 8):  # pass by pass (shards reshuffled, then split): the ranks' shards are disjoint, 2 each
        mine = [{k.split("/")[0] for k in ks[start : start + 4]} for ks in keys]
        assert len(mine[0]) == len(mine[1]) == 2 and not mine[0] & mine[1]
    assert len({tuple(keys[0][i : i + 4]) for i in (0, 4, 8)}) > 1  # a new order each pass
    single = ShardDataset(
        urls, 32, {"min_image_size": 32}, {"seed": 3, "shuffle_buffer": 2, "rank": 0, "world_size": 2}
    )
    assert [s["key"] for s in single] == keys[0][:4]  # pass 0 of the endless stream = epoch 0's stream
    with pytest.raises(ValueError, match="give at least 6 shards"):
        module(0, num_workers=3)
    with pytest.raises(ValueError, match="trainer.max_steps=-1"):
        module(0, max_steps=-1)


def test_precomputed_latents_train_without_decoding_their_images(tmp_path: Path) -> None:
    """data.format.decode_images=false: the same batches (keys, latents, text, skip counts) as with decoding, image
    None; a too-small image is still skipped by its header; without latents the option is refused by name."""

    def npy(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array)
        return buf.getvalue()

    def sample(key: str, size: tuple[int, int] = (64, 64)) -> list[tuple[str, bytes]]:
        rng = np.random.default_rng(int(key))
        return [(f"{key}.png", png(size)), (f"{key}.txt", b"a red square"),
                (f"{key}.text.npy", npy(rng.standard_normal((3, 8)).astype(np.float32))),
                (f"{key}.latent.npy", npy(rng.standard_normal((4, 8, 8)).astype(np.float32)))]  # fmt: skip

    urls = [
        str(
            write_shard(
                tmp_path / f"p-{i:03d}.tar", sum((sample(f"{i}{j}") for j in range(3)), sample(f"{i}9", (20, 20)))
            )
        )
        for i in range(1, 3)
    ]

    def batches(decode: bool) -> list:
        features = {"feature_keys": ["text.npy", "latent.npy"], "decode_images": decode}
        dm = ShardDataModule(shards={"train": urls}, resolution=32, batch_size=2, seed=1, shuffle_buffer=3,
                             format=features, in_memory=True)  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [b for _ in range(2) for b in loader]  # two passes: the in-memory replay too

    with_images, without = batches(True), batches(False)
    assert len(with_images) == len(without) == 6
    for a, b in zip(with_images, without, strict=True):
        assert a["image"] is not None and b["image"] is None
        assert a["key"] == b["key"] and a["skipped"] == b["skipped"]
        assert torch.equal(a["latent"], b["latent"]) and torch.equal(a["text_embedding"], b["text_embedding"])
    assert sum(b["skipped"].get("image_too_small", 0) for b in without) == 4  # 2 shards x 2 passes
    with pytest.raises(ValueError, match="decode_images=false needs precomputed latents"):
        ShardDataModule(shards={"train": urls}, format={"feature_keys": ["text.npy"], "decode_images": False})


def mixed_shard(path: Path) -> tuple[Path, dict[str, str]]:
    """A shard of wide, tall and square images (plus a corrupt one); returns it and each key's expected bucket."""
    sizes = {"wide": (96, 48), "tall": (40, 80), "square": (50, 50), "nearly_wide": (70, 40)}
    expected = {"wide": "16x32", "tall": "32x16", "square": "24x24", "nearly_wide": "16x32"}
    members, want = [], {}
    for i in range(24):
        kind = list(sizes)[i % 4]
        key = f"{i:03d}"
        members += [(f"{key}.png", png(sizes[kind])), (f"{key}.txt", kind.encode())]
        want[f"{path.name}/{key}"] = expected[kind]
    members += [("099.png", b"\x89PNG broken"), ("099.txt", b"corrupt")]
    return write_shard(path, members), want


def test_aspect_buckets_give_one_shape_per_batch_chosen_per_sample_and_counted(tmp_path: Path) -> None:
    from k3lab.data.shards import aspect_buckets
    from k3lab.run.callbacks import DataQuality

    assert aspect_buckets(24, [2.0, 1.0, 0.5], 8) == [(32, 16), (24, 24), (16, 32)]
    shard, want = mixed_shard(tmp_path / "mixed-000.tar")
    dm = ShardDataModule(
        shards={"train": str(shard), "val": str(shard)},
        resolution=24,
        batch_size=3,
        format={"min_image_size": 16},
        shuffle_buffer=8,
        aspect_buckets={"ratios": [0.5, 1.0, 2.0], "multiple": 8},
    )
    dm.setup()
    batches = list(dm.train_dataloader())
    # 24 good samples: 12 wide (incl. 70x40, nearer 2:1 than 1:1), 6 tall, 6 square -> 8 full batches, nothing left
    assert sum(len(b["caption"]) for b in batches) == 24
    seen = set()
    for b in batches:
        h, w = map(int, b["bucket"].split("x"))
        assert b["image"].shape == (3, 3, h, w)
        assert all(want[k] == b["bucket"] for k in b["key"])
        seen.update(b["key"])
    assert seen == set(want)
    assert sum(b["skipped"].get("undecodable_image", 0) for b in batches) == 1
    # a 2:1 image in the 2:1 bucket is resized whole (both ends kept); in a square bucket its middle is kept
    img = Image.new("RGB", (96, 48), (255, 0, 0))
    img.paste((0, 0, 255), (48, 0, 96, 48))
    img.paste((0, 255, 0), (0, 0, 8, 48))  # a green strip at the left end
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    whole, square = load_image(buf.getvalue(), (16, 32)), load_image(buf.getvalue(), 24)
    assert whole.shape == (3, 16, 32) and whole[1, 8, 0] > 0.9 and whole[2, 8, -1] > 0.9
    assert square.shape == (3, 24, 24) and square[1, 12, 0] < -0.9 and square[0, 12, 0] > 0.9
    # evaluation splits stay square at the resolution
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[-2:] == (24, 24) and "bucket" not in val

    class Trainer:
        loggers: list = []
        global_step = 0

    quality = DataQuality()
    for b in batches:
        quality.on_train_batch_start(Trainer(), None, b, 0)  # type: ignore[arg-type]
    assert dict(quality.buckets["train"]) == {"16x32": 12, "32x16": 6, "24x24": 6}


def test_a_resumed_bucketed_pass_replays_the_same_batches(tmp_path: Path) -> None:
    shard, _ = mixed_shard(tmp_path / "mixed-000.tar")

    def loader():
        dm = ShardDataModule(
            shards={"train": str(shard)},
            resolution=24,
            batch_size=3,
            format={"min_image_size": 16},
            aspect_buckets={"ratios": [0.5, 1.0, 2.0], "multiple": 8},
        )
        dm.setup()
        return dm.train_dataloader()

    full = [b["key"] for b in loader()]
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "batches": 3})
    assert [b["key"] for b in resumed] == full[3:]


def test_bad_bucket_configs_are_refused_by_name(tmp_path: Path) -> None:
    shard, _ = mixed_shard(tmp_path / "mixed-000.tar")
    for buckets, match in (
        ({"ratios": [0.0, 1.0], "multiple": 8}, "ratios"),
        ({"ratios": [1.0], "multiple": 64}, "multiple"),
        ({"ratio": [1.0]}, "unknown key"),
    ):
        with pytest.raises(ValueError, match=match):
            ShardDataModule(shards={"train": str(shard)}, resolution=24, aspect_buckets=buckets)
    with pytest.raises(ValueError, match="precomputed latents"):
        ShardDataModule(
            shards={"train": str(shard)},
            resolution=24,
            format={"feature_keys": ["latent.npy"]},
            aspect_buckets={"ratios": [1.0], "multiple": 8},
        )


def test_skips_are_summarised_not_flooded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Per reason, the first `skip_examples` skips are logged with their file, then only counted: one summary line
    every `skip_summary_every` skips, and a table at the end of the pass; the run's totals land in the run folder."""
    from types import SimpleNamespace

    from k3lab.run.callbacks import DataQuality

    members = good("000")
    for i in range(1, 26):
        members += [(f"{i:03d}.png", b"not an image"), (f"{i:03d}.txt", b"broken")]
    for i in range(26, 38):
        members += [(f"{i:03d}.png", png())]  # no caption
    members += good("038")
    shard = write_shard(tmp_path / "noisy-000.tar", members)
    fmt = {"skip_examples": 2, "skip_summary_every": 10}
    ds = ShardDataset([str(shard)], resolution=32, format=fmt, order={"shuffle": False})
    ds.skip_log.name = "train"
    with caplog.at_level(logging.WARNING, logger="k3lab.data.skips"):
        keys, skipped = run(ds)
    assert keys == ["noisy-000.tar/000", "noisy-000.tar/038"] and skipped == {
        "undecodable_image": 25,
        "missing_caption": 12,
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "k3lab.data.skips"]
    by_file = [m for m in lines if ": skipping noisy-000.tar/" in m]
    assert by_file == [
        "train: skipping noisy-000.tar/001: undecodable_image",
        "train: skipping noisy-000.tar/002: undecodable_image"
        " (later 'undecodable_image' skips are counted, not logged)",
        "train: skipping noisy-000.tar/026: missing_caption",
        "train: skipping noisy-000.tar/027: missing_caption (later 'missing_caption' skips are counted, not logged)",
    ]
    summaries = [m for m in lines if "samples skipped so far" in m]
    assert [m.split(":")[1].strip().split()[0] for m in summaries] == ["10", "20", "30"]
    tables = [m for m in lines if m.startswith("skipped samples: train, pass 0")]
    assert len(tables) == 1 and "(37 in all)" in tables[0]
    assert "| undecodable_image | 25 | noisy-000.tar/001, noisy-000.tar/002 |" in tables[0]
    assert "| missing_caption | 12 | noisy-000.tar/026, noisy-000.tar/027 |" in tables[0]
    assert len(lines) == 4 + 3 + 1  # not one line per bad file

    quality = DataQuality()
    trainer = SimpleNamespace(loggers=[], global_step=0, is_global_zero=True, default_root_dir=str(tmp_path / "run"))
    quality._update(trainer, {"skipped": skipped, "caption": ["a"]}, "train")  # type: ignore[arg-type]
    quality.on_train_end(trainer, None)  # type: ignore[arg-type]
    written = (tmp_path / "run" / "skipped_samples.md").read_text()
    assert "train, the whole run (37 in all)" in written and "| undecodable_image | 25 |" in written
    with pytest.raises(ValueError, match="skip_summary_every=0"):
        ShardDataset([str(shard)], resolution=32, format={"skip_summary_every": 0})
