"""A folder of captioned images as training data (``data=folder data.source.path=<dir>``): the layout users bring
from kohya-ss or the diffusers examples, packed once into webdataset shards so everything the shard path does
(aspect buckets, centre crops, seeded shuffles, rank and worker splits, exact resume, ``python -m k3lab.precompute``)
applies unchanged.

Images: any file PIL reads by extension (``.jpg .jpeg .png .webp .bmp .gif .tif .tiff``), in the folder and its
subfolders, any size. Captions, first found wins:

1. a sidecar beside the image with the same stem: ``photo.txt`` or ``photo.caption`` (kohya-ss);
2. ``metadata.jsonl`` / ``captions.jsonl`` anywhere in the folder, one ``{"file_name": ..., "text": ...}`` per line
   (``caption`` also accepted; ``file_name`` relative to that file's folder: diffusers' imagefolder layout);
3. ``metadata.csv`` with a ``file_name`` column and a ``text`` (or ``caption``) column.

An image without a caption is packed without one and skipped, counted, by the shard reader (``missing_caption``),
as is an image PIL cannot decode (``undecodable_image``) or one below the minimum size; a file that cannot be read
at all is counted here (``unreadable_file``). The shards live under ``out_dir``, keyed by the folder's listing (names,
sizes, modification times) and the options: an unchanged folder is packed once, a changed one again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from k3lab.data.shards import write_tar_members
from k3lab.data.skips import SkipLog, table
from k3lab.io.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INDEX_FILES = ("metadata.jsonl", "captions.jsonl", "metadata.csv")


class ImageFolder:
    """A :class:`k3lab.data.datamodule.ShardSource` over a folder of images (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        out_dir: str | Path,
        resolution: int = 512,
        val_count: int = 0,  # images held out for validation (chosen by a seeded hash of their names)
        repeats: int = 1,  # each training pass lists every image this many times (small sets)
        shard_size: int = 256,
        seed: int = 0,
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"data.source.path={str(path)!r}: not a folder")
        if int(repeats) < 1 or int(val_count) < 0 or int(shard_size) < 1:
            raise ValueError(f"data.source: repeats={repeats} (>= 1), val_count={val_count} (>= 0), shard_size >= 1")
        self.out_dir = Path(out_dir)
        self.resolution = int(resolution)
        self.val_count, self.repeats, self.shard_size, self.seed = int(val_count), int(repeats), int(shard_size), seed
        self.skipped: Counter[str] = Counter()

    def images(self) -> list[Path]:
        """Every image file under the folder (hidden folders aside), sorted by relative path."""
        found = [
            p
            for p in self.path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(self.path).parts)
        ]
        return sorted(found, key=lambda p: p.relative_to(self.path).as_posix())

    def captions(self) -> dict[str, str]:
        """Relative image path -> caption from the index files (sidecars are read per image, and win)."""
        out: dict[str, str] = {}
        for index in sorted(p for name in INDEX_FILES for p in self.path.rglob(name)):
            base = index.parent.relative_to(self.path)
            try:
                rows = _index_rows(index)
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{index}: cannot read its captions ({e})") from e
            for line, row in rows:
                name = row.get("file_name")
                text = row.get("text", row.get("caption"))
                if not isinstance(name, str) or not isinstance(text, str):
                    raise ValueError(f"{index}:{line}: needs file_name and text (or caption), got {sorted(row)}")
                out.setdefault((base / name).as_posix(), text)
        return out

    def spec(self, files: list[Path]) -> dict[str, Any]:
        """What the shards depend on: the listing (names, sizes, times of images and caption files) and options."""
        listing = hashlib.sha256()
        extras = [p for p in self.path.rglob("*") if p.suffix.lower() in (".txt", ".caption") or p.name in INDEX_FILES]
        for p in sorted({*files, *extras}):
            stat = p.stat()
            listing.update(f"{p.relative_to(self.path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return {
            "path": str(self.path.resolve()),
            "listing": listing.hexdigest(),
            "val_count": self.val_count,
            "shard_size": self.shard_size,
            "seed": self.seed,
        }

    def split_of(self, files: list[Path]) -> dict[str, list[Path]]:
        """The held-out images: the ``val_count`` first by a seeded hash of their relative paths (stable as the
        folder grows); none when that would leave fewer training images than held out."""
        if not self.val_count or len(files) < 2 * self.val_count:
            return {"train": files, "val": []}

        def rank(p: Path) -> str:
            return hashlib.sha1(f"{self.seed}:{p.relative_to(self.path).as_posix()}".encode()).hexdigest()

        held = set(sorted(files, key=rank)[: self.val_count])
        return {"train": [p for p in files if p not in held], "val": [p for p in files if p in held]}

    def build(self) -> dict[str, list[str]]:
        """Pack the folder into shards unless an up-to-date copy exists; the shard paths per split, the training
        list repeated ``repeats`` times."""
        files = self.images()
        if not files:
            raise FileNotFoundError(f"data.source.path={str(self.path)!r}: no images ({', '.join(IMAGE_SUFFIXES)})")
        spec = self.spec(files)
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        directory = self.out_dir / f"{re.sub(r'[^A-Za-z0-9_-]+', '_', self.path.name)}-{key}"
        manifest_path = directory / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("spec") == spec and all(Path(p).is_file() for s in manifest["shards"].values() for p in s):
                return self._listed(manifest["shards"])
        log.info("data=folder: packing %d images from %s into %s", len(files), self.path, directory)
        directory.mkdir(parents=True, exist_ok=True)
        captions = self.captions()
        skip_log = SkipLog("folder", examples=3, summary_every=1000)
        shards: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        for split, items in self.split_of(files).items():
            shards[split], buffer = [], []
            for i, image in enumerate(items):
                member = self._member(i, image, captions, skip_log)
                if member is not None:
                    buffer.append(member)
                if len(buffer) == self.shard_size:
                    shards[split].append(self._flush(directory, split, len(shards[split]), buffer))
                    buffer = []
            if buffer:
                shards[split].append(self._flush(directory, split, len(shards[split]), buffer))
            counts[split] = len(items)
        self.skipped = skip_log.total
        if skip_log.total:
            log.warning("%s", table(skip_log.total, skip_log.examples, f"packing {self.path}"))
        manifest = {"spec": spec, "shards": shards, "counts": counts, "skipped": dict(skip_log.total)}
        atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return self._listed(shards)

    def _listed(self, shards: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {split: list(urls) for split, urls in shards.items() if urls}
        if "train" in out:
            out["train"] = out["train"] * self.repeats
        return out

    def _member(
        self, index: int, image: Path, captions: dict[str, str], skip_log: SkipLog
    ) -> tuple[str, list[tuple[str, bytes]]] | None:
        rel = image.relative_to(self.path).as_posix()
        try:
            data = image.read_bytes()
        except OSError as e:
            skip_log.count({"unreadable_file": 1})
            skip_log.example("unreadable_file", f"{rel} ({e.strerror or e})")
            return None
        caption = _sidecar(image)
        if caption is None:
            caption = captions.get(rel)
        key = f"{index:06d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', image.stem)[:80]}"
        members = [(image.suffix.lower().lstrip("."), data), ("json", json.dumps({"file": rel}).encode())]
        if caption is not None:
            members.append(("txt", caption.encode()))
        return key, members

    def _flush(self, directory: Path, split: str, number: int, buffer: list) -> str:
        path = directory / f"{split}-{number:06d}.tar"
        atomic_write_bytes(path, write_tar_members(buffer))
        return str(path)


def _sidecar(image: Path) -> str | None:
    for suffix in (".txt", ".caption"):
        side = image.with_suffix(suffix)
        if side.is_file():
            return side.read_text(encoding="utf-8", errors="replace").strip()
    return None


def _index_rows(index: Path) -> list[tuple[int, dict[str, Any]]]:
    if index.suffix == ".csv":
        with open(index, newline="", encoding="utf-8") as f:
            return [(i + 2, dict(row)) for i, row in enumerate(csv.DictReader(f))]
    rows = []
    for i, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {i} is not JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"line {i} is not a JSON object")
            rows.append((i, row))
    return rows
