"""An editing benchmark on scene-world images that needs no learned judge.

Each task takes a test scene, masks one object's region (its box, grown by a margin) and asks, with the scene's
caption edited accordingly, for a different colour or a different shape there. An edited image is scored by the
deterministic detector (:mod:`evaluation.detector`):

- ``target``: the requested object (colour and shape) is detected with its centre inside the mask;
- ``psnr_outside`` / ``exact_outside``: pixels outside the mask against the original (with paste-back: exact);
- ``others_kept``: every other object of the scene is still detected (same colour and shape, centre within its
  radius of where it was); ``others_kept_real`` is the same on the unedited image (the detector's ceiling).

Trivial baselines (:data:`BASELINES`): ``copy`` (the image unchanged) and ``mean_fill`` (the hole filled with the
mean colour of the kept pixels). The task files (``tasks.jsonl``, ``<id>_image.png``, ``<id>_mask.png``) let any
editing model be measured: write ``<id>.png`` results into a folder and score it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from evaluation.detector import PALETTE, SHAPES, Detection, detect

# The scene world's nouns per shape (k3lab's captions use the same; checked by a test).
SHAPE_NOUNS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
EDITABLE_KINDS = ("single", "relation", "multi")  # counting scenes name several objects by one phrase


@dataclass
class EditTask:
    """One edit: the original image, the hole (True = regenerate), the edited prompt and what must be found."""

    task_id: str
    kind: str  # "color" | "shape"
    image: np.ndarray = field(repr=False)  # RGB uint8 [H, W, 3]
    hole: np.ndarray = field(repr=False)  # bool [H, W]
    prompt: str
    source_prompt: str
    target: dict[str, Any]  # {"color", "shape", "x", "y", "radius"}: the requested object
    others: list[dict[str, Any]]  # the scene's other objects (same keys)

    def meta(self) -> dict[str, Any]:
        """The task's JSON-able fields (everything but the image and hole arrays)."""
        d = asdict(self)
        del d["image"], d["hole"]
        return d


def _edit_caption(caption: str, obj: dict[str, Any], kind: str, new: str, rng: np.random.Generator) -> str | None:
    """The caption with ``obj``'s colour or noun replaced, or None when the phrase is not found exactly once."""
    nouns = "|".join(re.escape(n) for n in SHAPE_NOUNS[obj["shape"]])
    pattern = re.compile(rf"\b{re.escape(obj['color'])} ({nouns})\b")
    if len(pattern.findall(caption)) != 1 or len(re.findall(rf"\b{re.escape(obj['color'])}\b", caption)) != 1:
        return None
    if kind == "color":
        return pattern.sub(lambda m: f"{new} {m.group(1)}", caption)
    noun = SHAPE_NOUNS[new][int(rng.integers(len(SHAPE_NOUNS[new])))]
    return pattern.sub(f"{obj['color']} {noun}", caption)


def _object(o: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {"color": o["color"], "shape": o["shape"], "x": o["x"], "y": o["y"], "radius": o["radius"], **changes}


def make_tasks(
    scenes: Iterable[tuple[np.ndarray, dict[str, Any], str]],
    num: int,
    seed: int = 0,
    margin: float = 0.04,
) -> list[EditTask]:
    """Up to ``num`` tasks from (image, scene spec, caption) triples, alternating colour and shape edits; an object
    qualifies when its colour is unique in its scene (so the caption names it unambiguously). ``margin`` grows the
    object's box (fraction of the side)."""
    rng = np.random.default_rng(seed)
    tasks: list[EditTask] = []
    for index, (image, spec, caption) in enumerate(scenes):
        if len(tasks) >= num:
            break
        if not spec or spec.get("kind") not in EDITABLE_KINDS:
            continue
        objects = spec["objects"]
        colours = [o["color"] for o in objects]
        candidates = [i for i, o in enumerate(objects) if colours.count(o["color"]) == 1]
        if not candidates:
            continue
        i = candidates[int(rng.integers(len(candidates)))]
        obj = objects[i]
        kind = "color" if len(tasks) % 2 == 0 else "shape"
        if kind == "color":
            options = [c for c in PALETTE if c not in colours]
        else:
            options = [s for s in SHAPES if s != obj["shape"]]
        new = options[int(rng.integers(len(options)))]
        prompt = _edit_caption(caption, obj, kind, new, rng)
        if prompt is None:
            continue
        h, w = image.shape[:2]
        x0, y0, x1, y1 = (float(v) for v in obj["bbox"])
        ys = (np.arange(h) + 0.5) / h
        xs = (np.arange(w) + 0.5) / w
        hole = ((ys[:, None] >= y0 - margin) & (ys[:, None] <= y1 + margin)) & (
            (xs[None] >= x0 - margin) & (xs[None] <= x1 + margin)
        )
        target = _object(obj, **({"color": new} if kind == "color" else {"shape": new}))
        others = [_object(o) for j, o in enumerate(objects) if j != i]
        tasks.append(EditTask(f"edit{index:05d}", kind, image, hole, prompt, caption, target, others))
    return tasks


def _found(dets: Sequence[Detection], obj: dict[str, Any], within: float) -> bool:
    return any(
        d.color == obj["color"] and d.shape == obj["shape"] and math.hypot(d.x - obj["x"], d.y - obj["y"]) <= within
        for d in dets
    )


def score_one(result: np.ndarray, task: EditTask) -> dict[str, float]:
    """The three scores of one edited image (RGB uint8 of the task image's size)."""
    if result.shape != task.image.shape:
        raise ValueError(f"{task.task_id}: result {result.shape} differs from the task image {task.image.shape}")
    h, w = task.hole.shape
    dets = detect(result)
    target = any(
        d.color == task.target["color"]
        and d.shape == task.target["shape"]
        and task.hole[min(int(d.y * h), h - 1), min(int(d.x * w), w - 1)]
        for d in dets
    )
    keep = ~task.hole
    diff = result[keep].astype(np.float64) - task.image[keep].astype(np.float64)
    mse = float(np.mean(diff**2)) if diff.size else 0.0
    kept = [_found(dets, o, o["radius"]) for o in task.others]
    return {
        "target": float(target),
        "psnr_outside": math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse),
        "exact_outside": float(mse == 0),
        "others_kept": float(np.mean(kept)) if kept else math.nan,
    }


