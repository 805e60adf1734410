"""``python -m evaluation suite``, ``compare``, ``agreement`` and ``noise`` end to end, with a generator command that
draws images (no model), a small random CLIP and HPSv2 saved in their published layouts, malformed prompt sets and
a simulated side-by-side study whose raters follow a known metric with known noise."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from evaluation import agreement, scorefile
from evaluation.__main__ import main
from evaluation.preference import sha256_file, sha256_files
from evaluation.prompts import Skips, load_geneval, load_partiprompts
from evaluation.reference_clip import NAME, model_config
from tests.test_preference import save_hpsv2

# A generator command: one image per prompt and seed, its colour a hash of the prompt; counts its calls.
GENERATOR = r"""
import hashlib, json, sys
from pathlib import Path
from PIL import Image
prompts, out, seeds, calls = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
calls.write_text(str(int(calls.read_text() if calls.exists() else 0) + 1))
out.mkdir(parents=True, exist_ok=True)
lines = []
for line in open(prompts, encoding="utf-8"):
    row = json.loads(line)
    for s in range(seeds):
        h = hashlib.sha256(f"{row['prompt']}:{s}".encode()).digest()
        name = f"{row['id']}_{s}.png"
        Image.new("RGB", (32, 32), tuple(h[:3])).save(out / name)
        lines.append(json.dumps({"file": name, "prompt_id": row["id"], "prompt": row["prompt"], "seed": s}))
