"""The numeric core the reports rest on, pinned exactly against reference implementations (statsmodels, the
``krippendorff`` package, diffusers' schedulers) or hand-computed values: the side-by-side statistics, the paired
design's effects, intervals and power, the noise schedules, the samplers, and what a checkpoint must carry for an exact
resume. Written against the mutants `make mutation` found alive (docs/performance.md: the scores)."""

from __future__ import annotations

import csv
import logging
import math
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluation.stats import bootstrap_interval, fleiss_kappa, krippendorff_alpha_nominal, wilson_interval
from k3lab.ablation import paired
from k3lab.diffusion import samplers
from k3lab.diffusion.schedule import Schedule, cosine_betas, linear_betas
from k3lab.run import resume

# ---------------------------------------------------------------------------------------------- side-by-side stats


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (17, 40), (1, 1), (250, 1000)])
def test_wilson_interval_is_statsmodels(k: int, n: int) -> None:
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = wilson_interval(k, n)
    want = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert lo == pytest.approx(want[0], abs=1e-6) and hi == pytest.approx(want[1], abs=1e-6)
    lo99, hi99 = wilson_interval(k, n, z=2.5758293)
    want99 = proportion_confint(k, n, alpha=0.01, method="wilson")
    assert lo99 == pytest.approx(want99[0], abs=1e-6) and hi99 == pytest.approx(want99[1], abs=1e-6)


def test_wilson_and_bootstrap_are_undefined_without_data() -> None:
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    assert all(math.isnan(v) for v in bootstrap_interval([]))


def test_bootstrap_interval_resamples_whole_groups_and_pools_their_votes() -> None:
    groups = [[1.0, 1.0, 1.0], [0.0], [1.0, 0.0], [0.5, 0.5, 0.5, 0.5]]
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 4, size=(500, 4))
    sums = np.array([3.0, 0.0, 1.0, 2.0])[idx].sum(1)
    counts = np.array([3.0, 1.0, 2.0, 4.0])[idx].sum(1)
    means = sums / counts  # votes pooled over the drawn groups, not the mean of group means
    want = (np.quantile(means, 0.05), np.quantile(means, 0.95))
    assert bootstrap_interval(groups, num_samples=500, seed=3, alpha=0.1) == pytest.approx(want, abs=1e-12)
    assert bootstrap_interval([[0.25, 0.25], [0.25]], num_samples=50) == (0.25, 0.25)
    varied = [list(np.random.default_rng(i).random(3)) for i in range(20)]
    a, b = bootstrap_interval(varied, seed=1), bootstrap_interval(varied, seed=1)
    assert a == b and a != bootstrap_interval(varied, seed=2)


def test_fleiss_kappa_is_statsmodels() -> None:
    from statsmodels.stats.inter_rater import aggregate_raters
    from statsmodels.stats.inter_rater import fleiss_kappa as sm_kappa

    rng = np.random.default_rng(0)
    for raters, categories in [(3, 2), (4, 3), (6, 4)]:
        ratings = rng.integers(0, categories, size=(40, raters))
        ratings[:10] = ratings[:10, :1]  # some unanimous items
        table, _ = aggregate_raters(ratings)
        assert fleiss_kappa(ratings.tolist()) == pytest.approx(sm_kappa(table, method="fleiss"), abs=1e-12)
    # items with fewer raters than the most common count are dropped
    base = [["a", "b", "a"], ["b", "b", "b"], ["a", "a", "b"], ["a", "a", "a"]]
    assert fleiss_kappa([*base, ["a", "b"], ["b"]]) == fleiss_kappa(base)
    assert math.isnan(fleiss_kappa([])) and math.isnan(fleiss_kappa([["a"], ["b"]]))
    assert math.isnan(fleiss_kappa([["a", "a"], ["a", "a"]]))  # one category: chance agreement 1


