"""Rendering a scene to an RGB image (supersampled, then box-filtered: deterministic anti-aliasing)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from k3lab.data.scene_spec import BACKGROUND, COLORS, Scene, SceneObject

# Farthest point of each drawn shape from its centre, in units of the object's radius (square: 0.85 * sqrt 2;
# cross: arm end corners). Placement keeps these discs apart, so objects never touch.
EXTENT: dict[str, float] = {
    "circle": 1.0,
    "square": 0.85 * math.sqrt(2),
    "triangle": 1.0,
    "cross": math.hypot(1.0, 1.0 / 3.0),
}


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
    fill = COLORS[obj.color]
    box = [round(cx - r), round(cy - r), round(cx + r), round(cy + r)]
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        s = r * 0.85  # a square of the same visual weight as the circle
        draw.rectangle([round(cx - s), round(cy - s), round(cx + s), round(cy + s)], fill=fill)
    elif obj.shape == "triangle":  # upward equilateral, inscribed in the radius-r circle
        pts = [
            (cx + r * math.cos(a), cy - r * math.sin(a))
            for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
        ]
        draw.polygon([(round(x), round(y)) for x, y in pts], fill=fill)
    elif obj.shape == "cross":  # plus sign, arm thickness 2/3 r
        t = r / 3
        draw.rectangle([round(cx - r), round(cy - t), round(cx + r), round(cy + t)], fill=fill)
        draw.rectangle([round(cx - t), round(cy - r), round(cx + t), round(cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, resolution: int, supersample: int = 4) -> Image.Image:
    """RGB image of ``resolution`` x ``resolution`` px on the plain background."""
    side = resolution * supersample
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, side)
    return img.resize((resolution, resolution), Image.Resampling.BOX) if supersample > 1 else img