(out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
"""


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """Prompt sets in each format (with bad rows), a generator script, a random CLIP and HPSv2 on disk."""
    import open_clip

    sets = tmp_path / "prompt-sets"
    (sets / "partiprompts").mkdir(parents=True)
    rows = ["Prompt\tCategory\tChallenge\tNote"]
    rows += [
        f"a {c} thing number {i}\t{c}\t{'Basic' if i % 2 else 'Complex'}\t"
        for c in ("Animals", "Arts")
        for i in range(6)
    ]
    rows += ["\tArts\tBasic\t", "x" * 10_000 + "\tArts\tBasic\t"]  # empty and 10,000-character prompts
    (sets / "partiprompts" / "PartiPrompts.tsv").write_bytes(
        ("\n".join(rows) + "\n").encode() + b"caf\xe9 au lait\tFood\tBasic\t\n"  # Latin-1, not UTF-8
    )
    (sets / "geneval").mkdir()
    geneval = [
        {"prompt": f"a photo of {n} cats", "tag": t} for n, t in zip(range(8), ["counting", "colors"] * 4, strict=True)
    ]
    (sets / "geneval" / "evaluation_metadata.jsonl").write_text(
        "\n".join(map(json.dumps, geneval)) + '\n{"tag": "colors"}\nnot json\n'
    )
    gen = tmp_path / "gen.py"
    gen.write_text(GENERATOR)
    config = tmp_path / f"{NAME}.json"
    config.write_text(json.dumps(model_config(32)))
    open_clip.add_model_config(config)
    torch.manual_seed(3)
    torch.save(open_clip.create_model(NAME).state_dict(), tmp_path / "clip.pt")
    hps, hps_config = save_hpsv2(tmp_path)
    return {"root": tmp_path, "sets": sets, "gen": gen, "clip": tmp_path / "clip.pt", "config": config, "hps": hps}


def suite_args(w: dict[str, Path], out: Path, *extra: str) -> list[str]:
    calls = w["root"] / "calls.txt"
    generate = f"{sys.executable} {w['gen']} {{prompts}} {{out}} {{seeds}} {calls}"
    return [
        "suite", "--out-dir", str(out), "--prompt-sets", str(w["sets"]), "--generate", generate,
        "--clip-model", NAME, "--clip-weights", str(w["clip"]), "--clip-config", str(w["config"]),
        "--hpsv2", str(w["hps"]), "--hpsv2-config", str(w["config"]), "--chunk", "3", *extra,
    ]  # fmt: skip


def test_suite_tables_hashes_skips_and_resume(world: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = world["root"] / "out"
    assert main(suite_args(world, out, "--limit", "6", "--seeds", "2")) == 0
    calls = world["root"] / "calls.txt"
    assert calls.read_text() == "4"  # 6 prompts in chunks of 3, two sets
    parti = scorefile.load(out / "partiprompts" / "scores.json")
    # --limit 6 takes prompts round-robin over categories: 3 Animals, 3 Arts (file order)
    assert {c: v["clip_score"]["n"] for c, v in parti["tables"]["category"].items()} == {"Animals": 3, "Arts": 3}
    assert parti["num_prompts"] == 6 and parti["num_images"] == 12 and parti["prompts_in_set"] == 12
    assert set(parti["tables"]["challenge"]) == {"Basic", "Complex"}
    # bad rows are counted by reason (file and line named), never a crash
    skipped = {r: v["count"] for r, v in parti["skipped"].items()}
    assert skipped == {
        "empty prompt": 1,
        "prompt longer than 2000 characters": 1,
        "not UTF-8 (invalid continuation byte)": 1,
    }
    assert parti["skipped"]["empty prompt"]["examples"] == [f"{world['sets']}/partiprompts/PartiPrompts.tsv:14"]
    geneval = scorefile.load(out / "geneval" / "scores.json")
    assert {r: v["count"] for r, v in geneval["skipped"].items()} == {
        "line lacks 'prompt' or 'tag'": 1,
        "not JSON (Expecting value)": 1,
    }
    # each category's cell is the mean over prompts (seeds averaged first) with a t-interval over prompts
    rows = [p for p in parti["per_prompt"].values() if p["category"] == "Animals"]
    values = [p["hpsv2"] for p in rows]
    cell = parti["tables"]["category"]["Animals"]["hpsv2"]
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert cell["mean"] == pytest.approx(np.mean(values)) and cell["hi"] == pytest.approx(np.mean(values) + half)
    # what was measured is recorded: definitions, weight and prompt-file hashes, versions
    assert parti["metrics"]["hpsv2"]["weights_sha256"] == sha256_file(world["hps"])
    assert parti["prompt_files_sha256"] == sha256_files([world["sets"] / "partiprompts" / "PartiPrompts.tsv"])
    assert parti["versions"]["torch"] == torch.__version__.split("+")[0]
    assert (out / "suite.png").stat().st_size > 10_000 and "| Animals | 3 |" in (
        out / "partiprompts" / "table.md"
    ).read_text()
    # resumable: a second run generates and scores nothing
    capsys.readouterr()
    assert main(suite_args(world, out, "--limit", "6", "--seeds", "2")) == 0
    assert calls.read_text() == "4" and "partiprompts: already scored" in capsys.readouterr().err
    # a score file edited by hand is caught by its hash, by compare and by the suite (which scores it again)
    path = out / "partiprompts" / "scores.json"
    edited = json.loads(path.read_text())
    edited["tables"]["overall"]["hpsv2"]["mean"] += 0.01
    path.write_text(json.dumps(edited))
    assert main(["compare", str(path), str(path)]) == 2
    assert "does not match its content_sha256" in capsys.readouterr().err
    assert main(suite_args(world, out, "--limit", "6", "--seeds", "2")) == 0
    assert "scoring again" in capsys.readouterr().err and scorefile.load(path)["tables"]["overall"]["hpsv2"][
        "mean"
    ] == pytest.approx(edited["tables"]["overall"]["hpsv2"]["mean"] - 0.01)
    assert calls.read_text() == "4"  # its samples were complete: only the scoring was redone


def test_an_interrupted_generation_resumes_at_its_chunk(world: dict[str, Path]) -> None:
    out = world["root"] / "out"
    assert main(suite_args(world, out, "--only", "geneval", "--seeds", "1")) == 0  # 8 prompts: chunks of 3, 3, 2
    (out / "geneval" / "scores.json").unlink()
    (out / "geneval" / "samples" / "chunk-0001" / "metadata.jsonl").unlink()  # as if killed mid-chunk
    calls = world["root"] / "calls.txt"
    calls.write_text("0")
    assert main(suite_args(world, out, "--only", "geneval", "--seeds", "1")) == 0
    assert calls.read_text() == "1" and scorefile.load(out / "geneval" / "scores.json")["num_prompts"] == 8


def test_unusable_sets_and_a_failing_generator_are_clear_errors(
    world: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    tsv = world["sets"] / "partiprompts" / "PartiPrompts.tsv"
    tsv.write_text("Text\tCategory\na cat\tAnimals\n")
    assert main(suite_args(world, world["root"] / "o1")) == 2
    err = capsys.readouterr().err
    assert "PartiPrompts.tsv: not a PartiPrompts TSV: missing column(s) ['Prompt']" in err
    assert not (world["root"] / "o1").exists()  # nothing generated before every set was read
    tsv.unlink()
    args = suite_args(world, world["root"] / "o2")
    args[args.index("--generate") + 1] = f"{sys.executable} -c 'raise SystemExit(\"model exploded\")'"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "generator failed on chunk 0 (exit 1)" in err and "model exploded" in err
    assert "prompt set not found, left out: partiprompts" in err


def test_fid_against_a_reference_folder_is_a_set_level_figure(world: dict[str, Path]) -> None:
    """--fid-reference: FID/KID of the set's images against a folder, on the CLIP's features, as fid.distances gives
    them for the same two image sets."""
    from evaluation import fid
    from evaluation.__main__ import _extractor, build_parser
    from evaluation.images import ImageRecord, load_folder, write_folder

    rng = np.random.default_rng(9)
    ref = [ImageRecord(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), f"r{i}", "x") for i in range(10)]
    write_folder(ref, world["root"] / "ref")
    out = world["root"] / "out"
    assert main(suite_args(world, out, "--only", "geneval", "--fid-reference", str(world["root"] / "ref"))) == 0
    got = scorefile.load(out / "geneval" / "scores.json")["set_level"]
    args = build_parser().parse_args(suite_args(world, out))
    args.extractor = "clip"
    extractor, name = _extractor(args)
    images = [r for c in sorted((out / "geneval" / "samples").glob("chunk-*[0-9]")) for r in load_folder(c)]
    expected = fid.distances(
        fid.record_features(images, extractor), fid.folder_features(world["root"] / "ref", extractor)
    )
    assert got["fid"] == pytest.approx(expected["fid"], rel=1e-6) and got["fid"] > 0
    assert got["fid_features"] == name and got["fid_reference_images"] == 10


def test_samples_made_elsewhere_from_the_written_prompts(world: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """Without a generator the suite stops naming what is missing, having written each set's prompts.jsonl; samples
    generated from that file elsewhere are then scored with --samples SET=FOLDER."""
    import subprocess

    out = world["root"] / "out"
    args = suite_args(world, out, "--only", "geneval")
    i = args.index("--generate")
    del args[i : i + 2]
    assert main(args) == 2
    assert "geneval: no samples folder given and no generator" in capsys.readouterr().err
    prompts = out / "geneval" / "prompts.jsonl"
    assert len(prompts.read_text().splitlines()) == 8
    made = world["root"] / "made"
    subprocess.run([sys.executable, world["gen"], prompts, made, "1", world["root"] / "calls.txt"], check=True)
    assert main([*args, "--samples", f"geneval={made}"]) == 0
    assert scorefile.load(out / "geneval" / "scores.json")["num_images"] == 8


def test_strict_loaders_still_refuse_what_the_tolerant_ones_count(tmp_path: Path) -> None:
    path = tmp_path / "p.tsv"
    path.write_bytes(b"Prompt\tCategory\na cat\tAnimals\ncaf\xe9\tFood\n")
    with pytest.raises(ValueError, match=r"p\.tsv:3: not UTF-8"):
        load_partiprompts(path)
    skips = Skips()
    assert [p.text for p in load_partiprompts(path, skips)] == ["a cat"] and skips.total() == 1
    jl = tmp_path / "g.jsonl"
    jl.write_text('{"prompt": "", "tag": "colors"}\n')
    with pytest.raises(ValueError, match=r"g\.jsonl:1: empty prompt"):
        load_geneval(jl)


def test_compare_refuses_other_weights_and_pairs_prompts(world: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    a, b = world["root"] / "a", world["root"] / "b"
    assert main(suite_args(world, a, "--only", "geneval")) == 0
    assert main(suite_args(world, b, "--only", "geneval")) == 0
    capsys.readouterr()
    assert main(["compare", str(a / "geneval" / "scores.json"), str(b / "geneval" / "scores.json")]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["common_prompts"] == 8 and same["metrics"]["hpsv2"]["overall"]["diff"] == 0.0
    (world["root"] / "other").mkdir()
    other, _ = save_hpsv2(world["root"] / "other", seed=1)
    c = world["root"] / "c"
    args = suite_args(world, c, "--only", "geneval")
    args[args.index("--hpsv2") + 1] = str(other)
    assert main(args) == 0
    capsys.readouterr()
    assert main(["compare", str(a / "geneval" / "scores.json"), str(c / "geneval" / "scores.json")]) == 2
    assert "hpsv2: scorer weights differ" in capsys.readouterr().err


def test_agreement_recovers_the_simulated_raters_rate() -> None:
    """Raters vote for A when the metric's A-B difference plus their own N(0, 1) noise is positive; five raters per
    pair. The majority agrees with the metric with probability P(Binomial(5, Phi(|d|)) >= 3) on a pair with difference
    d: the measured rate's interval must hold the mean of that over pairs, and a metric unrelated to the images must
    sit at chance."""
    rng = np.random.default_rng(0)
    n_prompts, n_seeds, raters = 150, 2, 5
    keys = [(f"p{i}", s) for i in range(n_prompts) for s in range(n_seeds)]
    a = {k: float(rng.normal()) for k in keys}
    b = {k: float(rng.normal()) for k in keys}
    pairs, expected = [], []
    for k in keys:
        d = a[k] - b[k]
        votes_a = int((d + rng.normal(size=raters) > 0).sum())
        pairs.append({"prompt_id": k[0], "seed": k[1], "a_wins": votes_a, "b_wins": raters - votes_a, "ties": 0})
        p = stats.norm.cdf(abs(d))
        expected.append(stats.binom.sf(2, raters, p))
    human = agreement.human_majority(pairs)
    result = agreement.metric_agreement(human, a, b)
    lo, hi = result["bootstrap95"]
    assert lo <= float(np.mean(expected)) <= hi and result["pairs"] == 300 and result["prompts"] == n_prompts
    assert 0.75 < result["agreement"] < 0.95
    noise = {k: float(rng.normal()) for k in keys}
    unrelated = agreement.metric_agreement(human, noise, {k: 0.0 for k in keys})
    assert unrelated["bootstrap95"][0] <= 0.5 <= unrelated["bootstrap95"][1]
    assert abs(unrelated["chance_from_marginals"] - 0.5) < 0.05


def test_agreement_interval_covers_at_about_the_nominal_rate() -> None:
    """Over 300 seeded simulated studies (60 prompts x 2 seeds, 5 raters with N(0, 1) noise around a metric whose
    A-B differences are N(0, 2)), the bootstrap 95% interval holds the population agreement in 90-99% of them (the
    percentile bootstrap runs slightly under 95% at 60 prompts: 93.3% here)."""
    d = np.random.default_rng(123).normal(scale=math.sqrt(2), size=2_000_000)
    population = float(stats.binom.sf(2, 5, stats.norm.cdf(np.abs(d))).mean())
    covered = 0
    for rep in range(300):
        rng = np.random.default_rng(rep)
        keys = [(f"p{i}", s) for i in range(60) for s in range(2)]
        a, b = {k: float(rng.normal()) for k in keys}, {k: float(rng.normal()) for k in keys}
        pairs = []
        for k in keys:
            votes = int((a[k] - b[k] + rng.normal(size=5) > 0).sum())
            pairs.append({"prompt_id": k[0], "seed": k[1], "a_wins": votes, "b_wins": 5 - votes, "ties": 0})
        lo, hi = agreement.metric_agreement(agreement.human_majority(pairs), a, b, 1000, rep)["bootstrap95"]
        covered += lo <= population <= hi
    assert 0.90 <= covered / 300 <= 0.99


def test_agreement_command_reads_sbs_ingest(world: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """sbs-ingest writes each pair's votes; agreement scores both folders and lines the metric up with them."""
    from evaluation import sbs
    from evaluation.images import ImageRecord, write_folder

    rng = np.random.default_rng(5)
    recs_a, recs_b = [], []
    for i in range(6):
        recs_a.append(ImageRecord(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), f"p{i}", f"prompt {i}", 0, "c"))
        recs_b.append(ImageRecord(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), f"p{i}", f"prompt {i}", 0, "c"))
    da, db = write_folder(recs_a, world["root"] / "A"), write_folder(recs_b, world["root"] / "B")
    pairs = [sbs.Pair(f"p{i}", f"prompt {i}", "c", 0, da / f"p{i}_0.png", db / f"p{i}_0.png") for i in range(6)]
    sbs.export(pairs, world["root"] / "pkg", "A", "B", repeat_fraction=0.0)
    key = json.loads((world["root"] / "pkg.key.json").read_text())

    def choice(m: dict) -> str:  # every rater picks A's image on the even prompts, B's on the odd ones
        wanted = "A" if int(m["prompt_id"][1:]) % 2 == 0 else "B"
        return "left" if m["left"] == wanted else "right"

    rows = [
        {"item_id": item, "annotator_id": r, "question": "alignment", "choice": choice(m)}
        for item, m in key["items"].items()
        for r in ("r1", "r2", "r3")
    ]
    (world["root"] / "votes.json").write_text(json.dumps(rows))
    report = sbs.ingest(world["root"] / "votes.json", world["root"] / "pkg.key.json")
    assert [(p["prompt_id"], p["a_wins"], p["b_wins"]) for p in report["pairs"]["alignment"]][:2] == [
        ("p0", 3, 0),
        ("p1", 0, 3),
    ]
    (world["root"] / "report.json").write_text(json.dumps(report))
    args = ["agreement", str(world["root"] / "report.json"), str(da), str(db), "--hpsv2", str(world["hps"])]
    assert main([*args, "--hpsv2-config", str(world["config"])]) == 0
    out = json.loads(capsys.readouterr().out)
    res = out["questions"]["alignment"]["metrics"]["hpsv2"]
    from evaluation.preference import load_hpsv2

    scorer = load_hpsv2(world["hps"], config=world["config"])
    sa = scorer.score([r.image for r in recs_a], [r.prompt for r in recs_a])
    sb = scorer.score([r.image for r in recs_b], [r.prompt for r in recs_b])
    by_hand = np.mean([(sa[i] > sb[i]) == (i % 2 == 0) for i in range(6)])
    assert res["agreement"] == pytest.approx(by_hand) and res["pairs"] == 6
    assert out["questions"]["quality"]["with_majority"] == 0


def test_fid_infinity_extrapolates_a_known_bias() -> None:
    """Two samples of the same Gaussian: FID_N is pure finite-sample bias (~ k / N); FID_inf must be near 0 while
    FID at the smallest size is far from it."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40_000, 8))  # a large reference: its own finite-sample bias is ~0.001
    feats = rng.normal(size=(2000, 8))
    res = agreement.fid_infinity(feats, ref, [200, 400, 800, 1200, 1600, 2000])
    assert res["fid"][0] > 0.04 and abs(res["fid_infinity"]) < 0.01 and res["slope"] > 0
    with pytest.raises(ValueError, match="needs >= 2 sizes"):
        agreement.fid_infinity(feats, ref, [2001, 10])


def test_noise_floor_is_the_sd_of_seed_means() -> None:
    scores = {(f"p{i}", s): float(i + 0.1 * s) for i in range(4) for s in range(3)}
    res = agreement.noise_floor(scores)
    assert res["seeds"] == 3 and res["seed_means"] == pytest.approx([1.5, 1.6, 1.7])
    assert res["seed_sd"] == pytest.approx(0.1) and res["prompt_sd"] == pytest.approx(
        np.std([0.1, 1.1, 2.1, 3.1], ddof=1)
    )