def score(results: Sequence[np.ndarray], tasks: Sequence[EditTask], psnr_cap: float = 100.0) -> dict[str, Any]:
    """Mean scores over tasks (PSNR capped at ``psnr_cap`` dB so exact regions average), by edit kind too, and the
    detector's ceiling for the other objects on the unedited images."""
    if len(results) != len(tasks):
        raise ValueError(f"{len(results)} results for {len(tasks)} tasks")
    rows = [score_one(r, t) for r, t in zip(results, tasks, strict=True)]

    def summary(idx: list[int]) -> dict[str, float]:
        pick = [rows[i] for i in idx]
        others = [r["others_kept"] for r in pick if not math.isnan(r["others_kept"])]
        return {
            "target": float(np.mean([r["target"] for r in pick])) if pick else math.nan,
            "psnr_outside": float(np.mean([min(r["psnr_outside"], psnr_cap) for r in pick])) if pick else math.nan,
            "exact_outside": float(np.mean([r["exact_outside"] for r in pick])) if pick else math.nan,
            "others_kept": float(np.mean(others)) if others else math.nan,
            "num": len(pick),
        }

    ceiling = [float(np.mean([_found(detect(t.image), o, o["radius"]) for o in t.others])) for t in tasks if t.others]
    return {
        **summary(list(range(len(tasks)))),
        "by_kind": {k: summary([i for i, t in enumerate(tasks) if t.kind == k]) for k in ("color", "shape")},
        "others_kept_real": float(np.mean(ceiling)) if ceiling else math.nan,
        "psnr_cap": psnr_cap,
    }


def copy_baseline(task: EditTask) -> np.ndarray:
    """The image unchanged."""
    return task.image.copy()


def mean_fill_baseline(task: EditTask) -> np.ndarray:
    """The hole filled with the mean colour of the kept pixels."""
    out = task.image.copy()
    keep = ~task.hole
    mean = task.image[keep].reshape(-1, 3).mean(0) if keep.any() else np.full(3, 127.5)
    out[task.hole] = np.round(mean).astype(np.uint8)
    return out


BASELINES: dict[str, Callable[[EditTask], np.ndarray]] = {"copy": copy_baseline, "mean_fill": mean_fill_baseline}


def baselines(tasks: Sequence[EditTask]) -> dict[str, dict[str, Any]]:
    """:func:`score` of every trivial baseline."""
    return {name: score([fn(t) for t in tasks], tasks) for name, fn in BASELINES.items()}


# ----------------------------------------------------------------------------- task files
def write_tasks(tasks: Sequence[EditTask], directory: str | Path) -> Path:
    """``<id>_image.png``, ``<id>_mask.png`` (white = regenerate) and ``tasks.jsonl`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for t in tasks:
        Image.fromarray(t.image).save(directory / f"{t.task_id}_image.png")
        Image.fromarray((t.hole * 255).astype(np.uint8)).save(directory / f"{t.task_id}_mask.png")
        lines.append(json.dumps(t.meta()))
    (directory / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def load_tasks(directory: str | Path) -> list[EditTask]:
    """The tasks :func:`write_tasks` wrote."""
    directory = Path(directory)
    path = directory / "tasks.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no tasks.jsonl (write one with `python -m evaluation editing-tasks`)")
    tasks = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
            image = np.asarray(Image.open(directory / f"{meta['task_id']}_image.png").convert("RGB"))
            hole = np.asarray(Image.open(directory / f"{meta['task_id']}_mask.png").convert("L")) >= 128
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{n}: unreadable task ({type(e).__name__}: {e})") from e
        tasks.append(EditTask(image=image, hole=hole, **meta))
    return tasks


def load_results(directory: str | Path, tasks: Sequence[EditTask]) -> list[np.ndarray]:
    """``<id>.png`` per task from ``directory``; a missing or unreadable one is an error naming it."""
    out = []
    for t in tasks:
        path = Path(directory) / f"{t.task_id}.png"
        try:
            out.append(np.asarray(Image.open(path).convert("RGB")))
        except OSError as e:
            raise ValueError(f"{path}: missing or unreadable result for task {t.task_id} ({e})") from e
    return out
