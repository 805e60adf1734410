"""Notebooks are valid JSON notebooks whose code compiles (tests/test_ablation.py executes every one on a tiny
sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_compiles(path: Path) -> None:
    nb = json.loads(path.read_text())
    code = [("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    for i, src in enumerate(code):
        compile(src, f"{path.name}[{i}]", "exec")
