"""Vocabulary and scene specification of the scene world (shapes, colours, sizes, relations)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Named colours far apart in RGB (pairwise distance >= 150).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 175, 35),
    "blue": (30, 60, 230),
    "yellow": (240, 215, 20),
    "magenta": (215, 35, 215),
    "cyan": (25, 205, 215),
}
BACKGROUND: tuple[int, int, int] = (245, 245, 245)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Radius (half the bounding-box side) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.09, "large": 0.16}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
KINDS: tuple[str, ...] = ("single", "relation", "count", "multi")


@dataclass(frozen=True)
class SceneObject:
    """One object; ``x``, ``y`` are the centre in [0, 1] image coordinates (y down), ``radius`` likewise."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float

    def bbox(self) -> list[float]:
        """The object's bounding box [x0, y0, x1, y1] in unit coordinates."""
        return [self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius]


@dataclass
class Scene:
    """A scene and its description: the JSON a judge checks an image against."""

    kind: str
    objects: list[SceneObject]
    caption: str = ""
    relations: list[dict[str, Any]] = field(default_factory=list)  # {"subject": i, "relation": r, "object": j}
    count: dict[str, Any] | None = None  # {"n", "shape", "color"} for counting scenes
    order: str | None = None  # "left_to_right": the caption lists the objects in x order (as stored)

    def pairs(self) -> set[tuple[str, str]]:
        """The (colour, shape) combinations present."""
        return {(o.color, o.shape) for o in self.objects}

    def to_json(self, resolution: int, split: str) -> dict[str, Any]:
        """The scene as JSON metadata (objects with boxes, resolution, split), as stored beside its image."""
        objects = []
        for o in self.objects:
            d = asdict(o)
            d["bbox"] = [round(v, 4) for v in o.bbox()]
            objects.append(d)
        return {
            "caption": self.caption,
            "kind": self.kind,
            "objects": objects,
            "relations": self.relations,
            "count": self.count,
            "order": self.order,
            "resolution": resolution,
            "split": split,
            "width": resolution,
            "height": resolution,
        }


def relation_between(a: SceneObject, b: SceneObject) -> str:
    """The dominant-axis relation of ``a`` to ``b`` (y grows downward)."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"