def test_krippendorff_alpha_is_the_reference_package() -> None:
    import krippendorff

    rng = np.random.default_rng(1)
    for missing in (0.0, 0.2):
        data = rng.integers(0, 3, size=(5, 30)).astype(float)  # raters x units
        data[:, :8] = data[0, :8]
        data[rng.random(data.shape) < missing] = np.nan
        want = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
        units = [[None if np.isnan(v) else int(v) for v in data[:, u]] for u in range(data.shape[1])]
        assert krippendorff_alpha_nominal(units) == pytest.approx(want, abs=1e-12)
    # hand-computed: two units, two raters: (a, a) and (a, b): D_o = 1/2, D_e = 2 * 3 * 1 / 3 / 4 -> alpha = 0
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "b"]]) == pytest.approx(1 - (2 / 4) / (2 * 3 * 1 / 3 / 4))
    assert math.isnan(krippendorff_alpha_nominal([["a"], ["b", None]]))
    assert math.isnan(krippendorff_alpha_nominal([["a", "a"], ["a", "a", "a"]]))


# ---------------------------------------------------------------------------------------------- the paired design


def test_seed_effect_by_hand() -> None:
    level = np.array([[1.0, 0.0, 1.0, np.nan, 1.0], [1.0, 1.0, 0.0, 1.0, 1.0]])
    reference = np.array([[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    got = paired.seed_effect(level, reference)
    a, b = level[:, [0, 1, 2, 4]], reference[:, [0, 1, 2, 4]]
    d = a.mean(0) - b.mean(0)  # [1, 0, 0, 0.5]
    assert got.prompts == 4 and got.estimate == pytest.approx(0.375)
    assert got.variance == pytest.approx(np.var(d, ddof=1) / 4)
    unpaired = (a[0].var(ddof=1) + a[1].var(ddof=1)) / 4 + (b[0].var(ddof=1) + b[1].var(ddof=1)) / 4
    assert got.unpaired_variance == pytest.approx(unpaired / 4)
    one = paired.seed_effect(np.array([1.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.0]))  # one cell each: 1-D input
    assert one.estimate == pytest.approx(2 / 3) and one.prompts == 3
    assert one.unpaired_variance == pytest.approx(np.var([1.0, 0.0, 1.0], ddof=1) / 3)
    short = paired.seed_effect(np.array([[1.0, np.nan]]), np.array([[0.0, 1.0]]))
    assert short.prompts == 1 and math.isnan(short.estimate) and math.isnan(short.variance)


@pytest.mark.parametrize(
    ("estimates", "variances"),
    [([0.05, 0.06, 0.04, 0.3], [0.001, 0.002, 0.001, 0.004]), ([0.1, 0.9, 0.4], [0.01, 0.02, 0.015])],
)
def test_random_effects_is_statsmodels_dersimonian_laird_with_hksj(estimates: list, variances: list) -> None:
    from scipy import stats
    from statsmodels.stats.meta_analysis import combine_effects

    got = paired.random_effects(estimates, variances)
    ref = combine_effects(np.array(estimates), np.array(variances), method_re="dl")
    assert ref.tau2 > 0  # heterogeneous: statsmodels' DL estimate is the truncated one here
    assert got.estimate == pytest.approx(ref.mean_effect_re, abs=1e-12)
    assert got.tau2 == pytest.approx(ref.tau2, abs=1e-12)
    assert got.se == pytest.approx(ref.sd_eff_w_re_hksj, rel=1e-9)
    k = len(estimates)
    assert got.half_width == pytest.approx(stats.t.ppf(0.975, k - 1) * ref.sd_eff_w_re_hksj, rel=1e-9)
    assert got.seeds == k
    wider = paired.random_effects(estimates, variances, level=0.99)
    assert wider.half_width == pytest.approx(stats.t.ppf(0.995, k - 1) * got.se, rel=1e-9)


def test_random_effects_truncate_tau2_at_zero_to_the_fixed_effect_hksj() -> None:
    from scipy import stats
    from statsmodels.stats.meta_analysis import combine_effects

    y, v = [0.1, 0.3, 0.2], [0.01, 0.02, 0.015]  # Q = 1.38 < 2 degrees of freedom: no between-seed variance
    got = paired.random_effects(y, v)
    ref = combine_effects(np.array(y), np.array(v), method_re="dl")
    assert got.tau2 == 0.0 and ref.tau2 < 0  # (statsmodels leaves the DL moment estimate untruncated)
    assert got.estimate == pytest.approx(ref.mean_effect_fe, abs=1e-12)
    assert got.se == pytest.approx(ref.sd_eff_w_fe_hksj, rel=1e-9)
    assert got.half_width == pytest.approx(stats.t.ppf(0.975, 2) * ref.sd_eff_w_fe_hksj, rel=1e-9)
    same = paired.random_effects([1.0, 1.0], [0.5, 0.5])
    assert (same.estimate, same.tau2, same.half_width) == (1.0, 0.0, 0.0)


def test_random_effects_edge_cases() -> None:
    none = paired.random_effects([float("nan")], [0.1])
    assert none.seeds == 0 and math.isnan(none.estimate) and math.isnan(none.se)
    one = paired.random_effects([0.2, float("nan")], [0.04, 0.01])
    assert (one.estimate, one.seeds, one.se) == (0.2, 1, pytest.approx(0.2)) and math.isnan(one.half_width)
    zero_var = paired.random_effects([0.1, 0.2], [0.0, 0.0])  # floored at 1e-12, not a division by zero
    assert zero_var.estimate == pytest.approx(0.15) and math.isfinite(zero_var.half_width)


def test_power_mde_and_sample_sizes_are_the_t_test() -> None:
    from statsmodels.stats.power import TTestPower

    tt = TTestPower()
    for delta, sigma, seeds in [(0.03, 0.02, 3), (0.1, 0.05, 5), (-0.2, 0.3, 10), (0.01, 0.04, 2)]:
        want = tt.power(effect_size=abs(delta) / sigma, nobs=seeds, alpha=0.05, alternative="two-sided")
        assert paired.power(delta, sigma, seeds) == pytest.approx(want, abs=1e-9)
        assert paired.power(delta, sigma, seeds, alpha=0.1) == pytest.approx(
            tt.power(effect_size=abs(delta) / sigma, nobs=seeds, alpha=0.1), abs=1e-9
        )
        mde = paired.minimum_detectable_effect(sigma, seeds)
        assert mde == pytest.approx(sigma * tt.solve_power(nobs=seeds, alpha=0.05, power=0.8), rel=1e-6)
        assert paired.minimum_detectable_effect(sigma, seeds, target=0.9) > mde
    assert paired.power(10.0, 1e-9, 3) == 1.0  # far past the critical value scipy's tail is NaN: power 1
    assert all(math.isnan(paired.power(0.1, s, n)) for s, n in [(0.0, 5), (0.1, 1), (float("nan"), 5)])
    assert math.isnan(paired.minimum_detectable_effect(0.0, 5)) and math.isnan(paired.minimum_detectable_effect(1, 1))


@pytest.mark.parametrize(("delta", "sigma"), [(0.05, 0.02), (0.03, 0.02), (0.01, 0.02), (0.2, 0.05), (0.5, 0.05)])
def test_seeds_needed_is_the_smallest_count_with_enough_power(delta: float, sigma: float) -> None:
    n = paired.seeds_needed(delta, sigma)
    assert n >= 2 and paired.power(delta, sigma, n) >= 0.8
    assert n == 2 or paired.power(delta, sigma, n - 1) < 0.8
    brute = next(k for k in range(2, 10_000) if paired.power(delta, sigma, k) >= 0.8)
    assert n == brute


def test_seeds_needed_and_prompts_needed_edges() -> None:
    assert paired.seeds_needed(0.0, 0.1) == -1 and paired.seeds_needed(0.1, 0.0) == -1
    assert paired.seeds_needed(float("nan"), 0.1) == -1 and paired.seeds_needed(1e-4, 1.0, limit=64) == -1
    assert paired.seeds_needed(0.01, 0.02, limit=64) == paired.seeds_needed(0.01, 0.02)  # under the limit: same
    # prompts: sigma_e^2 = tau2 + prompt_var / n must fall to (delta / MDE_1)^2
    allowed = paired.minimum_detectable_effect(1.0, 3)
    delta, tau2, var = 0.05, 0.0001, 0.2
    n = paired.prompts_needed(delta, tau2, var, 3)
    assert n == math.ceil(var / ((delta / allowed) ** 2 - tau2))
    assert paired.minimum_detectable_effect(math.sqrt(tau2 + var / n), 3) <= delta
    assert paired.minimum_detectable_effect(math.sqrt(tau2 + var / (n - 1)), 3) > delta
    assert paired.prompts_needed(0.01, 0.01, 0.2, 3) == float("inf")  # tau alone exceeds what 3 seeds allow
    assert all(math.isnan(paired.prompts_needed(*a)) for a in [(0.1, 0, 0.2, 1), (0.0, 0, 0.2, 3), (0.1, 0, 0.0, 3)])


# ---------------------------------------------------------------------------------------------- schedules


def test_schedules_are_diffusers_betas() -> None:
    from diffusers import DDPMScheduler

    cosine = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").betas.double()
    assert torch.allclose(cosine_betas(1000), cosine, atol=1e-7)
    assert cosine_betas(1000).dtype == torch.float64 and float(cosine_betas(1000).max()) == pytest.approx(0.999)
    linear = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").betas.double()
    assert torch.allclose(linear_betas(1000), linear, atol=1e-9)
    assert torch.allclose(linear_betas(250), torch.linspace(4e-4, 0.08, 250, dtype=torch.float64))  # scaled to T


def test_schedule_formulas() -> None:
    s = Schedule.cosine(1000)
    assert s.num_steps == 1000 and torch.equal(s.alphas_cumprod, torch.cumprod(1 - cosine_betas(1000), 0))
    lin = Schedule.named("linear", 200)
    assert torch.equal(lin.alphas_cumprod, torch.cumprod(1 - linear_betas(200), 0))
    assert torch.equal(Schedule.named("cosine", 50).alphas_cumprod, Schedule.cosine(50).alphas_cumprod)
    with pytest.raises(ValueError, match="unknown noise schedule 'sigmoid'"):
        Schedule.named("sigmoid")
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    a = s.alphas_cumprod[t].float().reshape(3, 1, 1, 1)
    assert s.alpha_bar(t, x0).shape == (3, 1, 1, 1) and s.alpha_bar(t, x0).dtype == torch.float32
    assert torch.allclose(s.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    ab = s.alphas_cumprod[t]
    assert torch.allclose(s.snr(t), ab / (1 - ab))


# ---------------------------------------------------------------------------------------------- samplers


def linear_denoiser(schedule: Schedule):
    """A deterministic eps-predictor whose x0 estimate stays bounded (the true eps of a fixed target, perturbed by a
    term that depends on x and t), so every step's arithmetic shows in the result."""
    target = torch.linspace(-1, 1, 32, dtype=torch.float64).reshape(1, 2, 4, 4)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alpha_bar(t, x)
        x0 = target[:, : x.shape[1]].expand_as(x).to(x.dtype) + 0.3 * torch.sin(3 * x)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return denoise


def run_diffusers(scheduler, denoise, x: torch.Tensor, timesteps: list[int], noises=None, **step_kwargs):
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        kwargs = dict(step_kwargs)
        if noises is not None:
            kwargs["variance_noise"] = noises[i]
        x = scheduler.step(denoise(x, tt), t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("steps", [4, 10, 50])
def test_ddim_is_diffusers_ddim_on_trailing_timesteps(steps: int) -> None:
    from diffusers import DDIMScheduler

    schedule = Schedule.cosine(1000)
    denoise = linear_denoiser(schedule)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched = DDIMScheduler(
        trained_betas=cosine_betas(1000).numpy(), timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False
    )
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == samplers.strided_timesteps(1000, steps)
    want = run_diffusers(sched, denoise, x, sched.timesteps.tolist(), eta=0.0)
    got = samplers.sample_ddim(denoise, x, schedule, steps, x0_threshold=None)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_kandinsky3_sampler_is_diffusers_ancestral_ddim_with_the_same_noise() -> None:
    from diffusers import DDIMScheduler

    schedule, steps = Schedule.cosine(1000), 8
    denoise = linear_denoiser(schedule)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    times = samplers.strided_timesteps(1000, steps)
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in times[:-1]] + [torch.zeros_like(x)]
    sched = DDIMScheduler(
        trained_betas=cosine_betas(1000).numpy(), timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False
    )
    sched.set_timesteps(steps)
    want = run_diffusers(sched, denoise, x, times, noises=noises, eta=1.0)
    got = samplers.sample_kandinsky3(
        denoise, x, schedule, steps, generator=torch.Generator().manual_seed(7), x0_threshold=None
    )
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    late = samplers.sample_kandinsky3(
        denoise, x, schedule, steps, generator=torch.Generator().manual_seed(7), x0_threshold=None, first_step=3
    )
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in times[3:-1]] + [torch.zeros_like(x)]
    sched.set_timesteps(steps)
    assert torch.allclose(late, run_diffusers(sched, denoise, x, times[3:], noises=noises, eta=1.0), atol=1e-5)


def test_dpmpp_2m_is_diffusers_dpm_solver_plus_plus() -> None:
    from diffusers import DPMSolverMultistepScheduler

    schedule, steps = Schedule.cosine(1000), 10
    denoise = linear_denoiser(schedule)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sched = DPMSolverMultistepScheduler(
        trained_betas=cosine_betas(1000).numpy(),
        timestep_spacing="trailing",
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == samplers.strided_timesteps(1000, steps)
    want = run_diffusers(sched, denoise, x, sched.timesteps.tolist())
    got = samplers.sample_dpmpp_2m(denoise, x, schedule, steps, x0_threshold=None)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_dynamic_thresholding_is_diffusers() -> None:
    from diffusers import DDPMScheduler

    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * torch.tensor(
        [0.3, 1.0, 2.0, 4.0]
    ).reshape(4, 1, 1, 1)
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.99, sample_max_value=1e9)
    assert torch.allclose(samplers.threshold_x0(x0, 0.99), sched._threshold_sample(x0.clone()), atol=1e-6)
    assert torch.equal(samplers.threshold_x0(x0, None), x0)
    small = samplers.threshold_x0(x0[:1], 0.99)  # |x0| under 1: s floors at 1, nothing changes
    assert torch.allclose(small, x0[:1].clamp(-1, 1))


def test_timesteps_and_sampler_registry() -> None:
    assert (
        samplers.strided_timesteps(1000, 50)[:3] == [999, 979, 959] and samplers.strided_timesteps(1000, 50)[-1] == 19
    )
    assert (
        samplers.strided_timesteps(1000, 1) == [999] and len(samplers.strided_timesteps(1000, 1000)) == 999
    )  # never t = 0
    assert samplers.strided_timesteps(1000, 3) == [999, 666, 333]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=f"steps={bad}: must be in 1..1000"):
            samplers.strided_timesteps(1000, bad)
    assert samplers.leading_timesteps(1000, 25)[:2] == [961, 921] and samplers.leading_timesteps(1000, 25)[-1] == 1
    assert samplers.leading_timesteps(1000, 4, offset=0) == [750, 500, 250, 0]
    assert samplers.timesteps_for("diffusers_ddpm", 1000, 25) == samplers.leading_timesteps(1000, 25)
    assert samplers.timesteps_for("ddim", 1000, 25) == samplers.strided_timesteps(1000, 25)
    assert {n: samplers.get_sampler(n) for n in samplers.SAMPLERS} == samplers.SAMPLERS
    with pytest.raises(ValueError, match=r"unknown sampler 'euler': use one of \['ddim', 'diffusers_ddpm'"):
        samplers.timesteps_for("euler", 1000, 10)


def test_every_sampler_reports_each_step_and_reaches_a_deterministic_end() -> None:
    schedule = Schedule.cosine(1000)
    denoise = linear_denoiser(schedule)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    for name in samplers.SAMPLERS:
        seen: list[tuple[int, int]] = []
        out = samplers.get_sampler(name)(
            denoise,
            x,
            schedule,
            5,
            generator=torch.Generator().manual_seed(0),
            callback=lambda i, t, x0, seen=seen: seen.append((i, t)),
        )
        assert [i for i, _ in seen] == list(range(5))
        assert [t for _, t in seen] == samplers.timesteps_for(name, 1000, 5)
        again = samplers.get_sampler(name)(denoise, x, schedule, 5, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, again), name


# ---------------------------------------------------------------------------------------------- resume state


def draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], np.random.randn())


