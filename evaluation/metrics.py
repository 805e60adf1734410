"""The metric registry: every metric the ablation evaluation computes and the report tabulates, with its exact
definition, its direction and the inputs it needs. ``python -m evaluation metrics`` lists it.

A new metric is one :func:`register` call (in any module imported before the evaluation runs, e.g. a plugin or a
test): name it in an ablation preset's ``ablation.evaluation.metrics`` and the cells compute it and the report shows
it (its ``headline`` keys, with the right "lower is better" marking).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INPUTS = ("samples", "real", "reference_clip", "fid_reference")


@dataclass
class EvalInputs:
    """What metrics read. ``samples``: generated ``ImageRecord``s per split ('seen', 'heldout'), prompts and scene
    specs attached; ``real``: real test images with theirs; ``reference_clip``: the evaluation's own CLIP
    (``evaluation.clip_score.ClipModel``); ``fid_reference``: a function giving the reference features (cached)."""

    samples: dict[str, list[Any]]
    real: list[Any] = field(default_factory=list)
    reference_clip: Any = None
    fid_reference: Callable[[Any], np.ndarray] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    # filled by metrics that score single images: split -> score name -> one value per sample (NaN: not applicable)
    per_image: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """One registry entry. ``compute(inputs) -> {key: value}`` (keys without the ``eval/`` prefix); ``outputs`` are
    glob patterns of those keys (default: the name), all sharing ``higher_is_better``; ``headline`` the keys a report
    shows by default; ``definition`` states exactly what is computed."""

    name: str
    compute: Callable[[EvalInputs], dict[str, float]]
    higher_is_better: bool
    needs: tuple[str, ...]
    definition: str
    outputs: tuple[str, ...] = ()
    headline: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.needs) - set(INPUTS))
        if unknown:
            raise ValueError(f"metric {self.name!r}: unknown inputs {unknown} (known: {INPUTS})")
        if not self.outputs:
            object.__setattr__(self, "outputs", (self.name,))
        if not self.headline:
            object.__setattr__(self, "headline", tuple(o for o in self.outputs if "*" not in o))

    def produces(self, key: str) -> bool:
        """Whether this metric writes the result key ``key`` (its outputs are glob patterns)."""
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.outputs)


REGISTRY: dict[str, Metric] = {}


def register(metric: Metric, replace: bool = False) -> Metric:
    """Add ``metric`` to the registry (``replace`` to redefine a name)."""
    if metric.name in REGISTRY and not replace:
        raise ValueError(f"metric {metric.name!r} is already registered (pass replace=True to redefine it)")
    REGISTRY[metric.name] = metric
    return metric


def get(name: str) -> Metric:
    """The registered metric ``name``; an unknown name is an error listing the registered ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown metric {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def metric_for(key: str) -> Metric | None:
    """The registered metric that produces ``key`` (``eval/`` prefix allowed), or None."""
    key = key.removeprefix("eval/")
    return next((m for m in REGISTRY.values() if m.produces(key)), None)


def lower_is_better(key: str) -> bool:
    """True for keys a registered metric produces and marks lower-is-better (FID, KID, ...)."""
    metric = metric_for(key)
    return metric is not None and not metric.higher_is_better


def compute(names: Sequence[str], inputs: EvalInputs) -> dict[str, float]:
    """Every named metric on ``inputs``; keys prefixed ``eval/``. Unknown names fail before anything is computed."""
    metrics = [get(n) for n in names]
    out: dict[str, float] = {}
    for metric in metrics:
        missing = [n for n in metric.needs if not getattr(inputs, n)]
        if missing:
            raise ValueError(f"metric {metric.name!r} needs {missing}, which this evaluation did not provide")
        out |= {f"eval/{k}": float(v) for k, v in metric.compute(inputs).items()}
    return out


# ----------------------------------------------------------------------------- built-in metrics
def _flat(prefix: str, report: dict[str, Any], group: str = "all") -> dict[str, float]:
    part = report.get(group, {"tasks": {}, "overall": float("nan")})
    return {
        **{f"{prefix}/{t}": float(v) for t, v in part["tasks"].items()},
        f"{prefix}/overall": float(part["overall"]),
    }


def _compbench(inputs: EvalInputs) -> dict[str, float]:
    from evaluation import compbench

    out: dict[str, float] = {}
    for split, records in inputs.samples.items():
        results: list[dict[str, bool]] = []
        out |= _flat(split, compbench.score(((r.image, r.spec) for r in records), per_image=results))
        tasks = sorted({t for r in results for t in r})
        scores = inputs.per_image.setdefault(split, {})
        for task in tasks:
            scores[task] = [float(r[task]) if task in r else float("nan") for r in results]
    seen = inputs.samples.get("seen", [])
    real = inputs.real[: len(seen)] if seen else inputs.real
    if real:
        rng = np.random.default_rng(0)
        pool = inputs.real
        shuffled = [pool[i] for i in rng.permutation(len(pool))]
        out |= _flat("real", compbench.score((r.image, r.spec) for r in real))
        out |= _flat(
            "chance",
            compbench.score(
                (s.image, r.spec) for s, r in zip(shuffled[: len(real)], real, strict=False) if s.prompt != r.prompt
            ),
        )
    return out


def _clip_score(inputs: EvalInputs) -> dict[str, float]:
    from evaluation.clip_score import clip_score

    seen = inputs.samples["seen"]
    real = inputs.real[: len(seen)]
    result = clip_score(inputs.reference_clip, [r.image for r in seen], [r.prompt for r in seen])
    inputs.per_image.setdefault("seen", {})["clip_score"] = [float(v) for v in result["per_image"]]
    out = {"clip_score": result["clip_score"]}
    if real:
        out["clip_score_real"] = clip_score(inputs.reference_clip, [r.image for r in real], [r.prompt for r in real])[
            "clip_score"
        ]
    return out


def _fid_clip(inputs: EvalInputs) -> dict[str, float]:
    from evaluation import fid
    from evaluation.reference_clip import OPENAI_MEAN, OPENAI_STD

    clip = inputs.reference_clip
    size = clip.model.visual.image_size
    extractor = fid.open_clip_extractor(
        clip.model, size[0] if isinstance(size, (tuple, list)) else size, OPENAI_MEAN, OPENAI_STD
    )
    assert inputs.fid_reference is not None
    result = fid.compute(inputs.samples["seen"], inputs.fid_reference(extractor), extractor, clip.name)
    return {"fid_clip": float(result["fid"]), "kid_clip": float(result["kid"])}


register(
    Metric(
        "compbench",
        _compbench,
        True,
        ("samples",),
        "Compositional accuracy (evaluation.compbench): the rule-based detector finds each object a prompt's scene "
        "spec asks "
        "for (shape, colour, count, relation); per task the share of images that pass, per split (seen/<task>, "
        "heldout/<task>, */overall = mean over tasks). With real images: real/<task> (real images with their own "
        "prompt, the "
        "detector's ceiling) and chance/<task> (real images judged against another prompt's scene).",
        outputs=("seen/*", "heldout/*", "real/*", "chance/*"),
        headline=("seen/single_object", "seen/colors", "seen/overall", "heldout/overall"),
    )
)
register(
    Metric(
        "fid_clip",
        _fid_clip,
        False,
        ("samples", "reference_clip", "fid_reference"),
        "FID (Frechet distance of Gaussian fits) and KID (unbiased polynomial-kernel MMD^2, clean-fid's estimator on "
        "100 seeded subsets) "
        "between "
        "the seen samples' and the real test images' features in the reference CLIP's image-embedding space.",
        outputs=("fid_clip", "kid_clip"),
        headline=("fid_clip",),
    )
)
register(
    Metric(
        "clip_score",
        _clip_score,
        True,
        ("samples", "reference_clip"),
        "CLIP score with the reference CLIP, Hessel et al. (2021)'s per-image form: mean over images of "
        "100 * max(cos(image, text), 0). torchmetrics' CLIPScore clamps the mean instead (100 * max(mean cos, 0)); the "
        "two "
        "differ whenever a cosine is negative. clip_score_real: the same on real images with their own prompts.",
        outputs=("clip_score", "clip_score_real"),
        headline=("clip_score",),
    )
)


_PREFERENCE_CACHE: dict[tuple[str, str], Any] = {}


def preference_scorer(kind: str, settings: dict[str, Any]) -> Any:
    """The PickScore or HPSv2 scorer named by ``settings`` (``pickscore``: model folder, ``pickscore_processor``
    optional; ``hpsv2``: checkpoint file, ``hpsv2_model``/``hpsv2_config`` optional), loaded once per path."""
    from evaluation import preference

    path = settings.get(kind)
    if not path:
        raise ValueError(f"metric {kind!r} needs settings[{kind!r}]: a local weights path (nothing is downloaded)")
    key = (kind, str(path))
    if key not in _PREFERENCE_CACHE:
        if kind == "pickscore":
            _PREFERENCE_CACHE[key] = preference.load_pickscore(path, settings.get("pickscore_processor"))
        else:
            _PREFERENCE_CACHE[key] = preference.load_hpsv2(
                path, settings.get("hpsv2_model", "ViT-H-14"), settings.get("hpsv2_config")
            )
    return _PREFERENCE_CACHE[key]


def _preference(kind: str) -> Callable[[EvalInputs], dict[str, float]]:
    def compute(inputs: EvalInputs) -> dict[str, float]:
        scorer = preference_scorer(kind, inputs.settings)
        seen = inputs.samples["seen"]
        scores = scorer.score([r.image for r in seen], [r.prompt for r in seen])
        inputs.per_image.setdefault("seen", {})[kind] = scores
        return {kind: float(np.mean(scores)) if scores else float("nan")}

    return compute


def _register_preference() -> None:
    from evaluation.preference import HPSV2_DEFINITION, PICKSCORE_DEFINITION

    for kind, definition in (("pickscore", PICKSCORE_DEFINITION), ("hpsv2", HPSV2_DEFINITION)):
        register(Metric(kind, _preference(kind), True, ("samples",), definition + " Mean over the seen samples."))


_register_preference()


def describe() -> list[dict[str, Any]]:
    """The registry as JSON-ready rows (``python -m evaluation metrics``)."""
    return [
        {
            "name": m.name,
            "higher_is_better": m.higher_is_better,
            "needs": list(m.needs),
            "outputs": list(m.outputs),
            "headline": list(m.headline),
            "definition": m.definition,
        }
        for m in REGISTRY.values()
    ]
