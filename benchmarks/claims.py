"""The claims ledger (``docs/claims.yaml``): every figure the README and the docs pages state, with the command that
reproduces it.

    python benchmarks/claims.py check                  # every figure of README.md + docs/*.md in the ledger
    python benchmarks/claims.py scan docs/training.md  # the figures of a page no claim covers, with their lines
    python benchmarks/claims.py digest README.md --table "| text encoder | block |"   # a table's figure digest
    python benchmarks/claims.py run --quick            # re-run the claims that cost under a minute: stated vs now
    python benchmarks/claims.py run --only movq_tiny_params
    python benchmarks/claims.py run --max-cost 1200    # every claim whose command takes up to 20 min
    python benchmarks/claims.py run --script "reproduce.py main-job --json"   # the claims one run of the main job backs
    python benchmarks/claims.py run --script "main-job --json" --results main.json   # ... against a run made earlier

A *figure* is a number written in a page's prose, its tables or the comments of its code blocks (code itself,
inline code, link targets and HTML comments are not prose): ``0.747``, ``2,943,807``, ``17 min``, ``1.31x``,
``64x64``. Each claim covers a span of one page: a ``quote`` (its text, whitespace-insensitive; ``figures`` lists the
figures in it, in order), a ``section`` (a heading: everything up to the next heading of the same or a higher level)
or a ``table`` (the table whose first row starts with the given text); the last two carry a ``digest`` of the figures
they hold. ``check`` fails when a figure lies outside every claim or a claim's figures differ from the page (a figure
edited in the page and not in the ledger).

``run`` re-measures what can be re-measured. A claim's ``check`` is one of:

- ``pytest: [node ids]``: tests that assert the figure exactly (holds = they pass);
- ``script: <shell command>`` with ``{out}`` where it writes its JSON, and ``expect: {key: stated value}``: holds
  when each measured value is within ``tolerance`` (relative) + ``margin`` (absolute) of the stated one (strings:
  equal); ``expect_max`` / ``expect_min`` state bounds (``no gain``: a speed ratio at most 1). A key that is a time
  in seconds (``time_keys``) is first scaled by the ratio of the stated machine's fp32 matmul GFLOP/s to this
  machine's. Keys index the JSON: ``a.b``, ``0``, or ``[field=value]`` for the first matching record of a list.

Kinds without a check are not re-run and say so: ``history`` (a finding of an earlier design, with its commit: it
lives on docs/history.md), ``reported`` (measured elsewhere: an outside check or a paper, with ``source``), and
``run`` claims whose cost exceeds the budget asked for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
LEDGER = ROOT / "docs" / "claims.yaml"
QUICK_SECONDS = 60
UNITS = {
    "x",
    "s",
    "ms",
    "min",
    "h",
    "M",
    "B",
    "K",
    "k",
    "GB",
    "GiB",
    "MB",
    "MiB",
    "KB",
    "px",
    "dB",
    "th",
    "st",
    "nd",
    "rd",
    "D",
    "bit",
    "bits",
    "GFLOP",
    "TFLOP",
    "TB",
    "TiB",
}
NUMBER = re.compile(r"(?<![\w.])(?:(?<=[\s(|*~\[/])[-+])?\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?(?:x\d+)*")
NAMED = re.compile(r"(?:Kandinsky|arXiv|SciPy|Python|Flan-T5|U\+|HPSv|MoVQGAN) ?$")
KINDS = {"exact", "measured", "timing", "config", "design", "history", "reported", "run"}


def pages(root: Path = ROOT) -> list[Path]:
    """The pages whose figures the ledger covers: the README and docs/*.md (docs/index.md is the README's copy)."""
    return [root / "README.md", *sorted(p for p in (root / "docs").glob("*.md") if p.name != "index.md")]


def prose(text: str) -> str:
    """The page with everything that is not prose blanked to spaces (offsets and newlines kept): fenced code, inline
    code, HTML comments, link targets, bare URLs, mkdocstrings directives."""

    def blank(m: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    def code(m: re.Match[str]) -> str:  # a fenced block: only its comments (`` # ...`` to the line's end) are prose
        return "\n".join(
            re.sub(r"[^\n]", " ", line[: c.start()]) + line[c.start() :]
            if (c := re.search(r"\s#\s", line))
            else " " * len(line)
            for line in m.group(0).split("\n")
        )

    text = re.sub(r"```.*?```", code, text, flags=re.S)
    for pattern in (r"<!--.*?-->", r"`(?:[^`\n]|\n(?![ \t]*\n))+`", r"\]\([^)\n]*\)", r"https?://\S+", r"^:::.*$"):
        text = re.sub(pattern, blank, text, flags=re.S | re.M)
    return text


def figures(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, str]]:
    """``(offset, figure)`` for every figure in ``text[start:end]`` (``text`` already :func:`prose`)."""
    end = len(text) if end is None else end
    out = []
    for m in NUMBER.finditer(text, start, end):
        after = re.match(r"[A-Za-z_]+", text[m.end() :])
        if after and after.group(0) not in UNITS:
            continue  # part of a name: minilm_l6, 7ac16fa, H100
        if NAMED.search(text, max(0, m.start() - 12), m.start()):
            continue  # a name's number: Kandinsky 3, Kandinsky 2.2, arXiv 2312.03511
        out.append((m.start(), m.group(0)))
    return out


def digest(found: list[tuple[int, str]]) -> str:
    """A short hash of a span's figures in order: any edited, added or removed figure changes it."""
    return hashlib.sha1(" ".join(f for _, f in found).encode()).hexdigest()[:10]


@dataclass
class Claim:
    """One entry of the ledger (see the module docstring for the fields)."""

    id: str
    page: str
    kind: str
    quote: str | None = None
    section: str | None = None
    table: str | None = None
    figures: list[str] = field(default_factory=list)
    digest: str | None = None
    command: str | None = None
    check: dict[str, Any] | None = None
    tolerance: float = 0.0
    margin: float = 0.0
    commit: str | None = None
    gflops: float | None = None
    seeds: str | None = None
    spread: str | None = None
    cost_s: float = 0.0
    source: str | None = None
    time_keys: list[str] = field(default_factory=list)


def load(path: Path = LEDGER) -> list[Claim]:
    """The ledger's claims, each field checked: a typo in the ledger is an error naming the claim."""
    raw = yaml.safe_load(path.read_text())
    claims, seen = [], set()
    known = set(Claim.__dataclass_fields__)
    for i, entry in enumerate(raw["claims"]):
        name = entry.get("id", f"#{i}")
        if unknown := set(entry) - known:
            raise ValueError(f"claim {name}: unknown fields {sorted(unknown)}")
        claim = Claim(**{k: v for k, v in entry.items()})
        claim.figures = [str(f) for f in claim.figures]
        if claim.id in seen:
            raise ValueError(f"claim {claim.id}: id used twice")
        seen.add(claim.id)
        if claim.kind not in KINDS:
            raise ValueError(f"claim {claim.id}: kind {claim.kind!r} is not one of {sorted(KINDS)}")
        if sum(x is not None for x in (claim.quote, claim.section, claim.table)) != 1:
            raise ValueError(f"claim {claim.id}: give exactly one of quote, section, table")
        if claim.kind == "history" and not claim.commit:
            raise ValueError(f"claim {claim.id}: a history claim names the commit it was measured on")
        if claim.kind in {"reported", "design"} and not claim.source:
            raise ValueError(
                f"claim {claim.id}: a {claim.kind} claim names its source (where it is defined or measured)"
            )
        if claim.kind not in {"history", "reported", "design"} and not (claim.command or claim.check):
            raise ValueError(f"claim {claim.id}: no command reproduces it")
        claims.append(claim)
    return claims


def span(claim: Claim, text: str) -> tuple[int, int] | None:
    """Where the claim's span lies in the page (raw text, or its prose: same offsets), or None when it is not there."""
    if claim.quote is not None:
        words = claim.quote.split()
        m = re.search(r"\s+".join(re.escape(w) for w in words), text)
        return (m.start(), m.end()) if m else None
    if claim.section is not None:
        level = len(claim.section) - len(claim.section.lstrip("#"))
        m = re.search(rf"^{re.escape(claim.section.strip())}\s*$", text, flags=re.M)
        if not m:
            return None
        nxt = re.compile(rf"^#{{1,{level}}} ", flags=re.M).search(text, m.end())
        return m.start(), nxt.start() if nxt else len(text)
    assert claim.table is not None
    m = re.search(rf"^[ \t]*{re.escape(claim.table.strip())}", text, flags=re.M)
    if not m:
        return None
    end = m.start()
    for line in text[m.start() :].splitlines(keepends=True):
        if not line.strip().startswith("|"):
            break
        end += len(line)
    return m.start(), end


def loose_span(claim: Claim, text: str) -> tuple[int, int] | None:
    """Where the claim's quote lies with any of its figures changed (to name the edit), or None."""
    assert claim.quote is not None

    def literal(segment: str) -> str:
        return "".join(r"\s+" if piece.isspace() else re.escape(piece) for piece in re.split(r"(\s+)", segment))

    parts, last = [], 0
    for pos, fig in figures(prose(claim.quote)):
        parts += [literal(claim.quote[last:pos]), NUMBER.pattern]
        last = pos + len(fig)
    parts.append(literal(claim.quote[last:]))
    m = re.search("".join(parts), text)
    return (m.start(), m.end()) if m else None


@dataclass
class PageCheck:
    """What :func:`check_page` found on one page."""

    stray: list[tuple[int, str, str]]  # (line, figure, the line's text)
    problems: list[str]


def check_page(page: Path, claims: list[Claim], root: Path = ROOT) -> PageCheck:
    """Every figure of the page covered by a claim, every claim of the page found with the figures it states."""
    raw = page.read_text()
    text = prose(raw)
    rel = page.relative_to(root).as_posix()
    covered: list[tuple[int, int]] = []
    problems = []
    for claim in (c for c in claims if c.page == rel):
        where = span(claim, raw)
        if where is None and claim.quote is not None and (where := loose_span(claim, raw)) is not None:
            found = [f for _, f in figures(text, *where)]
            problems.append(f"{claim.id}: the page states {found}, the ledger {claim.figures}")
            covered.append(where)
            continue
        if where is None:
            problems.append(f"{claim.id}: its span is not on {rel} any more (the text changed: update the ledger)")
            continue
        found = figures(text, *where)
        if claim.quote is not None:
            if [f for _, f in found] != claim.figures:
                problems.append(f"{claim.id}: the page states {[f for _, f in found]}, the ledger {claim.figures}")
        elif claim.digest != digest(found):
            problems.append(
                f"{claim.id}: the figures of its {'section' if claim.section else 'table'} changed "
                f"(digest {digest(found)}, ledger {claim.digest})"
            )
        covered.append(where)
    stray = []
    for pos, fig in figures(text):
        if not any(a <= pos < b for a, b in covered):
            line = text.count("\n", 0, pos) + 1
            stray.append((line, fig, page.read_text().splitlines()[line - 1].strip()))
    return PageCheck(stray, problems)


def check_all(root: Path = ROOT, ledger: Path | None = None) -> tuple[int, int, list[str]]:
    """(figures on the pages, figures covered by the ledger, every problem as one line)."""
    claims = load(ledger or root / "docs" / "claims.yaml")
    known = {p.relative_to(root).as_posix() for p in pages(root)}
    problems = [f"{c.id}: page {c.page} is not one of the checked pages" for c in claims if c.page not in known]
    total = stray = 0
    for page in pages(root):
        result = check_page(page, claims, root)
        total += len(figures(prose(page.read_text())))
        stray += len(result.stray)
        problems += result.problems
        rel = page.relative_to(root).as_posix()
        problems += [f"{rel}:{line}: figure {fig!r} is in no claim: {ctx[:110]}" for line, fig, ctx in result.stray]
    return total, total - stray, problems


# ---------------------------------------------------------------------------------------------------- re-running


def machine_gflops() -> float:
    """This machine's fp32 matmul rate (1024x1024, best of 8), the figure every timing is scaled by."""
    sys.path.insert(0, str(ROOT / "src"))
    from k3lab.ablation.timing import matmul_gflops

    return matmul_gflops()


def lookup(data: Any, key: str) -> Any:
    """``a.b.0.c`` in nested JSON; a key may hold dots when it is a whole key of the mapping, and
    ``[field=value,field=value]`` picks the first record of a list that matches (``[axis=model/prior].effect``)."""
    if isinstance(data, dict) and key in data:
        return data[key]
    if key.startswith("["):
        cond, _, rest = key[1:].partition("]")
        want = dict(part.split("=", 1) for part in cond.split(","))
        hits = [r for r in data if all(str(r.get(k)) == v for k, v in want.items())]
        if not hits:
            raise KeyError(f"no record with {want}")
        return lookup(hits[0], rest.removeprefix(".")) if rest else hits[0]
    head, _, rest = key.partition(".")
    value = data[int(head)] if isinstance(data, list) else data[head]
    return lookup(value, rest) if rest else value


def compare(got: Any, want: Any, tolerance: float, margin: float) -> bool:
    """A measured value against the stated one: strings exactly, numbers within ``tolerance`` (relative) + ``margin``
    (absolute)."""
    if isinstance(want, str):
        return str(got) == want
    if isinstance(want, (list, tuple)):
        return (
            isinstance(got, (list, tuple))
            and len(got) == len(want)
            and all(compare(g, w, tolerance, margin) for g, w in zip(got, want, strict=True))
        )
    try:
        return abs(float(got) - float(want)) <= tolerance * abs(float(want)) + margin + 1e-12
    except (TypeError, ValueError):
        return False


@dataclass
class Outcome:
    """One claim re-run: stated, measured, whether it holds."""

    claim: Claim
    status: str  # holds | FAILS | not re-run
    stated: str
    measured: str
    seconds: float


def run_pytest(claims: list[Claim]) -> dict[str, tuple[bool, str]]:
    """Run every listed test once (one pytest process); per claim, whether all its tests passed."""
    nodes = sorted({n for c in claims for n in c.check["pytest"]})  # type: ignore[index]
    if not nodes:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "", "-p", "no:cacheprovider", f"--junitxml={xml}", *nodes],
            cwd=ROOT,
            check=False,
        )
        passed: dict[str, bool] = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            module = case.get("classname", "").replace(".", "/")
            name = f"{module}.py::{case.get('name')}"
            passed[name] = not any(child.tag in {"failure", "error", "skipped"} for child in case)
    out = {}
    for c in claims:
        results = []
        for node in c.check["pytest"]:  # type: ignore[index]
            hits = [ok for name, ok in passed.items() if name == node or name.startswith((node + "[", node + "::"))]
            results.append(bool(hits) and all(hits))
        out[c.id] = (all(results), f"{sum(results)}/{len(results)} tests pass")
    return out


def run_script(claim: Claim, gflops: float, cache: dict[str, Any] | None = None) -> tuple[bool, str, str]:
    """Run the claim's script and compare each expected key: (holds, stated, measured). ``cache`` (script -> its JSON
    or its error) runs a script once for every claim that checks against it (the main job backs many claims)."""
    assert claim.check is not None
    script = claim.check["script"]
    if cache is not None and script in cache:
        data = cache[script]
        if isinstance(data, str):
            return False, "", data
        return compare_claim(claim, data, gflops)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = claim.check["script"].replace("{out}", shlex.quote(str(out)))
        if cmd.startswith("python "):  # this interpreter (the project's environment), not whatever python is on PATH
            cmd = shlex.quote(sys.executable) + cmd[len("python") :]
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'benchmarks'}:{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            error = f"the command failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
            if cache is not None:
                cache[script] = error
            return False, "", error
        data = json.loads(out.read_text())
    if cache is not None:
        cache[script] = data
    return compare_claim(claim, data, gflops)


def compare_claim(claim: Claim, data: Any, gflops: float) -> tuple[bool, str, str]:
    """The claim's expected values against a script's JSON: (holds, stated, measured)."""
    assert claim.check is not None
    ok, stated, measured = True, [], []
    bounds = [
        ("=", claim.check.get("expect") or {}),
        ("<=", claim.check.get("expect_max") or {}),
        (">=", claim.check.get("expect_min") or {}),
    ]
    for op, expected in bounds:
        for key, value in expected.items():
            try:
                got = lookup(data, key)
            except (KeyError, IndexError, ValueError, TypeError) as err:
                ok = False
                measured.append(f"{key}: missing ({err})")
                continue
            want = value
            if key in claim.time_keys and claim.gflops:
                want = float(value) * claim.gflops / gflops
            if op == "=":
                ok &= compare(got, want, claim.tolerance, claim.margin)
            elif op == "<=":
                ok &= float(got) <= float(want) * (1 + claim.tolerance) + claim.margin
            else:
                ok &= float(got) >= float(want) * (1 - claim.tolerance) - claim.margin
            scaled = f" (scaled {float(want):.4g})" if key in claim.time_keys else ""
            stated.append(f"{key} {op} {value}{scaled}")
            measured.append(f"{key}={got:.6g}" if isinstance(got, float) else f"{key}={got}")
    return ok, "; ".join(stated), "; ".join(measured)


def by_script(claims: list[Claim], text: str) -> list[Claim]:
    """The claims whose check script contains ``text`` (``--script "main-job --json"``: all that one run backs)."""
    return [c for c in claims if c.check and text in str(c.check.get("script", ""))]


def reproduce_request(script: str) -> dict[str, Any] | None:
    """What a ``benchmarks/reproduce.py`` command line asks for (what, seeds, steps), or None for another script."""
    words = shlex.split(script)
    if "benchmarks/reproduce.py" not in words:
        return None
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("what")
    p.add_argument("--seeds", default=None)
    p.add_argument("--steps", type=int, default=3000)
    args, _ = p.parse_known_args(words[words.index("benchmarks/reproduce.py") + 1 :])
    return {"what": args.what, "seeds": args.seeds, "steps": args.steps}


def results_cache(claims: list[Claim], data: dict[str, Any]) -> dict[str, Any]:
    """Script -> ``data`` for each claim whose ``reproduce.py`` script asks for the run ``data`` holds (its
    ``reproduce`` record: what, seeds, steps); nothing for a JSON without that record. A run made in a kept root
    (``--root``, shared parts possibly cached) does not stand for a timing claim's from-scratch run: that script is
    left to run again."""
    held = data.get("reproduce")
    if not isinstance(held, dict):
        return {}
    want = {k: held.get(k) for k in ("what", "seeds", "steps")}
    timed = {str((c.check or {}).get("script", "")) for c in claims if c.time_keys}
    out: dict[str, Any] = {}
    for c in claims:
        script = str((c.check or {}).get("script", ""))
        if script and reproduce_request(script) == want and not (held.get("root") and script in timed):
            out[script] = data
    return out


def rerun(claims: list[Claim], budget: float, cache: dict[str, Any] | None = None) -> list[Outcome]:
    """Re-run each claim whose cost fits the budget (seconds each); the rest are reported as not re-run. ``cache``
    (script -> its JSON) holds results already measured (``--results``): those scripts are not run again."""
    gflops = machine_gflops()
    print(f"machine: {gflops:.0f} GFLOP/s fp32 matmul (1024x1024, best of 8)")
    runnable = [c for c in claims if c.check and c.cost_s <= budget]
    t0 = time.perf_counter()
    tests = run_pytest([c for c in runnable if "pytest" in c.check])  # type: ignore[operator]
    test_seconds = time.perf_counter() - t0
    out = []
    cache = {} if cache is None else cache  # each script once per run, however many claims check against it
    for c in claims:
        stated = ", ".join(c.figures) if c.figures else f"digest {c.digest}"
        if c not in runnable:
            if c.kind in {"history", "reported", "design"}:
                why = c.kind
            elif not c.check:
                why = f"no automatic check; reproduce: {c.command}"
            else:
                why = f"cost {c.cost_s:.0f} s"
            if c.kind in {"history", "reported"}:
                why += f" ({c.commit or c.source})"
            out.append(Outcome(c, "not re-run", stated, why, 0.0))
        elif "pytest" in c.check:  # type: ignore[operator]
            ok, what = tests[c.id]
            out.append(Outcome(c, "holds" if ok else "FAILS", stated, what, test_seconds / max(len(tests), 1)))
        else:
            t = time.perf_counter()
            ok, want, got = run_script(c, gflops, cache)
            out.append(Outcome(c, "holds" if ok else "FAILS", want, got, time.perf_counter() - t))
            # each script claim as it ends, so a run stopped early still shows what it re-measured
            print(f"{c.id}: {out[-1].status}; {want} | {got} ({out[-1].seconds:.0f} s)", flush=True)
    return out


def table(outcomes: list[Outcome]) -> str:
    """The markdown table ``run`` prints."""
    rows = ["| claim | page | kind | stated | measured now | holds |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        cell = lambda s: s.replace("|", "/")[:140]  # noqa: E731
        rows.append(
            f"| {o.claim.id} | {o.claim.page} | {o.claim.kind} | {cell(o.stated)} | {cell(o.measured)} | {o.status} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="every figure of the README and docs in the ledger, as stated")
    scan = sub.add_parser("scan", help="the figures of a page no claim covers")
    scan.add_argument("page", type=Path)
    dig = sub.add_parser("digest", help="the digest of a section's or table's figures")
    dig.add_argument("page", type=Path)
    dig.add_argument("--section")
    dig.add_argument("--table")
    run = sub.add_parser("run", help="re-run the claims: stated vs measured now")
    run.add_argument("--quick", action="store_true", help=f"only claims that cost under {QUICK_SECONDS} s each")
    run.add_argument("--only", action="append", default=[], help="claim id (repeatable)")
    run.add_argument("--max-cost", type=float, default=float("inf"), help="skip claims costing more (seconds)")
    run.add_argument("--script", default=None, help="only claims whose check script contains this text")
    run.add_argument(
        "--results",
        type=Path,
        default=None,
        help="a reproduce.py JSON written earlier (e.g. with --root to reuse shared parts): the claims whose script "
        "asks for the same run are checked against it instead of re-running",
    )
    run.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.cmd == "check":
        total, covered, problems = check_all()
        print("\n".join(problems))
        print(f"{covered} of {total} figures on {len(pages())} pages are in the ledger; {len(problems)} problems")
        return 1 if problems else 0
    if args.cmd == "scan":
        page = args.page.resolve()
        result = check_page(page, load(), ROOT)
        print("\n".join(result.problems))
        for line, fig, ctx in result.stray:
            print(f"{line}: {fig}  | {ctx[:150]}")
        return 0
    if args.cmd == "digest":
        raw = args.page.resolve().read_text()
        text = prose(raw)
        probe = Claim(id="probe", page="", kind="design", section=args.section, table=args.table)
        where = span(probe, raw)
        if where is None:
            print("not found")
            return 1
        found = figures(text, *where)
        print(digest(found), len(found), "figures:", " ".join(f for _, f in found))
        return 0
    claims = load()
    if args.only:
        unknown = set(args.only) - {c.id for c in claims}
        if unknown:
            parser.error(f"no claim {sorted(unknown)}")
        claims = [c for c in claims if c.id in args.only]
    if args.script:
        claims = by_script(claims, args.script)
        if not claims:
            parser.error(f"no claim's check script contains {args.script!r}")
    budget = QUICK_SECONDS if args.quick else args.max_cost
    cache: dict[str, Any] = {}
    if args.results:
        try:
            data = json.loads(args.results.read_text())
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"--results {args.results}: not a readable reproduce.py JSON ({err})")
        if not isinstance(data, dict):
            parser.error(f"--results {args.results}: not a reproduce.py JSON (a {type(data).__name__}, not an object)")
        cache = results_cache(claims, data)
        if not cache:
            held = data.get("reproduce")
            parser.error(f"{args.results}: no selected claim's script asks for the run it holds ({held})")
    outcomes = rerun(claims, budget, cache)
    print(table(outcomes))
    held = sum(o.status == "holds" for o in outcomes)
    failed = sum(o.status == "FAILS" for o in outcomes)
    print(f"\n{held} hold, {failed} fail, {len(outcomes) - held - failed} not re-run")
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ | {"claim": o.claim.id} for o in outcomes], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