def test_random_states_round_trip_through_the_checkpoint_safe_form(tmp_path: Path) -> None:
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    np.random.randn()  # numpy caches a gaussian: the cached value must come back too
    plain = resume._to_plain(resume.random_states())
    torch.save(plain, tmp_path / "s.pt")
    expected = draws()
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(loaded) == {"torch", "numpy", "python"} and loaded["numpy"]["has_gauss"] in (0, 1)
    resume.set_random_states(resume._from_plain(loaded))
    assert draws() == expected
    states = resume._from_plain(loaded)
    assert states["numpy"][0] == "MT19937" and states["numpy"][1].dtype == np.uint32
    assert isinstance(states["python"][1], tuple)


def test_resume_state_restores_the_stream_before_the_first_batch_and_keeps_validation_out() -> None:
    class Loader:
        consumed = 0

    loader = Loader()
    trainer = SimpleNamespace(
        fit_loop=SimpleNamespace(_combined_loader=SimpleNamespace(flattened=[loader, object()])),
        training=True,
        state=SimpleNamespace(fn="fit"),
    )
    cb = resume.ResumeState()
    assert cb.state_key == "ResumeState"
    torch.manual_seed(1)
    expected_first = torch.rand(1)
    torch.manual_seed(1)
    cb.on_train_batch_start(trainer, None, None, 0)  # type: ignore[arg-type]  # nothing pending: the stream untouched
    assert loader.consumed == 1 and torch.equal(torch.rand(1), expected_first)
    no_loop = SimpleNamespace(fit_loop=SimpleNamespace(_combined_loader=None))
    resume.ResumeState().on_train_batch_start(no_loop, None, None, 0)  # type: ignore[arg-type]  # before the loop
    torch.manual_seed(11)
    saved = cb.state_dict()
    expected = torch.rand(2)
    restored = resume.ResumeState()
    restored.load_state_dict(saved)
    restored.load_state_dict({})  # a checkpoint without the key leaves the pending state alone
    torch.manual_seed(0)
    restored.on_train_batch_start(trainer, None, None, 6)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(2), expected) and loader.consumed == 7
    torch.manual_seed(0)
    restored.on_train_batch_start(trainer, None, None, 7)  # type: ignore[arg-type]
    assert not torch.equal(torch.rand(2), expected)  # applied once only

    torch.manual_seed(3)
    snapshot = torch.get_rng_state()
    cb.on_validation_start(trainer, None)  # type: ignore[arg-type]
    torch.rand(5)  # validation draws
    during = cb.state_dict()  # a checkpoint saved during validation holds the training stream's state
    assert torch.equal(during["random"]["torch"], snapshot)
    cb.on_validation_end(trainer, None)  # type: ignore[arg-type]
    after = torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(2), after)  # as if validation had drawn nothing
    sanity = SimpleNamespace(fit_loop=trainer.fit_loop, training=False, state=SimpleNamespace(fn="validate"))
    cb.on_validation_start(sanity, None)  # type: ignore[arg-type]
    torch.manual_seed(9)
    cb.on_validation_end(sanity, None)  # type: ignore[arg-type]  # plain validation: nothing to restore
    x = torch.rand(1)
    torch.manual_seed(9)
    assert torch.equal(torch.rand(1), x)


