"""k3lab: a modular experiment codebase that reproduces and ablates Kandinsky 3.0."""

from __future__ import annotations

__version__ = "0.1.0"
