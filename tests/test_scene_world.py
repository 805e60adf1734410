"""The scene world: deterministic bytes, disjoint splits, held-out combinations, captions that match the spec."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from k3lab.data.scene_spec import COLORS, SHAPES, SceneObject, relation_between
from k3lab.data.scene_world import SPLITS, SceneWorld

COUNTS = dict(num_train=300, num_val=60, num_test=60, num_heldout=60, shard_size=100)


def read_split(shards: list[str]) -> list[dict]:
    samples: dict[str, dict] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [samples[k] for k in sorted(samples)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    shards = SceneWorld(root=str(tmp_path_factory.mktemp("w")), seed=3, **COUNTS).build()
    return {split: read_split(shards[split]) for split in SPLITS}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = SceneWorld(root=str(tmp_path / "a"), seed=7, **COUNTS).build()
    b = SceneWorld(root=str(tmp_path / "b"), seed=7, **COUNTS).build()
    c = SceneWorld(root=str(tmp_path / "c"), seed=8, **COUNTS).build()

    def digest(paths: list) -> list[str]:
        return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]

    for split in SPLITS:
        assert digest(a[split]) == digest(b[split])
        assert digest(a[split]) != digest(c[split])


def test_build_is_cached_and_rebuilt_when_a_shard_is_lost(tmp_path: Path) -> None:
    world = SceneWorld(root=str(tmp_path), seed=1, **COUNTS)
    shards = world.build()
    first = Path(shards["train"][0])
    mtime = first.stat().st_mtime_ns
    assert world.build() == shards and first.stat().st_mtime_ns == mtime  # cached: nothing rewritten
    Path(shards["val"][0]).unlink()
    assert world.build() == shards and Path(shards["val"][0]).is_file()


def test_layout_is_img2dataset_style(world: dict[str, list[dict]]) -> None:
    counts = {s: len(world[s]) for s in SPLITS}
    assert counts == {"train": 300, "val": 60, "test": 60, "heldout": 60}
    for sample in world["train"][:20]:
        assert set(sample) == {"png", "txt", "json"}
        img = Image.open(io.BytesIO(sample["png"]))
        assert img.size == (64, 64) and img.mode == "RGB"
        meta = json.loads(sample["json"])
        assert meta["caption"] == sample["txt"].decode()
        assert 1 <= len(meta["objects"]) <= 4


def test_splits_are_disjoint(world: dict[str, list[dict]]) -> None:
    hashes = {s: {hashlib.sha256(x["png"]).hexdigest() for x in world[s]} for s in SPLITS}
    for s in SPLITS:
        assert len(hashes[s]) == len(world[s]), f"duplicate images inside {s}"
        for t in SPLITS:
            if s < t:
                assert not hashes[s] & hashes[t], f"{s} and {t} share images"


def test_heldout_pairs_never_in_training(world: dict[str, list[dict]]) -> None:
    held = {("red", "triangle"), ("green", "circle"), ("blue", "cross"), ("yellow", "square")}
    for split in ("train", "val", "test"):
        for sample in world[split]:
            pairs = {(o["color"], o["shape"]) for o in json.loads(sample["json"])["objects"]}
            assert not pairs & held, (split, pairs)
    for sample in world["heldout"]:
        pairs = {(o["color"], o["shape"]) for o in json.loads(sample["json"])["objects"]}
        assert pairs & held


def test_captions_match_the_scene(world: dict[str, list[dict]]) -> None:
    kinds = set()
    for sample in world["train"]:
        meta = json.loads(sample["json"])
        caption, objs = meta["caption"], meta["objects"]
        kinds.add(meta["kind"])
        for o in objs:
            assert o["color"] in caption  # every object's colour is named
        assert sum(caption.count(c) for c in COLORS) == (1 if meta["kind"] == "count" else len(objs))
        for rel in meta["relations"]:
            a, b = (
                SceneObject(**{k: objs[i][k] for k in ("shape", "color", "size", "x", "y", "radius")})
                for i in (rel["subject"], rel["object"])
            )
            assert relation_between(a, b) == rel["relation"]
        if meta["order"] == "left_to_right":
            xs = [o["x"] for o in objs]
            assert xs == sorted(xs) and caption.startswith("from left to right")
        if meta["kind"] == "count":
            assert len(objs) == meta["count"]["n"] and len({(o["color"], o["shape"]) for o in objs}) == 1
    assert kinds == {"single", "relation", "count", "multi"}


def test_pixels_show_the_specified_colours(world: dict[str, list[dict]]) -> None:
    """At each object's centre the rendered pixel is that object's colour (crosses and triangles included)."""
    for sample in world["train"][:100]:
        img = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.int32)
        for o in json.loads(sample["json"])["objects"]:
            x, y = int(o["x"] * 64), int(o["y"] * 64 + (0.15 * o["radius"] * 64 if o["shape"] == "triangle" else 0))
            assert np.abs(img[y, x] - np.array(COLORS[o["color"]])).max() < 40, (o, img[y, x])


def test_shapes_and_resolution_are_configurable(tmp_path: Path) -> None:
    shards = SceneWorld(root=str(tmp_path), resolution=32, num_train=10, num_val=2, num_test=2, num_heldout=2).build()
    sample = read_split(shards["train"])[0]
    assert Image.open(io.BytesIO(sample["png"])).size == (32, 32)
    assert len(SHAPES) >= 4 and len(COLORS) >= 6


def test_bad_generator_config_names_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"resolution=-4"):
        SceneWorld(root=str(tmp_path), resolution=-4)
    with pytest.raises(ValueError, match=r"heldout_pairs entry \['purple', 'circle'\]"):
        SceneWorld(root=str(tmp_path), heldout_pairs=[["purple", "circle"]])


def test_object_scale_draws_larger_shapes_and_keeps_other_worlds_keys(tmp_path: Path) -> None:
    """object_scale multiplies every radius (the spec, the bbox and the pixels agree); the default keeps the cache key
    of worlds written before the option existed; bad values name the option."""
    counts = dict(num_train=40, num_val=0, num_test=0, num_heldout=0, kind_weights={"single": 1.0})
    plain = SceneWorld(root=str(tmp_path / "a"), **counts)
    large = SceneWorld(root=str(tmp_path / "b"), object_scale=1.5, **counts)
    assert "object_scale" not in plain.spec() and large.spec()["object_scale"] == 1.5
    assert plain.directory.name != large.directory.name
    background = np.array([245, 245, 245])

    def areas(world: SceneWorld) -> tuple[list[float], list[float]]:
        radii, painted = [], []
        for sample in read_split(world.build()["train"]):
            meta = json.loads(sample["json"])
            radii.append(meta["objects"][0]["radius"])
            image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(int)
            painted.append(float((np.abs(image - background).sum(-1) > 60).mean()))
        return radii, painted

    (r_plain, a_plain), (r_large, a_large) = areas(plain), areas(large)
    assert set(np.round(r_large, 4)) == {round(0.09 * 1.5, 4), round(0.16 * 1.5, 4)}
    assert set(np.round(r_plain, 4)) == {0.09, 0.16}
    assert 1.8 < np.mean(a_large) / np.mean(a_plain) < 2.7  # area grows with the square of the scale (2.25)
    with pytest.raises(ValueError, match=r"object_scale=5"):
        SceneWorld(root=str(tmp_path), object_scale=5)
