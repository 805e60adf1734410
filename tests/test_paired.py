"""The three-question main job's design and statistics: the half fraction (sweeper, job count, report), paired cells
(common random numbers), the paired interval's coverage, power against a closed-form t-test, FLOPs per step against
a hand count, the equal-compute view and the replication table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from k3lab.ablation import paired, views
from k3lab.ablation.design import HalfFraction, fraction_from

FACTORS = ("model/text_encoder", "model/unet/block", "model/prior")
LEVELS = {
    "model/text_encoder": ["minilm_l6", "minilm_l2"],
    "model/unet/block": ["biggan_deep", "resnet"],
    "model/prior": ["none", "diffusion_mapping"],
}


# ----------------------------------------------------------------------------- the design
def test_the_half_fraction_keeps_four_runs_with_the_reference_and_names_its_aliases() -> None:
    design = HalfFraction(FACTORS, LEVELS, -1)
    runs = design.runs()
    assert len(runs) == 4 and runs[0] == {k: v[0] for k, v in LEVELS.items()}  # the all-reference cell
    for key in FACTORS:  # balanced: every level of every factor in two runs
        assert sorted(r[key] for r in runs) == sorted(LEVELS[key] * 2)
        for other in FACTORS:  # and orthogonal: every pair of factors sees each level combination once
            if other != key:
                assert len({(r[key], r[other]) for r in runs}) == 4
    assert design.aliases()["model/prior"] == "-model/text_encoder x model/unet/block"
    assert "aliased with -(text_encoder x block)" in design.describe()
    other = HalfFraction(FACTORS, LEVELS, 1).runs()
    assert not {tuple(r.values()) for r in runs} & {tuple(r.values()) for r in other}  # the complementary half


def test_fraction_specs_fail_by_name_and_a_pinned_factor_lifts_the_fraction() -> None:
    assert fraction_from(None, LEVELS) is None
    assert fraction_from({"factors": list(FACTORS)}, LEVELS).sign == -1
    with pytest.raises(ValueError, match="unknown keys"):
        fraction_from({"factors": list(FACTORS), "signs": 1}, LEVELS)
    with pytest.raises(ValueError, match="not swept"):
        fraction_from({"factors": [*FACTORS, "model/typo"]}, LEVELS)
    with pytest.raises(ValueError, match="exactly two levels"):
        fraction_from({"factors": list(FACTORS)}, {**LEVELS, "model/prior": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="sign"):
        fraction_from({"factors": list(FACTORS), "sign": 0}, LEVELS)
    pinned = {k: v for k, v in LEVELS.items() if k != "model/prior"}
    assert fraction_from({"factors": list(FACTORS)}, pinned, pinned=["model/prior"]) is None


def test_the_sweeper_launches_the_fraction_crossed_with_seeds_and_the_estimate_counts_it() -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from hydra_plugins.k3lab_sweeper.fractional_sweeper import FractionalSweeper
    from k3lab.ablation.timing import count_jobs
    from k3lab.run.config import CONF_DIR

    params = {k: ",".join(v) for k, v in LEVELS.items()} | {"seed": "0,1,2"}
    sweeper = FractionalSweeper(params=params, fraction={"factors": list(FACTORS), "sign": -1})
    parser = OverridesParser.create()
    overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + ["trainer.max_steps=10"])
    batches = sweeper.split_arguments(overrides, None)
    jobs = [dict(item.split("=", 1) for item in job) for job in batches[0]]
    assert len(jobs) == 12 and all(j["trainer.max_steps"] == "10" for j in jobs)
    design = HalfFraction(FACTORS, LEVELS, -1)
    assert all(design.keeps(j) for j in jobs)
    assert sorted(j["seed"] for j in jobs) == ["0"] * 4 + ["1"] * 4 + ["2"] * 4
    pinned = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + ["model/prior=none"])
    assert len(sweeper.split_arguments(pinned, 5)[0]) == 5  # full product of what stays swept, in batches of 5
    assert sum(len(b) for b in sweeper.split_arguments(pinned, 5)) == 12

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        preset = hydra_compose("train", overrides=["experiment=ablation_tiny"], return_hydra_config=True)
    assert preset.hydra.sweeper.fraction.factors == list(FACTORS)
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": OmegaConf.to_container(preset.hydra.sweeper),
                "overrides": {"task": ["experiment=ablation_tiny"]},
            }
        }
    )
    assert count_jobs(config) == 12
    config.hydra.overrides.task = ["experiment=ablation_tiny", "seed=3,4,5,6"]
    assert count_jobs(config) == 16
    config.hydra.overrides.task = ["experiment=ablation_tiny", "model/prior=none"]
    assert count_jobs(config) == 12  # the fraction lifted: 2 encoders x 2 blocks x 3 seeds
    config.hydra.sweeper.fraction = None  # hydra.sweeper.fraction=null: the full factorial
    config.hydra.overrides.task = ["experiment=ablation_tiny"]
    assert count_jobs(config) == 24


# ----------------------------------------------------------------------------- pairing (common random numbers)
PIXEL_CELL = [
    "data.source.num_train=96",
    "data.source.num_val=8",
    "data.source.num_test=8",
    "data.source.num_heldout=8",
    "data.source.shard_size=32",
    "data.batch_size=8",
    "data.in_memory=false",
    "stage.first_stage.checkpoint=null",
    "model.unet.in_channels=3",
    "model.unet.out_channels=3",
    "stage.latent_scale=1.0",
    "model/text_encoder=t5_tiny",
]


def test_cells_of_one_seed_draw_the_same_noise_and_data_and_another_seed_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two cells of seed 0 that differ in the U-Net block draw the same caption dropout, timesteps and diffusion noise
    at every training step, read the same batches in the same order and sample their evaluation prompts from the same
    noise seeds; a cell of seed 1 draws other ones."""
    from types import SimpleNamespace

    from hydra.utils import instantiate

    import k3lab.stages.diffusion as diffusion_stage
    from k3lab.ablation.cell import evaluation_seed
    from k3lab.run.config import compose

    real_loss = diffusion_stage.diffusion_loss

    def cell(block: str, seed: int) -> tuple[list[torch.Tensor], list[str], int]:
        cfg = compose(["experiment=ablation_tiny", f"model/unet/block={block}", f"seed={seed}",
                       f"paths.root_dir={tmp_path}", *PIXEL_CELL])  # fmt: skip
        torch.manual_seed(seed)
        stage = instantiate(cfg.stage)
        stage.log = lambda *args, **kwargs: None  # (no trainer to log to)
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        batches = [b for _, b in zip(range(3), dm.train_dataloader(), strict=False)]
        drawn: list[torch.Tensor] = []

        def recording_loss(model, x0, schedule, prediction="epsilon", generator=None, **kw):
            replay = torch.Generator().set_state(generator.get_state())  # what the loss is about to draw
            t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=replay)
            drawn.append(torch.cat([t.float(), torch.randn(x0.shape, generator=replay).flatten()]))
            return real_loss(model, x0, schedule, prediction, generator=generator, **kw)

        monkeypatch.setattr(diffusion_stage, "diffusion_loss", recording_loss)
        drops = []
        for step, batch in enumerate(batches):
            stage._trainer = SimpleNamespace(global_step=step, global_rank=0)
            drops.append(torch.rand(8, generator=stage.step_generator(torch.device("cpu"))))
            stage.training_step(batch, step)
        stage._trainer = None
        keys = [k for b in batches for k in b["key"]]
        return [torch.cat([d, x]) for d, x in zip(drops, drawn, strict=True)], keys, evaluation_seed(0, seed)

    biggan, resnet, other = cell("biggan_deep", 0), cell("resnet", 0), cell("biggan_deep", 1)
    assert len(biggan[0]) == 3 and all(torch.equal(a, b) for a, b in zip(biggan[0], resnet[0], strict=True))
    assert not torch.equal(biggan[0][0], biggan[0][1])  # a fresh draw each step
    assert biggan[1] == resnet[1] and len(set(biggan[1])) == 24  # the same batches in the same order
    assert biggan[2] == resnet[2]  # the same first sampling seed (sample i: + i)
    assert not any(torch.equal(a, b) for a, b in zip(biggan[0], other[0], strict=True))
    assert biggan[1] != other[1] and biggan[2] != other[2]


