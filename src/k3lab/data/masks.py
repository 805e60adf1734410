"""Training masks for inpainting and outpainting (1 = the region to generate), drawn per sample from a mix of kinds.

- ``box``: an axis-aligned rectangle; ``brush``: free-form strokes (thick polylines, as in LaMa / SD-inpainting);
- ``object``: the bounding box of one object from the sample's scene spec (``metadata["objects"][i]["bbox"]``,
  fractions of the image), grown by ``object_margin``; samples without objects fall back to ``box``;
- ``outpaint``: a border band on one to four sides (the image's content stays in the middle);
- ``full``: the whole image, so that the inpainting model also generates from scratch (text to image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

KINDS: tuple[str, ...] = ("box", "brush", "object", "outpaint", "full")


@dataclass
class MaskGenerator:
    """``masks(metadata, (H, W), generator) -> [B, 1, H, W]`` float 0/1; the kind of each sample is drawn with
    ``weights``."""

    weights: dict[str, float] = field(
        default_factory=lambda: {"box": 0.25, "brush": 0.2, "object": 0.3, "outpaint": 0.1, "full": 0.15}
    )
    box_size: Sequence[float] = (0.15, 0.6)  # box sides as fractions of the image side
    brush_strokes: Sequence[int] = (1, 4)  # strokes per mask (inclusive)
    brush_vertices: int = 4  # vertices per stroke
    brush_width: Sequence[float] = (0.06, 0.16)  # stroke width as a fraction of the side
    outpaint_band: Sequence[float] = (0.1, 0.35)  # band width per chosen side, fraction of the side (< 0.5)
    object_margin: float = 0.04  # grown around an object's box, fraction of the side

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(KINDS))
        if unknown or sum(float(v) for v in self.weights.values()) <= 0 or min(self.weights.values()) < 0:
            raise ValueError(
                f"masks.weights={dict(self.weights)}: kinds among {list(KINDS)}, weights >= 0, positive sum"
            )
        for name in ("box_size", "brush_width", "outpaint_band"):
            lo, hi = (float(v) for v in getattr(self, name))
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"masks.{name}={list(getattr(self, name))}: needs 0 < low <= high <= 1")
        if float(self.outpaint_band[1]) >= 0.5:
            raise ValueError(f"masks.outpaint_band={list(self.outpaint_band)}: keep it < 0.5 so the centre stays")
        lo, hi = (int(v) for v in self.brush_strokes)
        if not 1 <= lo <= hi:
            raise ValueError(f"masks.brush_strokes={list(self.brush_strokes)}: needs 1 <= low <= high")
        self.kinds = [k for k in KINDS if float(self.weights.get(k, 0)) > 0]
        self.probs = torch.tensor([float(self.weights[k]) for k in self.kinds], dtype=torch.float64)

    def __call__(
        self,
        metadata: Sequence[dict[str, Any]],
        size: tuple[int, int],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """One mask per sample [B, 1, H, W] (1 = the region to generate), drawn from the configured kinds."""
        h, w = size
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        grid = (ys[:, None].expand(h, w), xs[None, :].expand(h, w))
        masks = []
        for meta in metadata:
            kind = self.kinds[int(torch.multinomial(self.probs, 1, generator=generator))]
            masks.append(self.draw(kind, meta, grid, generator))
        return torch.stack(masks)[:, None].to(device)

    # ------------------------------------------------------------------ kinds
    def draw(
        self, kind: str, meta: dict[str, Any], grid: tuple[torch.Tensor, torch.Tensor], g: torch.Generator | None
    ) -> torch.Tensor:
        """One [H, W] mask of ``kind`` (coordinates of ``grid`` are pixel centres in [0, 1])."""
        y, x = grid
        if kind == "full":
            return torch.ones_like(y)
        if kind == "object":
            boxes = [o["bbox"] for o in (meta or {}).get("objects", []) if "bbox" in o]
            if boxes:
                x0, y0, x1, y1 = boxes[int(torch.randint(len(boxes), (1,), generator=g))]
                m = self.object_margin
                return ((x >= x0 - m) & (x <= x1 + m) & (y >= y0 - m) & (y <= y1 + m)).float()
            kind = "box"
        if kind == "box":
            lo, hi = (float(v) for v in self.box_size)
            bw, bh = (lo + (hi - lo) * _u(g) for _ in range(2))
            cx, cy = _u(g), _u(g)
            return ((abs(x - cx) <= bw / 2) & (abs(y - cy) <= bh / 2)).float()
        if kind == "brush":
            return self._brush(x, y, g)
        if kind == "outpaint":
            lo, hi = (float(v) for v in self.outpaint_band)
            sides = torch.rand(4, generator=g) < 0.5
            if not bool(sides.any()):
                sides[int(torch.randint(4, (1,), generator=g))] = True
            out = torch.zeros_like(y, dtype=torch.bool)
            for side, on in zip(("left", "right", "top", "bottom"), sides.tolist(), strict=True):
                if on:
                    band = lo + (hi - lo) * _u(g)
                    out |= {"left": x < band, "right": x > 1 - band, "top": y < band, "bottom": y > 1 - band}[side]
            return out.float()
        raise ValueError(f"unknown mask kind {kind!r}")

    def _brush(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        lo, hi = (int(v) for v in self.brush_strokes)
        out = torch.zeros_like(x, dtype=torch.bool)
        for _ in range(int(torch.randint(lo, hi + 1, (1,), generator=g))):
            width = float(self.brush_width[0]) + (float(self.brush_width[1]) - float(self.brush_width[0])) * _u(g)
            points = torch.rand(self.brush_vertices, 2, generator=g)
            for (ax, ay), (bx, by) in zip(points[:-1].tolist(), points[1:].tolist(), strict=True):
                out |= _segment_distance(x, y, ax, ay, bx, by) <= width / 2
        return out.float()


def _u(g: torch.Generator | None) -> float:
    return float(torch.rand((), generator=g))


def _segment_distance(x: torch.Tensor, y: torch.Tensor, ax: float, ay: float, bx: float, by: float) -> torch.Tensor:
    """Distance of every grid point to the segment a-b."""
    dx, dy = bx - ax, by - ay
    length2 = max(dx * dx + dy * dy, 1e-12)
    t = (((x - ax) * dx + (y - ay) * dy) / length2).clamp(0, 1)
    return ((x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2).sqrt()
