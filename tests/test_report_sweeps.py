"""The ablation report under real sweeps: any Hydra sweep syntax names the reference level, a re-run cell's newest
FINISHED run wins (and the report says so), all through a real MLflow store and the sweep callback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from k3lab.ablation.report import analyse
from k3lab.report import main
from k3lab.tracking.sweep import PARENT_TAG, ROLE_TAG, MLflowSweepCallback, sweep_reference


def test_reference_is_the_first_value_of_any_sweep_syntax() -> None:
    ref = sweep_reference(
        {"model/prior": "choice(none,diffusion_mapping)", "seed": "range(0,3)", "x": "shuffle(b,a,c)", "y": "q,p"},
        ["model/unet/block=resnet,biggan_deep", "+z=choice(2e-3,1e-3)", "lr=0.1", "hydra.job.chdir=true", "g=glob(*)"],
    )
    # values as Hydra writes a job's override (2e-3 -> 0.002), so they match the cells' override/<key> params
    assert ref == {"model/prior": "none", "seed": "0", "x": "b", "y": "q", "model/unet/block": "resnet", "z": "0.002"}
    # a command-line sweep wins over the config's sweeper params, as in Hydra's basic sweeper
    assert sweep_reference({"a": "u,v"}, ["a=v,u"]) == {"a": "v"}
    # ... and a single value on the command line stops the key being swept at all (the main job's block axis pinned)
    assert sweep_reference({"a": "u,v", "seed": "0,1,2"}, ["a=u", "b=x,y"]) == {"seed": "0", "b": "x"}


def _sweep(
    tmp_path: Path, params: dict[str, str], overrides: list[str], cells: list[tuple[dict[str, str], int, float]]
) -> Path:
    """A sweep as the callback and the cells' loggers leave it in MLflow: a parent, one child per (overrides, seed)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep_dir = tmp_path / "sweep"
    cfg = OmegaConf.create(
        {
            "logger": {"mlflow": {"tracking_uri": uri, "experiment_name": "report"}},
            "hydra": {
                "sweep": {"dir": str(sweep_dir)},
                "sweeper": {"params": params},
                "overrides": {"task": overrides},
            },
        }
    )
    callback = MLflowSweepCallback()
    callback.on_multirun_start(cfg)
    info = json.loads((sweep_dir / "mlflow_sweep.json").read_text())
    client = MlflowClient(uri)
    for job, (values, seed, metric) in enumerate(cells):
        run = client.create_run(
            info["experiment_id"], tags={PARENT_TAG: info["parent_run_id"], ROLE_TAG: "cell", "k3lab.job": str(job)}
        )
        client.log_param(run.info.run_id, "seed", str(seed))
        for key, value in values.items():
            client.log_param(run.info.run_id, f"override/{key}", value)
        client.log_metric(run.info.run_id, "eval/seen/single_object", metric)
        client.set_terminated(run.info.run_id, "FINISHED")
        time.sleep(0.002)  # distinct start times: the later run is the newer one
    callback.on_multirun_end(cfg)
    return sweep_dir


def test_choice_and_range_sweeps_give_effects(tmp_path: Path) -> None:
    # the reference (none) comes first in the syntax but is the second job: it must still be the reference
    cells = [({"model/prior": "diffusion_mapping", "seed": str(s)}, s, 0.5 + 0.1 * s) for s in range(3)]
    cells += [({"model/prior": "none", "seed": str(s)}, s, 0.3 + 0.1 * s - 0.02 * s) for s in range(3)]
    sweep_dir = _sweep(tmp_path, {"model/prior": "choice(none,diffusion_mapping)", "seed": "range(0,3)"}, [], cells)
    report = analyse(str(sweep_dir), metrics=["eval/seen/single_object"])
    row = report.effects.iloc[0]
    assert (row["axis"], row["level"], row["reference"], row["seeds"]) == (
        "model/prior",
        "diffusion_mapping",
        "none",
        3,
    )
    assert row["effect"] == pytest.approx((0.2 + 0.22 + 0.24) / 3) and row["ci95"] > 0
    assert "| model/prior | diffusion_mapping vs none | 0.220 ±" in report.text
    # the seed-to-seed spread of each cell: 0.5, 0.6, 0.7 has SD 0.1; 0.30, 0.38, 0.46 has SD 0.08
    assert "### Seed-to-seed standard deviation per cell" in report.text
    assert "| diffusion_mapping | 0.100 |" in report.text and "| none | 0.080 |" in report.text