def test_the_step_generator_is_off_without_a_noise_seed_and_resumes_exactly() -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from k3lab.run.config import compose

    cfg = compose(["experiment=text2image_tiny", *PIXEL_CELL[7:-1]])
    assert cfg.stage.loss.noise_seed is None
    stage = instantiate(cfg.stage)
    assert stage.step_generator(torch.device("cpu")) is None
    stage.loss_options = replace(stage.loss_options, noise_seed=5)
    stage._trainer = SimpleNamespace(global_step=7, global_rank=0)
    first = torch.randn(4, generator=stage.step_generator(torch.device("cpu")))
    assert torch.equal(first, torch.randn(4, generator=stage.step_generator(torch.device("cpu"))))  # step 7 again
    stage._trainer = SimpleNamespace(global_step=7, global_rank=1)
    assert not torch.equal(first, torch.randn(4, generator=stage.step_generator(torch.device("cpu"))))  # other rank
    stage._trainer = None


# ----------------------------------------------------------------------------- statistics
def simulate(rng: np.random.Generator, seeds: int, prompts: int, effect: float, tau: float) -> tuple[list, list]:
    """Binary per-prompt scores of a reference and a level cell per seed with common random numbers: one uniform
    draw per prompt decides both (what shared sampling noise does), the seed's own effect drawn around ``effect``."""
    estimates, variances = [], []
    for _ in range(seeds):
        difficulty = rng.uniform(0.3, 0.8, prompts)
        u = rng.uniform(size=prompts)
        seed_effect = effect + rng.normal(0, tau)
        reference = (u < difficulty).astype(float)
        level = (u < np.clip(difficulty + seed_effect, 0, 1)).astype(float)
        e = paired.seed_effect(level[None], reference[None])
        estimates.append(e.estimate)
        variances.append(e.variance)
    return estimates, variances