def test_checkpoints_name_their_mlflow_run_and_logs_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.tracking._tracking_service.utils as tracking
    from lightning.pytorch.loggers import MLFlowLogger

    # MLFlowLogger sets mlflow's tracking URI, global and in the environment: both restored after this test, so no
    # later test (or the commands it spawns) logs into this test's database
    monkeypatch.setattr(tracking, "_tracking_uri", tracking._tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")  # (undone: removed again)

    from k3lab.tracking.csv_log import ResumableCSVLogger

    mlf = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment_name="e")
    checkpoint: dict = {}
    resume.ResumeState().on_save_checkpoint(SimpleNamespace(loggers=[mlf]), None, checkpoint)  # type: ignore[arg-type]
    assert checkpoint == {"k3lab": {"mlflow_run_id": mlf.run_id}}
    empty: dict = {}
    resume.ResumeState().on_save_checkpoint(SimpleNamespace(loggers=[]), None, empty)  # type: ignore[arg-type]
    assert empty == {}
    torch.save({"k3lab": {"mlflow_run_id": "abc"}}, tmp_path / "a.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "b.ckpt")
    assert resume.checkpoint_run_id(tmp_path / "a.ckpt") == "abc"
    assert resume.checkpoint_run_id(tmp_path / "b.ckpt") is None
    torch.save({"k3lab": {"mlflow_run_id": "t"}, "w": torch.ones(2)}, tmp_path / "t.ckpt")  # tensors map to the CPU
    assert resume.checkpoint_run_id(tmp_path / "t.ckpt") == "t"
    torch.save({"k3lab": {"mlflow_run_id": SimpleNamespace()}}, tmp_path / "pickled.ckpt")  # an arbitrary object
    with pytest.raises(Exception, match="Weights only load failed"):
        resume.checkpoint_run_id(tmp_path / "pickled.ckpt")  # weights_only: never unpickled

    csv_logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in range(6):
        csv_logger.log_metrics({"train/loss": float(step)}, step=step)
    keep = resume.KeepLogs()
    keep.on_save_checkpoint(SimpleNamespace(loggers=[csv_logger]), None, {})  # type: ignore[arg-type]
    rows = (Path(csv_logger.log_dir) / "metrics.csv").read_text().splitlines()
    assert len(rows) == 7  # saved at the checkpoint: header + 6 steps
    other = SimpleNamespace(loggers=[csv_logger], is_global_zero=False)
    keep.on_load_checkpoint(other, None, {"global_step": 2})  # type: ignore[arg-type]
    assert len((Path(csv_logger.log_dir) / "metrics.csv").read_text().splitlines()) == 7  # rank 0 alone edits
    zero = SimpleNamespace(loggers=[csv_logger], is_global_zero=True)
    keep.on_load_checkpoint(zero, None, {"global_step": 4})  # type: ignore[arg-type]
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        steps = sorted(int(float(r["step"])) for r in csv.DictReader(f))
    assert steps == [0, 1, 2, 3]


def test_ckpt_path_last_and_cluster_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for key in ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    assert not resume.cluster_job()
    assert resume.resolve_ckpt_path(None, tmp_path) is None
    assert resume.resolve_ckpt_path("x/other.ckpt", tmp_path) == "x/other.ckpt"
    (tmp_path / "last.ckpt.tmp-123").write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="k3lab.run.resume"):
        assert resume.resolve_ckpt_path("last", tmp_path) is None and not (tmp_path / "last.ckpt.tmp-123").exists()
        (tmp_path / "last.ckpt").write_bytes(b"x")
        assert resume.resolve_ckpt_path("last", tmp_path) == str(tmp_path / "last.ckpt")
    assert [r.getMessage() for r in caplog.records] == [
        f"removing {tmp_path / 'last.ckpt.tmp-123'} (a checkpoint write that was interrupted)",
        f"ckpt_path=last: no checkpoint in {tmp_path} yet, starting from scratch",
        f"resuming from {tmp_path / 'last.ckpt'}",
    ]
    assert resume.resolve_ckpt_path(None, tmp_path) is None  # not a cluster job: a plain run starts fresh
    for key in ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_EXECUTOR"):
        monkeypatch.setenv(key, "1")
        assert resume.cluster_job() and resume.resolve_ckpt_path(None, tmp_path) == str(tmp_path / "last.ckpt")
        monkeypatch.delenv(key)


