"""A deterministic detector for scene-world images: colour segmentation plus shape measures, no learned weights.

Each pixel takes the nearest palette colour (or the background); connected regions of one colour
above a minimum area are objects; the shape comes from the region's fill of its bounding box
(square ~1, circle ~pi/4, cross ~0.56, triangle ~0.5), whether the box corners are filled (squares
only) and its centroid height (a triangle's centroid sits low in its box).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
from scipy import ndimage

# The scene world's palette (version 1); k3lab's generator uses the same values (checked by a test).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 175, 35),
    "blue": (30, 60, 230),
    "yellow": (240, 215, 20),
    "magenta": (215, 35, 215),
    "cyan": (25, 205, 215),
}
BACKGROUND: tuple[int, int, int] = (245, 245, 245)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")


@dataclass(frozen=True)
class Detection:
    """An object found in an image; ``x``, ``y`` (centroid) and ``area`` are fractions of the image."""

    color: str
    shape: str
    x: float
    y: float
    area: float
    fill: float


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape name and fill ratio of one region's boolean mask (cropped or not)."""
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / float(h * w)
    centroid_rel = (ys.mean() - ys.min() + 0.5) / h
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    corners = float(np.mean([box[:2, :2].mean(), box[:2, -2:].mean(), box[-2:, :2].mean(), box[-2:, -2:].mean()]))
    if centroid_rel > 0.555:  # squares, circles and crosses are symmetric; a triangle's mass sits low
        return "triangle", fill
    if fill > 0.8 and corners > 0.5:  # only a square fills the corners of its box
        return "square", fill
    if fill > 0.66:
        return "circle", fill
    return "cross", fill


def detect(
    image: np.ndarray,
    palette: dict[str, tuple[int, int, int]] = PALETTE,
    background: tuple[int, int, int] = BACKGROUND,
    max_distance: float = 90.0,
    min_area: float = 0.004,
) -> list[Detection]:
    """Objects in an RGB uint8 image [H, W, 3] (any resolution)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"detect() needs an RGB image [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    names = list(palette)
    refs = np.array([palette[n] for n in names] + [background], dtype=np.float32)
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - refs[None, None], axis=-1)
    nearest = dist.argmin(-1)
    close = dist.min(-1) < max_distance
    found: list[Detection] = []
    for ci, name in enumerate(names):
        mask = (nearest == ci) & close
        if not mask.any():
            continue
        labels, _ = cast(tuple[np.ndarray, int], ndimage.label(mask, structure=np.ones((3, 3), dtype=bool)))
        for region, sl in enumerate(ndimage.find_objects(labels), start=1):
            sub = labels[sl] == region
            area = int(sub.sum())
            if area < min_area * h * w:
                continue
            shape, fill = classify_shape(sub)
            ys, xs = np.nonzero(sub)
            found.append(
                Detection(
                    name,
                    shape,
                    float((xs.mean() + sl[1].start + 0.5) / w),
                    float((ys.mean() + sl[0].start + 0.5) / h),
                    area / float(h * w),
                    fill,
                )
            )
    return found