@pytest.mark.parametrize("tau", [0.0, 0.03])
def test_the_paired_interval_covers_a_known_effect_at_the_nominal_rate(tau: float) -> None:
    rng = np.random.default_rng(0)
    effect, hits, widths = 0.05, 0, []
    for _ in range(200):
        combined = paired.random_effects(*simulate(rng, 3, 512, effect, tau))
        hits += abs(combined.estimate - effect) <= combined.half_width
        widths.append(combined.half_width)
    assert 0.90 <= hits / 200 <= 0.99, hits / 200
    assert np.median(widths) < 0.25  # and the interval is informative


def test_pairing_shrinks_the_within_seed_variance() -> None:
    rng = np.random.default_rng(1)
    difficulty, u = rng.uniform(0.3, 0.8, 512), rng.uniform(size=512)
    reference = (u < difficulty).astype(float)
    level = (u < difficulty + 0.05).astype(float)
    e = paired.seed_effect(level[None], reference[None])
    assert e.estimate == pytest.approx(float(level.mean() - reference.mean()))
    assert e.unpaired_variance > 5 * e.variance  # the shared uniform cancels most of each prompt's noise
    assert e.unpaired_variance == pytest.approx((level.var(ddof=1) + reference.var(ddof=1)) / 512)
    nan_ref = reference.copy()
    nan_ref[:12] = np.nan  # a prompt a task does not apply to is left out on both sides
    assert paired.seed_effect(level[None], nan_ref[None]).prompts == 500


def test_random_effects_reduce_to_the_t_interval_with_equal_variances() -> None:
    from scipy import stats

    y = [0.02, 0.05, 0.11]
    combined = paired.random_effects(y, [1e-4] * 3)
    sd = float(np.std(y, ddof=1))
    assert combined.estimate == pytest.approx(np.mean(y))
    assert combined.half_width == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert combined.tau2 == pytest.approx(sd**2 - 1e-4)