def test_duplicated_finished_cell_newest_wins(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cells = [
        ({"model/prior": "none"}, 0, 0.30),
        ({"model/prior": "diffusion_mapping"}, 0, 0.50),
        ({"model/prior": "diffusion_mapping"}, 0, 0.70),
    ]  # a re-run of the second cell, same seed, finished later
    sweep_dir = _sweep(tmp_path, {"model/prior": "none,diffusion_mapping"}, [], cells)
    report = analyse(str(sweep_dir), metrics=["eval/seen/single_object"])
    assert report.effects.iloc[0]["effect"] == pytest.approx(0.70 - 0.30)
    cell = report.cells.set_index("model/prior").loc["diffusion_mapping"]
    assert cell["seeds"] == 1 and cell["eval/seen/single_object"] == pytest.approx(0.70)
    old, new = report.runs.sort_values("start_time")["run_id"].tolist()[1:]
    assert report.runs.set_index("run_id").loc[old, "superseded_by"] == new
    assert f"the newest run wins: {old} -> {new}" in report.text
    assert main([str(sweep_dir), "--out", str(tmp_path / "out")]) == 0  # the command too, with its files
    assert (
        "newest run wins" in (tmp_path / "out" / "report.md").read_text()
        and "superseded_by" in (tmp_path / "out" / "runs.csv").read_text()
    )


def test_forest_plots_show_intervals_and_reference_levels(tmp_path: Path) -> None:
    """report.png: a forest plot per metric, three panels per row, each cell's mean with its interval and the
    metric's chance and ceiling lines; report_effects.png: each effect with its interval and the zero line."""
    import pandas as pd
    from PIL import Image

    from k3lab.ablation.report import cells, effects, forest_figures, plot

    rows = []
    for seed in range(3):
        for prior, base in (("none", 0.5), ("map", 0.7)):
            rows.append({"seed": seed, "status": "FINISHED", "override/prior": prior,
                         "eval/seen/single_object": base + 0.05 * seed, "eval/seen/colors": base - 0.2,
                         "eval/seen/overall": base, "eval/fid_clip": 10 - seed,
                         "eval/chance/single_object": 0.47, "eval/real/single_object": 1.0})  # fmt: skip
    runs = pd.DataFrame(rows)
    metrics = ["eval/seen/single_object", "eval/seen/colors", "eval/seen/overall", "eval/fid_clip"]
    effect_table, cell_table = effects(runs, metrics, {"prior": "none"}), cells(runs, metrics)
    cells_fig, effects_fig = forest_figures(runs, effect_table, cell_table, metrics)
    panels = [ax for ax in cells_fig.axes if ax.axison]
    assert len(panels) == 4 and len(cells_fig.axes) == 6  # 2 rows of 3 (two spare panels hidden)
    single = panels[0]
    vertical = sorted(round(ln.get_xdata()[0], 3) for ln in single.get_lines() if ln.get_gid() == "reference")
    assert vertical == [0.25, 0.47, 1.0]  # uniform chance, real-vs-other-prompt chance, detector ceiling
    assert not [ln for ln in panels[3].get_lines() if ln.get_gid() == "reference"]  # FID has no such levels
    assert [t.get_text() for t in single.get_yticklabels()] == ["none", "map"]
    bars = single.containers[0]  # errorbar: the interval of each cell is drawn
    assert bars.has_xerr and len(bars.lines[2][0].get_segments()) == 2
    effect_panel = [ax for ax in effects_fig.axes if ax.axison][0]
    assert [t.get_text() for t in effect_panel.get_yticklabels()] == ["prior: map vs none"]
    cells_png, effects_png = plot(runs, effect_table, cell_table, tmp_path / "report.png", metrics)
    width, height = Image.open(cells_png).size
    assert width < 1600 and height > 250 and effects_png.name == "report_effects.png" and effects_png.is_file()
