"""The package's shape, checked from the source (every import statement, at module level or inside a function):
no import cycle, the layer order of docs/architecture.md, entry points alone at the package root and imported by
nobody, ``k3lab.nn`` pure torch, and ``evaluation`` free of k3lab (see also test_evaluation_package)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "k3lab"
# docs/architecture.md: a package may import its own modules and those of packages in lower layers, never higher or
# sideways; the modules at the package root are entry points (python -m k3lab.<name>) that nothing imports.
LAYERS = (
    ("nn",),
    ("diffusion",),
    ("io",),
    ("data",),
    ("inference",),
    ("tracking",),
    ("stages",),
    ("run",),
    ("convert", "ablation"),
)
ENTRY_POINTS = {"train", "sample", "precompute", "report", "edit_bench", "progressive", "mapping"}
FRAMEWORKS = ("hydra", "omegaconf", "lightning", "pytorch_lightning", "mlflow")


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(k3lab module -> k3lab modules it imports, k3lab module -> top-level external packages it imports)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    internal: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps, ext = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names
                ]
            for t in targets:
                if t.split(".")[0] == "k3lab":
                    dep = resolve(t)
                    if dep and dep != name:
                        deps.add(dep)
                else:
                    ext.add(t.split(".")[0])
        internal[name], external[name] = deps, ext
    return internal, external


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycle_in_the_package() -> None:
    graph, _ = imports()
    assert len(graph) > 40  # the scan sees the package
    cycles = sorted({tuple(sorted({m, d})) for m in graph for d in graph[m] if m in closure(graph, d)})
    assert not cycles, f"modules that import each other (directly or through others): {cycles}"


def test_nn_is_pure_torch() -> None:
    """``k3lab.nn`` never reaches Hydra, OmegaConf, Lightning or MLflow, directly or through another k3lab module, and
    imports nothing from ``k3lab.data`` or ``k3lab.stages``."""
    graph, external = imports()
    nn_modules = [m for m in graph if m.startswith("k3lab.nn.")]
    assert len(nn_modules) >= 10
    for m in nn_modules:
        reach = {m} | closure(graph, m)
        banned = sorted(d for d in reach if d.startswith(("k3lab.data", "k3lab.stages")))
        assert not banned, f"{m} reaches {banned}"
        frameworks = sorted({(d, e) for d in reach for e in external[d] if e in FRAMEWORKS})
        assert not frameworks, f"{m} reaches {frameworks}"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layer order: upward or sideways between packages, or of an entry point."""
    rank = {p: i for i, layer in enumerate(LAYERS) for p in layer}
    bad = []
    for module, deps in sorted(graph.items()):
        parts = module.split(".")
        own = parts[1] if len(parts) > 2 or parts[-1] in rank else None
        for dep in sorted(deps):
            dep_parts = dep.split(".")
            if dep == "k3lab":
                continue
            if len(dep_parts) == 2 and dep_parts[1] not in rank:
                bad.append(f"{module} imports the entry point {dep}")
            elif own is not None and dep_parts[1] != own and rank[dep_parts[1]] >= rank[own]:
                bad.append(f"{module} ({own}, layer {rank[own]}) imports {dep} (layer {rank[dep_parts[1]]})")
    return bad


def test_layer_order_and_entry_points() -> None:
    """The root holds only the entry points (plus ``__init__``), every package sits in a layer, and no import (module
    level or function-local) goes up a layer, sideways, or into an entry point."""
    graph, _ = imports()
    root = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert root == ENTRY_POINTS
    packages = {p.parent.name for p in SRC.glob("*/__init__.py")} - {"conf"}
    assert packages == {p for layer in LAYERS for p in layer}
    assert not layer_violations(graph)