def test_power_and_seed_counts_match_the_closed_form_t_test() -> None:
    from statsmodels.stats.power import TTestPower

    tt = TTestPower()
    for delta, sigma, seeds in ((0.03, 0.02, 3), (0.05, 0.04, 6), (0.01, 0.03, 12)):
        expected = tt.power(effect_size=delta / sigma, nobs=seeds, alpha=0.05, alternative="two-sided")
        assert paired.power(delta, sigma, seeds) == pytest.approx(expected, abs=1e-6)
        mde = paired.minimum_detectable_effect(sigma, seeds)
        expected_es = tt.solve_power(nobs=seeds, alpha=0.05, power=0.8, alternative="two-sided")
        assert mde / sigma == pytest.approx(expected_es, rel=1e-4)
        need = tt.solve_power(effect_size=delta / sigma, alpha=0.05, power=0.8, alternative="two-sided")
        assert paired.seeds_needed(delta, sigma) == max(2, math.ceil(need))
    assert paired.prompts_needed(0.03, tau2=0.02**2, prompt_var=0.25, seeds=3) == math.inf  # tau alone too large


# ----------------------------------------------------------------------------- the report on a fractional sweep
def fractional_runs(tmp_path: Path, seeds: tuple[int, ...] = (0, 1, 2), noise: float = 0.0) -> pd.DataFrame:
    """A synthetic half-fraction sweep with additive effects (text -0.04, block +0.10, prior -0.06 on single-object),
    per-prompt files in each cell folder, curves with the resnet cells twice as costly per step in FLOPs and 1.5x
    in wall seconds."""
    rng = np.random.default_rng(sum(seeds))
    effects = {"model/text_encoder": -0.04, "model/unet/block": 0.10, "model/prior": -0.06}
    rows = []
    for seed in seeds:
        difficulty, u = rng.uniform(0.3, 0.6, 400), rng.uniform(size=400)
        for job, run in enumerate(HalfFraction(FACTORS, LEVELS, -1).runs()):
            shift = sum(effects[k] for k, v in run.items() if v != LEVELS[k][0]) + rng.normal(0, noise)
            scores = (u < difficulty + shift).astype(float)
            folder = tmp_path / f"s{seed}_{job}"
            (folder / "eval").mkdir(parents=True)
            pd.DataFrame(
                {
                    "split": "seen",
                    "prompt_id": [f"p{i}" for i in range(400)],
                    "single_object": scores,
                    "colors": scores,
                    "clip_score": 20 + 10 * scores,
                }  # fmt: skip
            ).to_csv(folder / "eval" / "per_prompt.csv", index=False)
            cost = 2.0e9 if run["model/unet/block"] == "resnet" else 1.0e9
            steps = np.array([500, 1000, 1500])
            seconds = steps * (0.6 if run["model/unet/block"] == "resnet" else 0.4)  # resnet: 1.5x the wall time
            pd.DataFrame(
                {
                    "step": steps,
                    "train_seconds": seconds,
                    "single_object": 0.3 + steps / 1500 * (0.3 + shift),
                    "colors": 0.2 + steps / 5000,
                }  # fmt: skip
            ).to_csv(folder / "curve.csv", index=False)
            rows.append(
                {
                    "run_id": f"r{seed}{job}",
                    "status": "FINISHED",
                    "job": job,
                    "seed": seed,
                    "output_dir": str(folder),
                    **{f"override/{k}": v for k, v in run.items()},
                    "eval/seen/single_object": float(scores.mean()),
                    "eval/seen/colors": float(scores.mean()),
                    "eval/clip_score": float(20 + 10 * scores.mean()),
                    "perf/flops_per_step": cost,
                }  # fmt: skip
            )
    return pd.DataFrame(rows)


