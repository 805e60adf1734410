"""`python -m evaluation ...`: each command prints JSON; bad input exits with a message naming the file."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.__main__ import main
from evaluation.images import ImageRecord, from_generator, load_folder, load_shards, write_folder
from evaluation.prompts import Prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from k3lab.data.scene_world import SceneWorld

    tmp = tmp_path_factory.mktemp("cli")
    shards = SceneWorld(
        root=str(tmp / "w"), seed=2, num_train=0, num_val=0, num_test=40, num_heldout=20, shard_size=100
    ).build()
    records = list(load_shards(shards["test"] + shards["heldout"]))
    return write_folder(records, tmp / "images")


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_compbench_command(scene_folder: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    result = run_cli(capsys, "compbench", str(scene_folder), "--out", str(tmp_path / "r.json"))
    assert result["num_images"] == 60 and result["all"]["overall"] >= 0.99
    assert {"test", "heldout"} <= set(result)  # seen vs held-out combinations
    assert json.loads((tmp_path / "r.json").read_text()) == result


def test_sbs_round_trip_through_the_cli(scene_folder: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    blurred = [
        ImageRecord(
            np.asarray(Image.fromarray(r.image).resize((16, 16)).resize((64, 64))),
            r.prompt_id,
            r.prompt,
            r.seed,
            r.category,
            r.spec,
        )
        for r in load_folder(scene_folder)
    ]
    folder_b = write_folder(blurred, tmp_path / "b")
    out = run_cli(
        capsys,
        "sbs-export",
        str(scene_folder),
        str(folder_b),
        "--model-a",
        "sharp",
        "--model-b",
        "blurry",
        "--out-dir",
        str(tmp_path / "pkg"),
        "--repeat-fraction",
        "0.1",
    )
    assert out["num_pairs"] == 60 and Path(out["key"]).parent == tmp_path
    items = json.loads(Path(out["items"]).read_text())
    key = json.loads(Path(out["key"]).read_text())["items"]
    with (tmp_path / "ann.csv").open("w", newline="") as f:  # a rater who always picks the sharp image
        w = csv.writer(f)
        w.writerow(["item_id", "annotator_id", "question", "choice"])
        for it in items:
            for q in ("alignment", "quality"):
                w.writerow([it["item_id"], "r1", q, "left" if key[it["item_id"]]["left"] == "sharp" else "right"])
    report = run_cli(
        capsys,
        "sbs-ingest",
        str(tmp_path / "ann.csv"),
        "--key",
        out["key"],
        "--report-dir",
        str(tmp_path / "rep"),
        "--bootstrap",
        "200",
    )
    q = report["questions"]["quality"]
    assert q["overall"]["win_rate_ties_half"] == 1.0 and q["consistency"]["rate"] == 1.0
    assert Path(report["files"]["plot"]).is_file()


def test_bad_input_exits_with_the_file_named(scene_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compbench", str(tmp_path / "missing")]) == 2
    assert "missing: no metadata.jsonl" in capsys.readouterr().err
    assert main(["compbench", str(scene_folder), "--expected", "61"]) == 2
    assert "60 images but 61 expected" in capsys.readouterr().err
    assert main(["fid", str(tmp_path), str(tmp_path), "--inception", str(tmp_path / "inc.pt")]) == 2
    assert "Inception weights not found at" in capsys.readouterr().err


def test_module_entry_point_runs(scene_folder: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "evaluation", "compbench", str(scene_folder)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["num_images"] == 60


def test_generator_source() -> None:
    def generate(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        return [np.full((8, 8, 3), s, dtype=np.uint8) for s in seeds]

    records = list(from_generator(generate, [Prompt("a", "x"), Prompt("b", "y")], seeds=[1, 2], batch_size=3))
    assert [(r.prompt_id, r.seed, int(r.image[0, 0, 0])) for r in records] == [
        ("a", 1, 1),
        ("a", 2, 2),
        ("b", 1, 1),
        ("b", 2, 2),
    ]
    with pytest.raises(ValueError, match="generator returned 1 images for 2 prompts"):
        list(from_generator(lambda p, s: [np.zeros((8, 8, 3))], [Prompt("a", "x")], seeds=[1, 2]))
