"""The documentation: the README fits a screen, the site builds in strict mode (a broken link or a broken API
reference fails), its home page is the README, and every k3lab / evaluation command shown in the README and docs
parses (Hydra overrides compose against the real config tree, CLI flags exist in the command's parser)."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HYDRA_ENTRIES = {"k3lab.train", "k3lab.ablation", "k3lab.precompute", "k3lab.progressive"}
ARGPARSE_ENTRIES = {
    "k3lab.sample": "k3lab.sample",
    "k3lab.report": "k3lab.report",
    "k3lab.edit_bench": "k3lab.edit_bench",
    "k3lab.mapping": "k3lab.mapping",
    "k3lab.convert": "k3lab.convert.__main__",
    "evaluation": "evaluation.__main__",
}
SUBCOMMANDS = {"k3lab.convert", "evaluation"}


def index_from_readme(text: str) -> str:
    """docs/index.md is the README with its ``docs/`` links made relative to the site."""
    return re.sub(r"\]\(docs/([^)]+)\)", r"](\1)", text).replace("[docs/", "[")


def shown_commands(text: str) -> list[str]:
    """Every ``python -m k3lab...`` / ``python -m evaluation`` line inside a fenced shell block (continuations joined,
    comments dropped)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            code = re.split(r"\s#", line, maxsplit=1)[0]
            if re.search(r"python3? -m (k3lab|evaluation)\b", code):
                out.append(line)
    return out


def tokens_of(line: str) -> tuple[str, list[str]]:
    """(module, arguments) of one shown command, placeholders such as ``<run>`` made concrete."""
    line = re.sub(r"<[^<>]*>", "x", line)
    toks = shlex.split(line, comments=True)
    i = toks.index("-m", next(k for k, t in enumerate(toks) if t.endswith(("python", "python3"))))
    args = toks[i + 2 :]
    if "|" in args:
        args = args[: args.index("|")]
    return toks[i + 1], args


def all_commands() -> list[tuple[str, str, str, list[str]]]:
    out = []
    for page in PAGES:
        for line in shown_commands(page.read_text()):
            module, args = tokens_of(line)
            out.append((page.name, line.strip(), module, args))
    return out


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """A multirun's overrides with each sweep replaced by its first value (what its first job composes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        if parsed.is_sweep_override():
            first = next(iter(parsed.sweep_string_iterator()))
            out.append(f"{parsed.get_key_element()}={first}")
        else:
            out.append(text)
    return out


def help_text(module: str, sub: str | None) -> str:
    main = importlib.import_module(ARGPARSE_ENTRIES[module]).main
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        main([sub, "--help"] if sub else ["--help"])
    return buffer.getvalue()


def test_readme_fits_a_screen_and_the_site_home_is_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert (ROOT / "docs" / "index.md").read_text() == index_from_readme(readme), "regenerate docs/index.md"


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a link to a missing page or a broken ``:::`` API reference fails the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "architecture" / "index.html").read_text()
    assert "load_generator" in api and "Rebuild from a diffusion run" in api  # docstrings made it into the page


def test_the_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The strict build is not blind: a copy of the docs with one link to a missing page fails."""
    import shutil

    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "extending.md").write_text("# x\n\n[gone](no_such_page.md)\n")
    text = (tmp_path / "mkdocs.yml").read_text().replace("paths: [src, .]", f"paths: [{ROOT / 'src'}, {ROOT}]")
    (tmp_path / "mkdocs.yml").write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0 and "no_such_page.md" in result.stderr


def test_every_shown_command_parses() -> None:
    """Hydra commands compose (sweeps at their first value); argparse commands use only flags their parser has."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from k3lab.run.config import CONF_DIR

    commands = all_commands()
    assert len(commands) > 40
    assert {m for *_, m, _ in commands} >= {"k3lab.train", "k3lab.ablation", "k3lab.sample", "k3lab.report"}
    helps: dict[tuple[str, str | None], str] = {}
    problems = []
    for page, line, module, args in commands:
        if module in HYDRA_ENTRIES:
            overrides = first_of_sweeps([a for a in args if "=" in a and not a.startswith("-")])
            GlobalHydra.instance().clear()
            try:
                with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                    compose("train", overrides=overrides, return_hydra_config=True)
            except Exception as e:  # noqa: BLE001 - collected and reported together below
                problems.append(f"{page}: {line}\n  {type(e).__name__}: {str(e).splitlines()[0]}")
        elif module in ARGPARSE_ENTRIES:
            sub = args[0] if module in SUBCOMMANDS and args and not args[0].startswith("-") else None
            if (module, sub) not in helps:
                helps[module, sub] = help_text(module, sub)
            flags = {a.split("=")[0] for a in args if a.startswith("--")}
            missing = sorted(f for f in flags if f not in helps[module, sub])
            if missing or not helps[module, sub]:
                problems.append(f"{page}: {line}\n  flags not in the parser: {missing}")
        else:
            problems.append(f"{page}: {line}\n  unknown entry point python -m {module}")
    GlobalHydra.instance().clear()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "line",
    [
        "python -m k3lab.train experiment=no_such_experiment",
        "python -m k3lab.sample x --no-such-flag 3",
        "python -m k3lab.nothing here",
    ],
)
def test_the_command_check_catches_a_broken_command(line: str, tmp_path: Path, monkeypatch) -> None:
    """A planted bad command (unknown experiment, unknown flag, unknown module) is reported."""
    page = tmp_path / "page.md"
    page.write_text(f"```bash\n{line}\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "PAGES", [*PAGES, page])
    with pytest.raises(AssertionError, match=re.escape(line)):
        test_every_shown_command_parses()