def test_the_report_estimates_main_effects_of_a_half_fraction_and_says_what_is_aliased(tmp_path: Path) -> None:
    from k3lab.ablation.report import design_of, effects

    runs = fractional_runs(tmp_path)
    table = effects(runs, ["eval/seen/single_object"]).set_index("axis")
    assert len(table) == 3 and (table["seeds"] == 3).all()
    pair = views.paired_effects(runs).set_index(["axis", "metric"])
    for axis, true in (("model/text_encoder", -0.04), ("model/unet/block", 0.10), ("model/prior", -0.06)):
        assert table.at[axis, "effect"] == pytest.approx(true, abs=0.03)
        row = pair.loc[(axis, "eval/seen/single_object")]
        assert row["effect"] == pytest.approx(table.at[axis, "effect"], abs=0.002)  # same data (seeds weighted)
        assert abs(row["effect"] - true) <= row["ci95"] + 1e-9
        assert row["v_unpaired"] > 3 * row["v_paired"]
    text = design_of(runs)
    assert "I = -text_encoder x block x prior" in text and "block is aliased with -(text_encoder x prior)" in text
    power = views.power_table(views.paired_effects(runs), 3)
    assert set(power["metric"]) == set(views.PAIRED_METRICS) and (power["mde80"] > 0).all()
    answer = views.plan(power, 0.03)
    assert answer["seeds_needed"] >= 2 and answer["power_at_seeds"] >= 0.8


def test_equal_compute_reads_the_costlier_arm_earlier_on_its_curve(tmp_path: Path) -> None:
    runs = fractional_runs(tmp_path)
    table = views.equal_compute(runs).set_index(["axis", "metric"])
    block = table.loc[("model/unet/block", "eval/seen/single_object")]
    assert block["flops_ratio"] == pytest.approx(2.0)
    # equal steps: +0.10 x 1500/1500; at equal FLOPs resnet is read at step 750: 0.3 + 0.5 (0.3 + shift) vs biggan's
    # 0.3 + 1.0 (0.3 + shift'): the 2x cost turns the block's +0.10 into 0.05 - 0.3 / 2 = about -0.10 (a sign flip)
    assert block["equal_steps"] == pytest.approx(0.10, abs=1e-9)
    assert block["equal_flops"] < 0 and bool(block["sign_flip"])
    text_row = table.loc[("model/text_encoder", "eval/seen/single_object")]
    assert not text_row["sign_flip"]
    # equal wall seconds: resnet (1.5x the seconds) is read at step 1,000, where biggan_deep is at 1,500: resnet's
    # cells (shifts +0.06, +0.04 over 0.3) give 0.3 + 2/3 x 0.35, biggan's (0, -0.10) give 0.3 + 0.25: -1/60
    assert block["seconds_ratio"] == pytest.approx(1.5)
    assert block["equal_seconds"] == pytest.approx(-1 / 60, abs=1e-9)
    # text: each level has one resnet cell read at step 1,000:
    # (0.3 + 2/3 x 0.36 + 0.5) / 2 - (0.6 + 0.3 + 2/3 x 0.34) / 2
    assert text_row["seconds_ratio"] == pytest.approx(1.0)
    assert text_row["equal_seconds"] == pytest.approx(-13 / 300, abs=1e-9)


def test_compare_marks_replicated_and_unreplicated_effects() -> None:
    a = pd.DataFrame({"axis": ["block", "prior", "text"], "level": ["resnet", "dm", "l2"], "metric": ["m"] * 3,
                      "effect": [0.1, 0.05, 0.02], "ci95": [0.02, 0.01, 0.05]})  # fmt: skip
    b = a.assign(effect=[0.12, 0.01, -0.09], ci95=[0.03, 0.02, 0.04])
    verdicts = views.compare(a, b).set_index("axis")["verdict"]
    assert verdicts.to_dict() == {"block": "replicated", "prior": "one only", "text": "one only"}
    c = a.assign(effect=[-0.1, 0.05, 0.0])
    assert views.compare(a, c).set_index("axis")["verdict"]["block"] == "contradicted"


