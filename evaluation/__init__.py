"""k3lab's evaluation package: metrics for images from any model (FID/KID, CLIP score, a compositional
benchmark, human side-by-side exports). It never imports k3lab, so it can score any generator.

The metrics themselves are filled in by the evaluation issue; this is the installable skeleton.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
