"""The evaluation package is importable on its own and never imports k3lab."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import evaluation

ROOT = Path(evaluation.__file__).resolve().parent


def test_no_source_file_imports_k3lab() -> None:
    files = sorted(ROOT.rglob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "k3lab" or n.startswith("k3lab.") for n in names), f"{path} imports k3lab"


def test_importing_evaluation_loads_no_k3lab_module() -> None:
    code = "import sys, evaluation; print(any(m == 'k3lab' or m.startswith('k3lab.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
