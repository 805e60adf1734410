"""The claims ledger (docs/claims.yaml, benchmarks/claims.py): every figure in the README and docs pages is in it as
stated, a figure added or edited in a page without the ledger fails the check (by page, line and figure), each claim's
check points at a test or script that exists, and the re-run compares measured against stated values as documented."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_claims_module():
    spec = importlib.util.spec_from_file_location("claims", ROOT / "benchmarks" / "claims.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["claims"] = module
    spec.loader.exec_module(module)
    return module


C = load_claims_module()


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The README, the docs pages and the ledger in a scratch root, to plant figures in."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_every_figure_on_the_pages_is_in_the_ledger_as_stated() -> None:
    total, covered, problems = C.check_all()
    assert not problems, "\n".join(problems[:20])
    assert total == covered and total > 900  # the README and 11 docs pages state ~970 figures


def test_a_planted_figure_fails_the_check_naming_page_line_and_figure(copy: Path) -> None:
    readme = copy / "README.md"
    lines = readme.read_text().splitlines()
    blank = lines.index("")  # a paragraph of its own after the title's
    lines[blank:blank] = ["", "The tiny U-Net trains at 4242 samples/s."]
    readme.write_text("\n".join(lines) + "\n")
    _, _, problems = C.check_all(copy)
    line = blank + 2
    assert problems == [f"README.md:{line}: figure '4242' is in no claim: The tiny U-Net trains at 4242 samples/s."]
    assert C.check_all(ROOT)[2] == []  # the real pages are untouched


def test_an_edited_figure_fails_the_check_naming_the_claim(copy: Path) -> None:
    page = copy / "docs" / "training.md"
    page.write_text(page.read_text().replace("(2,943,807 parameters", "(3,200,000 parameters"))
    _, _, problems = C.check_all(copy)
    assert len(problems) == 1 and problems[0].startswith("training.movq_tiny_parameters_px: the page states")
    table = copy / "docs" / "clusters.md"
    table.write_text(table.read_text().replace("| 97 |", "| 165 |"))
    _, _, problems = C.check_all(copy)
    assert any(
        p.startswith("clusters.table_experiment_kandinsky_b_u: the figures of its table changed") for p in problems
    )


def test_what_counts_as_a_figure() -> None:
    text = C.prose(
        "Kandinsky 3 and Kandinsky 2.2 (arXiv 2312.03511) with minilm_l6 at 7ac16fa: 0.747 ± 0.112, 2,943,807 "
        "parameters, 1.31x, 64x64 latents, 17 min, -0.351 and 0.688-0.709.\n"
        "```bash\npython -m k3lab.train trainer.max_steps=3000   # 12 cells\n```\n`stage.lr=1e-4` [link](a/b/3.md)"
    )
    assert [f for _, f in C.figures(text)] == [
        "0.747",
        "0.112",
        "2,943,807",
        "1.31",
        "64x64",
        "17",
        "-0.351",
        "0.688",
        "0.709",
        "12",
    ]


def test_bad_ledger_entries_are_refused_by_name(tmp_path: Path) -> None:
    ledger = tmp_path / "claims.yaml"
    cases = {
        "id: a\n  page: README.md\n  quote: x\n  kind: history\n": "claim a: a history claim names the commit",
        "id: b\n  page: README.md\n  quote: x\n  kind: timing\n": "claim b: no command reproduces it",
        "id: c\n  page: README.md\n  quote: x\n  kind: exact\n  command: y\n  speed: 3\n": "claim c: unknown fields",
        "id: d\n  page: README.md\n  kind: exact\n  command: y\n": "claim d: give exactly one of quote",
        "id: e\n  page: README.md\n  quote: x\n  kind: guess\n  command: y\n": "claim e: kind 'guess'",
    }
    for entry, message in cases.items():
        ledger.write_text("claims:\n- " + entry)
        with pytest.raises(ValueError, match=message):
            C.load(ledger)


def test_every_check_points_at_a_test_or_script_that_exists() -> None:
    tests: dict[str, set[str]] = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        tests[f"tests/{path.name}"] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    claims = C.load()
    assert len({c.id for c in claims}) == len(claims)
    for claim in claims:
        for node in (claim.check or {}).get("pytest", []):
            file, _, name = node.partition("::")
            assert file in tests and (not name or name in tests[file]), f"{claim.id}: no test {node}"
        script = (claim.check or {}).get("script", "")
        for word in script.split():
            if word.startswith("benchmarks/"):
                assert (ROOT / word).exists(), f"{claim.id}: no {word}"
        if claim.check and "script" in claim.check:
            assert "{out}" in script and (
                claim.check.get("expect") or claim.check.get("expect_max") or claim.check.get("expect_min")
            ), claim.id


def test_a_script_claim_compares_measured_and_stated_values(tmp_path: Path) -> None:
    write = f"{sys.executable} -c \"import json,sys; json.dump({{'n': 12, 's': 'a b', 'rows': [{{'k': 'x', 'v': 0.5}}], 'secs': 100.0}}, open(sys.argv[1], 'w'))\" {{out}}"  # noqa: E501
    claim = C.Claim(
        id="t",
        page="README.md",
        kind="timing",
        quote="x",
        command="y",
        gflops=200.0,
        tolerance=0.1,
        time_keys=["secs"],
        check={"script": write, "expect": {"n": 12, "s": "a b", "rows.[k=x].v": 0.52, "secs": 50.0}},
    )
    ok, stated, measured = C.run_script(claim, gflops=100.0)  # half as fast: 50 s stated -> 100 s expected here
    assert ok, (stated, measured)
    assert "secs = 50.0 (scaled 100)" in stated and "rows.[k=x].v=0.5" in measured
    claim.check["expect"]["n"] = 20
    assert not C.run_script(claim, gflops=100.0)[0]
    claim.check["expect"]["n"] = 12
    assert not C.run_script(claim, gflops=200.0)[0]  # 100 s measured where a machine this fast should take 50
    claim.check = {"script": write, "expect_max": {"rows.[k=x].v": 0.4}}
    assert not C.run_script(claim, gflops=100.0)[0]
    claim.check = {"script": write, "expect": {"missing": 1}}
    ok, _, measured = C.run_script(claim, gflops=100.0)
    assert not ok and "missing" in measured


def test_script_selection_picks_exactly_the_claims_one_run_backs() -> None:
    claims = C.load()
    main_job = {c.id for c in C.by_script(claims, "reproduce.py main-job --json")}  # seeds 0, 1, 2
    replication = {c.id for c in C.by_script(claims, "reproduce.py main-job --seeds 3,4,5 --json")}
    assert "readme.table_effect_level_reference_single" in main_job and "ablation.full_run_clip_1500" in main_job
    assert "ablation.replication_seeds_345" in replication and not main_job & replication
    assert not C.by_script(claims, "no such script")


def test_results_of_an_earlier_run_stand_only_for_the_run_they_hold() -> None:
    def claim(script: str, timed: bool = False) -> C.Claim:
        return C.Claim(id=script, page="README.md", kind="run", quote="x", check={"script": script, "expect": {}},
                       time_keys=["wall_s"] if timed else [])  # fmt: skip

    main = claim("python benchmarks/reproduce.py main-job --json {out}")
    replication = claim("python benchmarks/reproduce.py main-job --seeds 3,4,5 --json {out}")
    editing = claim("python benchmarks/reproduce.py editing --steps 1500 --json {out}")
    other = claim("python benchmarks/cell_unet.py --json {out}")
    claims = [main, replication, editing, other]
    data = {"reproduce": {"what": "main-job", "seeds": None, "steps": 3000, "root": ""}}
    assert list(C.results_cache(claims, data)) == [main.check["script"]]  # type: ignore[index]
    seeds = {"reproduce": {**data["reproduce"], "seeds": "3,4,5"}}
    assert list(C.results_cache(claims, seeds)) == [replication.check["script"]]  # type: ignore[index]
    assert C.results_cache(claims, {"wall_s": 1.0}) == {}  # a JSON that does not say what it ran stands for nothing
    timed = claim(main.check["script"], timed=True)  # type: ignore[index]
    kept_root = {"reproduce": {**data["reproduce"], "root": "/tmp/px"}}
    assert C.results_cache([main, timed], kept_root) == {}  # a from-scratch time is not checked on a cached root
    assert list(C.results_cache([main, timed], data)) == [main.check["script"]]  # type: ignore[index]


def test_bad_results_files_are_refused_naming_the_file(tmp_path: Path, capsys) -> None:
    files = {"missing.json": None, "broken.json": "{not json", "list.json": "[1, 2]", "other.json": "{}"}
    for name, text in files.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            C.main(["run", "--script", "reproduce.py main-job --json", "--results", str(path)])
        assert exit_info.value.code == 2
        assert str(path) in capsys.readouterr().err