def test_atomic_checkpoint_io_replaces_or_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = resume.AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]

    def broken(*args, **kwargs):
        Path(args[2] if len(args) > 2 else args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(resume.TorchCheckpointIO, "save_checkpoint", broken)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert os.path.getsize(path) > 0


# ---------------------------------------------------------------------------------------------- edges mutation found


def test_the_chi_square_integral_is_scipys_non_central_t_where_scipy_is_finite() -> None:
    from scipy import stats

    for df in (1, 2, 5):
        crit = float(stats.t.ppf(0.975, df))
        for nc in (0.5, 3.0, 8.0):
            want = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
            if math.isfinite(want):
                assert paired._t_test_power(crit, df, nc) == pytest.approx(want, rel=1e-6), (df, nc)
    # 2 seeds at nc ~ 13 (scipy: NaN): between the neighbours, not 0 or 1
    assert 0.6 < paired.power(0.3659, 0.04, 2) < 0.75


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_seeds_needed_over_a_range_of_effects_and_alphas(alpha: float) -> None:
    for ratio in (0.2, 0.35, 0.5, 0.8, 1.2, 2.0, 3.5, 6.0, 12.0, 40.0):
        n = paired.seeds_needed(ratio, 1.0, alpha=alpha)
        brute = next(k for k in range(2, 1000) if paired.power(ratio, 1.0, k, alpha) >= 0.8)
        assert n == brute, (ratio, alpha)
    assert paired.seeds_needed(40.0, 1.0) == 2  # a huge effect: two seeds do
    assert paired.seeds_needed(0.5, 1.0, target=0.9) > paired.seeds_needed(0.5, 1.0)


def test_prompts_needed_and_seed_effect_boundaries() -> None:
    allowed = paired.minimum_detectable_effect(1.0, 2, alpha=0.1)
    n = paired.prompts_needed(0.5, 0.0, 0.2, 2, alpha=0.1)  # 2 seeds are enough to plan with
    assert n == math.ceil(0.2 / (0.5 / allowed) ** 2)
    exact = (0.5 / paired.minimum_detectable_effect(1.0, 3)) ** 2
    assert paired.prompts_needed(0.5, exact, 0.2, 3) == math.inf  # tau^2 alone uses the whole budget
    two = paired.seed_effect(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]))  # 2 prompts: defined
    assert two.prompts == 2 and two.estimate == 0.5 and two.variance == pytest.approx(0.25)  # var([1, 0]) / 2
    one = paired.seed_effect(np.array([[1.0]]), np.array([[0.0]]))
    assert all(math.isnan(v) for v in (one.estimate, one.variance, one.unpaired_variance)) and one.prompts == 1
    ints = paired.seed_effect(np.array([[1, 0, 1]]), np.array([[0, 0, 1]]))  # integer scores are averaged as floats
    assert ints.estimate == pytest.approx(1 / 3)
    none = paired.random_effects([], [])
    assert all(math.isnan(v) for v in (none.estimate, none.half_width, none.tau2, none.se)) and none.seeds == 0
    single = paired.random_effects([0.3], [0.09])
    assert math.isnan(single.half_width) and math.isnan(single.tau2) and single.se == pytest.approx(0.3)


def test_bootstrap_defaults_are_the_documented_ones() -> None:
    groups = [list(np.random.default_rng(i).random(4)) for i in range(30)]
    assert bootstrap_interval(groups) == bootstrap_interval(groups, num_samples=2000, seed=0, alpha=0.05)
    assert bootstrap_interval(groups, num_samples=2001) != bootstrap_interval(groups)
