"""The compositional benchmark of the scene world, in the spirit of GenEval but exact.

Each generated image is read by the deterministic detector and checked against its prompt's scene
specification. Tasks: single_object, two_object, counting, colors, position, color_attr. The score is
the mean of the per-task accuracies; results are broken down by split (seen vs held-out combinations).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import numpy as np

from evaluation.detector import Detection, detect

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """Dominant-axis relation of ``a`` to ``b`` (image y grows downward), as the generator defines it."""
    dx, dy = b.x - a.x, b.y - a.y
    if relation in ("left of", "right of"):
        return abs(dx) >= abs(dy) and (dx > 0) == (relation == "left of")
    if relation in ("above", "below"):
        return abs(dy) > abs(dx) and (dy > 0) == (relation == "above")
    raise ValueError(f"unknown relation {relation!r}")


def _matches(dets: list[Detection], obj: dict[str, Any], with_color: bool = True) -> list[Detection]:
    return [d for d in dets if d.shape == obj["shape"] and (not with_color or d.color == obj["color"])]


def _all_present(dets: list[Detection], objs: list[dict[str, Any]], with_color: bool) -> bool:
    """Every object has its own matching detection (objects with equal attributes need as many detections)."""
    need: dict[tuple, int] = defaultdict(int)
    for o in objs:
        need[(o["shape"], o["color"] if with_color else None)] += 1
    return all(len(_matches(dets, {"shape": s, "color": c}, with_color)) >= n for (s, c), n in need.items())


def in_x_order(dets: list[Detection], objs: list[dict[str, Any]]) -> bool:
    """Detections matching ``objs`` can be picked with strictly increasing x (greedy leftmost choice)."""
    current = -1.0
    for o in objs:
        xs = [d.x for d in _matches(dets, o) if d.x > current]
        if not xs:
            return False
        current = min(xs)
    return True


def check(spec: dict[str, Any], dets: list[Detection]) -> dict[str, bool]:
    """Task -> pass/fail for one image, from its scene spec (the ``key.json`` of the scene world)."""
    objs, kind = spec["objects"], spec["kind"]
    out: dict[str, bool] = {}
    if kind == "single":
        out["single_object"] = len(_matches(dets, objs[0], with_color=False)) >= 1
        out["colors"] = len(_matches(dets, objs[0])) >= 1
    elif kind == "relation":
        out["two_object"] = _all_present(dets, objs, with_color=False)
        out["color_attr"] = _all_present(dets, objs, with_color=True)
        rel = spec["relations"][0]
        subj, obj = objs[rel["subject"]], objs[rel["object"]]
        out["position"] = any(
            relation_holds(a, b, rel["relation"])
            for a in _matches(dets, subj)
            for b in _matches(dets, obj)
            if a is not b
        )
    elif kind == "count":
        out["counting"] = (
            len(_matches(dets, {"shape": spec["count"]["shape"], "color": spec["count"]["color"]}))
            == spec["count"]["n"]
        )
    elif kind == "multi":
        out["color_attr"] = _all_present(dets, objs, with_color=True)
        if spec.get("order") == "left_to_right":
            out["position"] = in_x_order(dets, objs)
    else:
        raise ValueError(f"unknown scene kind {kind!r}")
    return out


def score(
    items: Iterable[tuple[np.ndarray, dict[str, Any]]],
    group_key: str = "split",
    per_image: list[dict[str, bool]] | None = None,
) -> dict[str, Any]:
    """Per-task accuracy, overall score (mean of task accuracies) and the same per group (e.g. seen / heldout).

    ``items``: (RGB uint8 image, scene spec) pairs. ``per_image``: a list that receives each image's task -> pass
    (the paired analysis of ablations compares them prompt by prompt).
    """
    totals: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    n = 0
    for image, spec in items:
        result = check(spec, detect(image))
        if per_image is not None:
            per_image.append(result)
        group = str(spec.get(group_key, "all"))
        for task, ok in result.items():
            totals["all"][task].append(ok)
            totals[group][task].append(ok)
        n += 1
    report: dict[str, Any] = {"num_images": n}
    for group, tasks in totals.items():
        acc = {t: float(np.mean(v)) for t, v in tasks.items()}
        report[group] = {
            "tasks": acc,
            "counts": {t: len(v) for t, v in tasks.items()},
            "overall": float(np.mean(list(acc.values()))) if acc else float("nan"),
        }
    return report
