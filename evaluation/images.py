"""Image sources for evaluation: a folder of PNGs with ``metadata.jsonl``, webdataset shards, or a generator.

Folder layout (what ``write_folder`` produces and what a sampler should write)::

    <dir>/metadata.jsonl   one line per image: {"file", "prompt_id", "prompt", "seed", "category"?, "spec"?}
    <dir>/<file>.png
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from evaluation.prompts import Prompt, tar_member


@dataclass
class ImageRecord:
    """One image to evaluate and what it was generated from."""

    image: np.ndarray  # RGB uint8 [H, W, 3]
    prompt_id: str
    prompt: str
    seed: int = 0
    category: str = ""
    spec: dict[str, Any] | None = field(default=None, repr=False)
    path: Path | None = None  # the file it was read from, when it came from a folder


def read_image(data: bytes | str | Path, name: str = "") -> np.ndarray:
    """RGB uint8 array; raises ValueError naming the file when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"unreadable image {name or data}: {e}") from e


def load_folder(directory: str | Path, expected: int | None = None) -> list[ImageRecord]:
    """Images listed in ``<directory>/metadata.jsonl``; a missing or unreadable file is an error naming it.

    ``expected``: the number of prompts x seeds; a different image count is an error.
    """
    directory = Path(directory)
    meta_path = directory / "metadata.jsonl"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{directory}: no metadata.jsonl (one JSON line per image: file, prompt_id, prompt, seed)"
        )
    records = []
    for i, line in enumerate(meta_path.read_text().splitlines()):
        if not line.strip():
            continue
        meta = json.loads(line)
        path = directory / meta["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{meta_path}: line {i + 1}: image not found: {path}")
        records.append(
            ImageRecord(
                read_image(path),
                str(meta["prompt_id"]),
                meta["prompt"],
                int(meta.get("seed", 0)),
                meta.get("category", ""),
                meta.get("spec"),
                path,
            )
        )
    if expected is not None and len(records) != expected:
        raise ValueError(f"{meta_path}: {len(records)} images but {expected} expected (prompts x seeds)")
    return records


def write_folder(records: Sequence[ImageRecord], directory: str | Path) -> Path:
    """Write records as ``<prompt_id>_<seed>.png`` + ``metadata.jsonl`` (the layout ``load_folder`` reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in records:
        name = f"{r.prompt_id.replace('/', '_')}_{r.seed}.png"
        Image.fromarray(r.image).save(directory / name)
        lines.append(
            json.dumps(
                {
                    "file": name,
                    "prompt_id": r.prompt_id,
                    "prompt": r.prompt,
                    "seed": r.seed,
                    "category": r.category,
                    "spec": r.spec,
                }
            )
        )
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def load_shards(
    shards: Sequence[str | Path], image_key: str = "png", limit: int | None = None
) -> Iterator[ImageRecord]:
    """Records from img2dataset-style tar shards (``key.png``, ``key.txt``, ``key.json``)."""
    n = 0
    for shard in shards:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar_member(tar, m, shard)
        for key in sorted(samples):
            s = samples[key]
            if image_key not in s:
                raise ValueError(f"{shard}: sample {key!r} has no .{image_key} image")
            spec = json.loads(s["json"]) if "json" in s else None
            yield ImageRecord(
                read_image(s[image_key], f"{shard}:{key}.{image_key}"),
                f"{Path(shard).stem}/{key}",
                s.get("txt", b"").decode(),
                0,
                (spec or {}).get("kind", ""),
                spec,
            )
            n += 1
            if limit is not None and n >= limit:
                return


def from_generator(
    generate: Callable[[Sequence[str], Sequence[int]], Sequence[np.ndarray]],
    prompts: Sequence[Prompt],
    seeds: Sequence[int] = (0,),
    batch_size: int = 16,
) -> Iterator[ImageRecord]:
    """Records from ``generate(prompts, seeds) -> RGB uint8 images``, batched over prompts x seeds."""
    jobs = [(p, s) for p in prompts for s in seeds]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = generate([p.text for p, _ in chunk], [s for _, s in chunk])
        if len(images) != len(chunk):
            raise ValueError(f"generator returned {len(images)} images for {len(chunk)} prompts")
        for (p, s), img in zip(chunk, images, strict=False):
            yield ImageRecord(np.asarray(img, dtype=np.uint8), p.id, p.text, s, p.category, p.spec)
