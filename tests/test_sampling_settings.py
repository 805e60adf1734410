"""One sampling-settings object: every default written once (in k3lab.diffusion.settings), the config group states
the same values, and the settings reach every consumer whole."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from k3lab.diffusion import DEFAULT_SAMPLING, SamplingSettings
from k3lab.run.config import compose

ROOT = Path(__file__).resolve().parents[1]


def test_each_default_is_written_once_in_the_package() -> None:
    """A grep of src/: the guidance, steps, sampler and threshold defaults appear as literals only in settings.py;
    every other default reads DEFAULT_SAMPLING."""
    patterns = {
        "guidance": r"(guidance\w*|weight)\s*(:\s*float)?\s*=\s*3\.0\b|\"guidance\w*\",\s*3\.0",
        "steps": r"steps\s*(:\s*int)?\s*=\s*(50|25)\b|\"\w*steps\",\s*(50|25)\)",
        "sampler": r"sampler\s*(:\s*str)?\s*=\s*\"kandinsky3\"|\"sampler\",\s*\"kandinsky3\"",
        "x0_threshold": r"x0_threshold\s*(:\s*float \| None)?\s*=\s*0\.99\b|default=0\.99\b",
    }
    where: dict[str, list[str]] = {k: [] for k in patterns}
    for f in (ROOT / "src").rglob("*.py"):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            for key, pattern in patterns.items():
                if re.search(pattern, line):
                    where[key].append(f"{f.relative_to(ROOT)}:{n}")
    expected = {"guidance": 2, "steps": 2, "sampler": 1, "x0_threshold": 1}  # guidance + prior_guidance, steps + prior
    for key, hits in where.items():
        assert all(h.startswith("src/k3lab/diffusion/settings.py") for h in hits), (key, hits)
        assert len(hits) == expected[key], (key, hits)
    assert len(re.findall(r"DEFAULT_SAMPLING\.", "".join(f.read_text() for f in (ROOT / "src").rglob("*.py")))) > 20


def test_the_config_group_states_the_same_defaults() -> None:
    group = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "sampling" / "default.yaml"))
    assert group == asdict(DEFAULT_SAMPLING)
    cfg = compose(["stage=diffusion"])
    assert SamplingSettings.of_run(cfg) == DEFAULT_SAMPLING
    assert SamplingSettings.from_config(cfg.stage.validation.sampling) == DEFAULT_SAMPLING


def test_presets_and_overrides_reach_the_settings_and_the_stage() -> None:
    cfg = compose(["experiment=ablation_tiny", "sampling.guidance=5.5", "sampling.prior_guidance=2.0"])
    s = SamplingSettings.of_run(cfg)
    assert (s.sampler, s.steps, s.guidance, s.x0_threshold, s.prior_guidance) == ("dpmpp_2m", 25, 5.5, None, 2.0)
    assert SamplingSettings.from_config(cfg.stage.validation.sampling) == s  # the stage's grid samples the same way


def test_older_runs_and_bad_values() -> None:
    """A run saved before the group existed reads its stage's validation settings; unknown keys and impossible
    values are errors naming the key."""
    old = OmegaConf.create({"stage": {"sampler": "ddim", "sample_steps": 30, "guidance_weight": 4.0}})
    assert SamplingSettings.of_run(old) == DEFAULT_SAMPLING.updated(sampler="ddim", steps=30, guidance=4.0)
    with pytest.raises(ValueError, match="unknown keys \\['guidance_scale'\\]"):
        SamplingSettings.from_config({"guidance_scale": 4})
    with pytest.raises(ValueError, match="sampling.x0_threshold=1.5"):
        SamplingSettings(x0_threshold=1.5)
    with pytest.raises(ValueError, match="sampling.steps=0"):
        SamplingSettings.from_config({"steps": 0})
    assert DEFAULT_SAMPLING.updated(steps=None, guidance=7.0) == SamplingSettings(guidance=7.0)
