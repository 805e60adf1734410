"""The embedded default dataset: a deterministic, seeded world of captioned compositional scenes.

Written as img2dataset-style webdataset shards (``key.png``, ``key.txt``, ``key.json``) with a
``manifest.json``; the same config gives the same bytes. Splits: train / val / test (no held-out
colour-shape pair) and ``heldout`` (every scene contains at least one held-out pair).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from k3lab.data.scene_captions import caption_for
from k3lab.data.scene_render import EXTENT, render
from k3lab.data.scene_spec import COLORS, KINDS, RELATIONS, SHAPES, SIZES, Scene, SceneObject, relation_between
from k3lab.data.shards import write_tar_members
from k3lab.io.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")
DEFAULT_HELDOUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "cross"),
    ("yellow", "square"),
)
FORMAT_VERSION = 2


@dataclass
class SceneWorld:
    """Generator of the scene world; ``build()`` writes (or finds cached) shards and returns them per split."""

    root: str  # folder under which a sub-folder per config hash is written
    seed: int = 0
    resolution: int = 64
    num_train: int = 20000
    num_val: int = 512
    num_test: int = 512
    num_heldout: int = 512
    shard_size: int = 1000
    supersample: int = 4
    max_objects: int = 4
    object_scale: float = 1.0  # radii = SIZES x this (larger shapes: their corners and arms span more pixels)
    kind_weights: dict[str, float] = field(
        default_factory=lambda: {"single": 0.3, "relation": 0.3, "count": 0.2, "multi": 0.2}
    )
    heldout_pairs: Sequence[Sequence[str]] = DEFAULT_HELDOUT

    def __post_init__(self) -> None:
        problems = []
        if int(self.resolution) < 16:
            problems.append(f"resolution={self.resolution} (needs >= 16)")
        for name in ("num_train", "num_val", "num_test", "num_heldout"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name}={getattr(self, name)} (needs >= 0)")
        if int(self.shard_size) <= 0:
            problems.append(f"shard_size={self.shard_size} (needs > 0)")
        if not 0.25 <= float(self.object_scale) <= 2.0:
            problems.append(f"object_scale={self.object_scale} (needs 0.25..2)")
        if not 1 <= int(self.max_objects) <= 4:
            problems.append(f"max_objects={self.max_objects} (needs 1..4)")
        unknown = [k for k in self.kind_weights if k not in KINDS]
        if unknown or sum(self.kind_weights.values()) <= 0:
            problems.append(f"kind_weights={dict(self.kind_weights)} (kinds {KINDS}, positive total)")
        for pair in self.heldout_pairs:
            if len(pair) != 2 or pair[0] not in COLORS or pair[1] not in SHAPES:
                problems.append(
                    f"heldout_pairs entry {list(pair)} (needs [colour in {list(COLORS)}, shape in {list(SHAPES)}])"
                )
        if problems:
            raise ValueError("data.source (SceneWorld): invalid " + "; ".join(problems))
        self.heldout = {(str(c), str(s)) for c, s in self.heldout_pairs}

    # ---------------------------------------------------------------- identity and cache
    def spec(self) -> dict[str, Any]:
        """Everything that determines the bytes (the cache key)."""
        return {
            "format": FORMAT_VERSION,
            "seed": int(self.seed),
            "resolution": int(self.resolution),
            "counts": {s: int(getattr(self, f"num_{s}")) for s in SPLITS},
            "shard_size": int(self.shard_size),
            "supersample": int(self.supersample),
            "max_objects": int(self.max_objects),
            "kind_weights": {k: float(v) for k, v in sorted(self.kind_weights.items())},
            "heldout_pairs": sorted([list(p) for p in self.heldout]),
        } | ({"object_scale": float(self.object_scale)} if float(self.object_scale) != 1.0 else {})

    @property
    def directory(self) -> Path:
        """The cache folder of this world, named by resolution, seed and a hash of its spec."""
        digest = hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:10]
        return Path(self.root) / f"r{self.resolution}_s{self.seed}_{digest}"

    def build(self) -> dict[str, list[str]]:
        """Write the shards unless a complete copy exists; return shard paths per split."""
        manifest_path = self.directory / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("spec") == self.spec() and all(
                Path(p).is_file() for s in SPLITS for p in manifest["shards"][s]
            ):
                return {s: manifest["shards"][s] for s in SPLITS}
        log.info("scene world: writing %s", self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        shards: dict[str, list[str]] = {s: [] for s in SPLITS}
        digests: dict[str, str] = {}
        buffers: dict[str, list[tuple[str, bytes, str, dict]]] = {s: [] for s in SPLITS}
        for split, index, png, caption, meta in self.samples():
            buffers[split].append((f"{index:09d}", png, caption, meta))
            if len(buffers[split]) == self.shard_size:
                self._flush(split, buffers, shards, digests)
        for split in SPLITS:
            if buffers[split]:
                self._flush(split, buffers, shards, digests)
        manifest = {
            "spec": self.spec(),
            "shards": shards,
            "sha256": digests,
            "counts": {s: int(getattr(self, f"num_{s}")) for s in SPLITS},
        }
        atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return shards

    def _flush(self, split: str, buffers: dict, shards: dict, digests: dict) -> None:
        path = self.directory / f"{split}-{len(shards[split]):06d}.tar"
        data = write_tar(buffers[split])
        atomic_write_bytes(path, data)
        shards[split].append(str(path))
        digests[path.name] = hashlib.sha256(data).hexdigest()
        buffers[split] = []

    # ---------------------------------------------------------------- generation
    def samples(self) -> Iterator[tuple[str, int, bytes, str, dict]]:
        """(split, index, png bytes, caption, json) in generation order; scenes are unique across splits."""
        rng = np.random.default_rng(self.seed)
        want = {s: int(getattr(self, f"num_{s}")) for s in SPLITS}
        have = {s: 0 for s in SPLITS}
        seen: set[str] = set()
        order = ["train", "val", "test"]
        attempts, limit = 0, 50 * (sum(want.values()) + 10)
        while any(have[s] < want[s] for s in SPLITS):
            attempts += 1
            if attempts > limit:
                raise RuntimeError(f"scene world: could not draw enough unique scenes ({have} of {want})")
            scene = self.sample_scene(rng)
            held = bool(scene.pairs() & self.heldout)
            if held:
                split = "heldout" if have["heldout"] < want["heldout"] else None
            else:
                split = next((s for s in order if have[s] < want[s]), None)
            if split is None:
                continue
            signature = self.signature(scene)
            if signature in seen:
                continue
            seen.add(signature)
            buf = io.BytesIO()
            render(scene, self.resolution, self.supersample).save(buf, format="PNG", optimize=False)
            yield split, have[split], buf.getvalue(), scene.caption, scene.to_json(self.resolution, split)
            have[split] += 1

    def signature(self, scene: Scene) -> str:
        """Scenes that render to the same pixels share a signature (positions at pixel precision)."""
        items = sorted(
            (o.shape, o.color, o.size, round(o.x * self.resolution), round(o.y * self.resolution))
            for o in scene.objects
        )
        return json.dumps(items)

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        """Draw one scene of a random kind with its caption."""
        min_objects = {"single": 1, "relation": 2, "count": 2, "multi": 3}
        kinds = [k for k in KINDS if self.kind_weights.get(k, 0) > 0 and self.max_objects >= min_objects[k]]
        p = np.array([self.kind_weights[k] for k in kinds], dtype=np.float64)
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        while True:
            scene = self._layout(rng, kind)
            if scene is not None:
                break
        scene.caption = caption_for(rng, scene)
        if scene.kind == "multi" and scene.caption.startswith("from left to right"):
            scene.order = "left_to_right"  # objects are stored sorted by x
        return scene

    def _attributes(self, rng: np.random.Generator) -> tuple[str, str, str]:
        colors, sizes = list(COLORS), list(SIZES)
        return (
            SHAPES[int(rng.integers(len(SHAPES)))],
            colors[int(rng.integers(len(colors)))],
            sizes[int(rng.integers(len(sizes)))],
        )

    def _place(
        self, rng: np.random.Generator, attrs: list[tuple[str, str, str]], min_dx: float = 0.0
    ) -> list[SceneObject] | None:
        """Non-overlapping centres inside the frame (rejection sampling); None if it fails."""
        placed: list[SceneObject] = []
        margin = 1.5 / self.resolution
        for shape, color, size in attrs:
            r = SIZES[size] * float(self.object_scale)
            e = r * EXTENT[shape]
            for _ in range(60):
                x, y = (float(v) for v in rng.uniform(e + margin, 1 - e - margin, size=2))
                ok = all(
                    np.hypot(x - o.x, y - o.y) > e + o.radius * EXTENT[o.shape] + 2 * margin and abs(x - o.x) >= min_dx
                    for o in placed
                )
                if ok:
                    placed.append(SceneObject(shape, color, size, round(x, 4), round(y, 4), r))
                    break
            else:
                return None
        return placed

    def _layout(self, rng: np.random.Generator, kind: str) -> Scene | None:
        if kind == "single":
            objs = self._place(rng, [self._attributes(rng)])
            return None if objs is None else Scene("single", objs)
        if kind == "relation":
            relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
            objs = self._place(rng, [self._attributes(rng), self._attributes(rng)])
            if objs is None:
                return None
            a, b = objs
            dx, dy = abs(b.x - a.x), abs(b.y - a.y)
            if (
                (a.shape, a.color) == (b.shape, b.color)
                or max(dx, dy) < 2 * min(dx, dy)
                or relation_between(a, b) != relation
            ):
                return None  # ambiguous, indistinguishable, or not the drawn relation: redraw
            return Scene("relation", objs, relations=[{"subject": 0, "relation": relation, "object": 1}])
        if kind == "count":
            n = int(rng.integers(2, self.max_objects + 1))
            shape, color, size = self._attributes(rng)
            objs = self._place(rng, [(shape, color, size)] * n)
            return None if objs is None else Scene("count", objs, count={"n": n, "shape": shape, "color": color})
        if kind == "multi":
            n = int(rng.integers(3, self.max_objects + 1))
            attrs = [self._attributes(rng) for _ in range(n)]
            if len({(s, c) for s, c, _ in attrs}) < n:
                return None
            objs = self._place(rng, attrs, min_dx=0.06)
            return None if objs is None else Scene("multi", sorted(objs, key=lambda o: o.x))
        raise ValueError(f"unknown scene kind {kind!r}")


def write_tar(samples: list[tuple[str, bytes, str, dict]]) -> bytes:
    """A reproducible tar (mtime 0, root owner) with ``key.png``, ``key.txt``, ``key.json`` per sample."""
    return write_tar_members(
        [
            (key, [("png", png), ("txt", caption.encode()), ("json", json.dumps(meta, sort_keys=True).encode())])
            for key, png, caption, meta in samples
        ]
    )