def test_layer_check_catches_what_it_forbids() -> None:
    """Planted violations (an upward import, a sideways one, an entry point imported) are each reported."""
    graph = {
        "k3lab.nn.unet": {"k3lab.stages.diffusion"},
        "k3lab.convert.formats": {"k3lab.ablation.views"},
        "k3lab.inference.sample_job": {"k3lab.sample"},
        "k3lab.sample": {"k3lab.inference.sample_job", "k3lab.run.config"},
        "k3lab.stages.diffusion": {"k3lab.nn.unet", "k3lab.inference.generator"},
    }
    bad = layer_violations(graph)
    assert len(bad) == 3 and all(any(m in b for b in bad) for m in ("nn.unet", "convert.formats", "the entry point"))


def test_hydra_targets_are_library_code_and_old_ones_still_resolve() -> None:
    """Every ``_target_`` in conf/ names an object that exists outside the entry points, and each module an older
    config may name (``MOVED_MODULES``) maps onto a module that exists."""
    import importlib
    import re

    from hydra.core.plugins import Plugins

    from k3lab.io.checkpoint import MOVED_MODULES, MOVED_TARGETS, moved_target

    # Hydra scans its plugins (re-importing its own sweeper modules) before it instantiates any target; importing the
    # sweeper plugin's module first would bind it to a BasicSweeper the scan then replaces
    Plugins.instance()
    conf = SRC.parents[1] / "conf"
    targets = set()
    for f in conf.rglob("*.yaml"):
        targets |= set(re.findall(r"_target_:\s*([\w.]+)", f.read_text()))
    assert len(targets) > 20
    for target in sorted(targets):
        module, _, name = target.rpartition(".")
        assert module.split(".")[1] not in ENTRY_POINTS, target
        assert hasattr(importlib.import_module(module), name), target
    for new in MOVED_MODULES.values():
        importlib.import_module(new)
    for old in ("k3lab.checkpoint.load_frozen", "k3lab.report.ReportCallback", "k3lab.text_encoders.tiny_t5"):
        module, _, name = moved_target(old).rpartition(".")
        assert hasattr(importlib.import_module(module), name), old
    assert moved_target("k3lab.nn.unet.KandinskyUNet") == "k3lab.nn.unet.KandinskyUNet"
    for old, new in MOVED_TARGETS.items():  # the single moved targets point at objects that exist
        module, _, name = new.rpartition(".")
        assert moved_target(old) == new and hasattr(importlib.import_module(module), name), old


def test_the_scan_sees_what_it_forbids(tmp_path: Path) -> None:
    """The checks above would fail on the cycle and the leak they forbid (the scanner is not blind)."""
    graph, external = imports()
    assert "k3lab.tracking.sweep" in closure(graph, "k3lab.report")  # report reads tracking ...
    assert "k3lab.report" not in closure(graph, "k3lab.tracking.sweep")  # ... never the other way
    assert "omegaconf" in external["k3lab.io.checkpoint"] and "k3lab.io.checkpoint" not in closure(
        graph, "k3lab.nn.first_stage"
    )


def test_packaging_lists_every_package_and_ships_the_configs(tmp_path: Path) -> None:
    """pyproject.toml lists the packages explicitly (so conf/ can ship as k3lab/conf): the list must match the tree,
    and a built wheel holds every config (console scripts installed from it find their configs)."""
    import subprocess
    import sys
    import zipfile

    import tomllib

    root = SRC.parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(SRC.parent).parts) for p in SRC.rglob("__init__.py")} | {
        "evaluation",
        "k3lab.conf",
    }
    found |= {
        ".".join(p.parent.relative_to(SRC.parent).parts) for p in (SRC.parent / "hydra_plugins").rglob("__init__.py")
    }
    assert listed == found
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(root),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    names = set(zipfile.ZipFile(next(tmp_path.glob("k3lab-*.whl"))).namelist())
    configs = {f"k3lab/conf/{p.relative_to(root / 'conf').as_posix()}" for p in (root / "conf").rglob("*.yaml")}
    assert len(configs) > 50 and configs <= names and "evaluation/data/sbs_page.html" in names