def test_report_cli_plans_and_compares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from k3lab import report
    from k3lab.ablation import report as library

    runs = {"A": fractional_runs(tmp_path / "a"), "B": fractional_runs(tmp_path / "b", seeds=(3, 4, 5), noise=0.05)}
    monkeypatch.setattr(library, "load_runs", lambda source, uri=None: (runs[source], {"reference": {}}))
    assert report.main(["A", "--plan", "0.03"]) == 0
    assert "this design needs" in capsys.readouterr().out
    assert report.main(["--compare", "A", "B"]) == 0
    out = capsys.readouterr().out
    assert "| model/unet/block | resnet | seen/single_object |" in out and "replicated" in out
    # the equal-FLOPs comparison: sweep A's block effect as views.equal_compute reads it off A's curves
    steps_part, flops_part = out.split("### At equal training FLOPs")
    table = views.equal_compute(runs["A"]).set_index(["axis", "metric"])
    row = table.loc[("model/unet/block", "eval/seen/single_object")]
    start = "| model/unet/block | resnet | seen/single_object |"
    line = next(x for x in flops_part.splitlines() if x.startswith(start))
    assert line.split(" | ")[3].startswith(f"{row['equal_flops']:.3f}"), line
    assert start in steps_part
    assert "### At equal wall seconds" in flops_part  # the fixture's curves carry train_seconds
    with pytest.raises(SystemExit):  # one sweep or --compare, not neither
        report.main([])


# ----------------------------------------------------------------------------- FLOPs
def hand_count(unet: torch.nn.Module, inputs: tuple) -> float:
    """Training-step FLOPs of ``unet`` counted by hand from one forward with hooks: every convolution (transposed
    ones by input elements) and linear layer as 2 x multiply-adds, with backward = weight gradient (= forward) plus
    input gradient (= forward) where the layer's input needs one; attention as Q K^T and P V, backward 2 x forward."""
    weighted: list[float] = []
    needs_input_grad: list[bool] = []
    attention: list[float] = []

    def conv_hook(m, inp, out):
        if isinstance(m, torch.nn.ConvTranspose2d):  # every input element meets the kernel once per output map
            weighted.append(2 * inp[0].numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size))
        else:
            weighted.append(2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size))
        needs_input_grad.append(bool(inp[0].requires_grad))

    def linear_hook(m, inp, out):
        weighted.append(2 * out.numel() * m.in_features)
        needs_input_grad.append(bool(inp[0].requires_grad))

    hooks = [
        m.register_forward_hook(linear_hook if isinstance(m, torch.nn.Linear) else conv_hook)
        for m in unet.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear))
    ]
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        attention.append(2 * 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3])  # QK^T, PV
        return real_sdpa(q, k, v, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    try:
        unet(*inputs)  # with autograd on: which inputs need a gradient
    finally:
        patch.undo()
        for h in hooks:
            h.remove()
    assert len(attention) > 0 and any(not g for g in needs_input_grad)
    return sum(f * (2 + g) for f, g in zip(weighted, needs_input_grad, strict=True)) + 3 * sum(attention)


@pytest.mark.parametrize("block", ["biggan_deep", "resnet"])
def test_flops_per_step_of_the_cell_unet_match_a_hand_count(block: str) -> None:
    """torch's flop counter (with the CPU attention kernels k3lab adds) on one training step of the main job's U-Net
    equals the hand count within 1%."""
    from hydra.utils import instantiate

    from k3lab.ablation.compute import count_flops
    from k3lab.run.config import compose

    cfg = compose(["experiment=ablation_tiny", f"model/unet/block={block}"])
    unet = instantiate(cfg.model.unet)
    b, tokens = 4, 12
    inputs = (
        torch.randn(b, 4, 16, 16),
        torch.randint(0, 1000, (b,)),
        torch.randn(b, tokens, int(cfg.model.unet.context_dim)),
        torch.ones(b, tokens, dtype=torch.bool),
    )
    hand = hand_count(unet, inputs)
    counted = count_flops(lambda: torch.nn.functional.mse_loss(unet(*inputs), inputs[0]).backward())
    assert counted == pytest.approx(hand, rel=0.01), (counted, hand)
