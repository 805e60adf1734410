"""Two-level fractional factorial designs for ablation sweeps (Box, Hunter & Hunter, *Statistics for
Experimenters*, ch. 6).

A sweep lists each factor's two levels (``hydra.sweeper.params``); ``hydra.sweeper.fraction`` names the factors of
a half fraction and the sign of its defining relation. A level is coded -1 when it is the first value listed (the
reference) and +1 otherwise; a job is kept when the product of its factors' codes equals ``sign``. With the
default sign -1 and three factors A, B, C the design is I = -ABC: it holds the all-reference cell, four runs per
seed instead of eight, and every main effect is aliased with the two-factor interaction of the other two factors
(A = -BC, B = -AC, C = -AB; resolution III). Factors not named in the fraction (the seed) are crossed with it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HalfFraction:
    """A 2^(k-1) half fraction over ``factors`` (config keys) of two levels each; I = ``sign`` x the product."""

    factors: tuple[str, ...]
    levels: Mapping[str, Sequence[str]]
    sign: int = -1

    def __post_init__(self) -> None:
        if self.sign not in (-1, 1):
            raise ValueError(f"hydra.sweeper.fraction.sign={self.sign}: use -1 or 1")
        if len(self.factors) < 2:
            raise ValueError(f"hydra.sweeper.fraction.factors={list(self.factors)}: a half fraction needs >= 2 factors")
        for key in self.factors:
            values = list(self.levels.get(key, ()))
            if len(values) != 2:
                raise ValueError(
                    f"hydra.sweeper.fraction: factor {key!r} must be swept over exactly two levels (got {values}); "
                    f"swept keys: {sorted(self.levels)}"
                )

    def code(self, key: str, value: str) -> int:
        """-1 for the factor's first (reference) level, +1 for its second."""
        values = [str(v) for v in self.levels[key]]
        if str(value) not in values:
            raise ValueError(f"{key}={value}: not one of the design's levels {values}")
        return -1 if str(value) == values[0] else 1

    def keeps(self, job: Mapping[str, str]) -> bool:
        """Whether a job (key -> value for at least the design's factors) is in the fraction."""
        return math.prod(self.code(k, job[k]) for k in self.factors) == self.sign

    def runs(self) -> list[dict[str, str]]:
        """The kept level combinations (one per run and seed), reference cell first when kept."""
        combos = itertools.product(*[[str(v) for v in self.levels[k]] for k in self.factors])
        return [job for job in (dict(zip(self.factors, c, strict=True)) for c in combos) if self.keeps(job)]

    def aliases(self) -> dict[str, str]:
        """Each main effect's alias in the fraction: the signed product of the other factors (A -> -BC)."""
        prefix = "-" if self.sign < 0 else "+"
        return {k: prefix + " x ".join(o for o in self.factors if o != k) for k in self.factors}

    def describe(self) -> str:
        """One paragraph for the report: the defining relation, what is estimable, what is aliased."""
        names = [f.split("/")[-1] for f in self.factors]
        relation = ("I = -" if self.sign < 0 else "I = +") + " x ".join(names)
        alias = "; ".join(
            f"{n} is aliased with {'-' if self.sign < 0 else '+'}({' x '.join(o for o in names if o != n)})"
            for n in names
        )
        extra = (
            ""
            if len(names) == 3
            else " Higher-order interactions are aliased with lower-order ones by the same relation."
        )
        return (
            f"Half-fraction 2^({len(names)}-1) design, defining relation {relation} ({len(self.runs())} runs per seed "
            f"instead of {2 ** len(names)}). Estimable: the {len(names)} main effects, each as the mean of the runs at "
            f"its level minus the mean at its reference, valid if the two-factor interactions are negligible: "
            f"{alias}. The interactions themselves are not estimable.{extra}"
        )


def fraction_from(
    spec: Mapping | None, levels: Mapping[str, Sequence[str]], pinned: Sequence[str] = ()
) -> HalfFraction | None:
    """The design of ``hydra.sweeper.fraction`` (``{factors: [...], sign: -1}``) over the swept ``levels``; None
    when no fraction is set, or when a factor is ``pinned`` to one value (``model/prior=none`` on the command line:
    the remaining swept keys then run as a full product, as the user asked)."""
    if not spec:
        return None
    unknown = sorted(set(spec) - {"factors", "sign"})
    if unknown:
        raise ValueError(f"hydra.sweeper.fraction: unknown keys {unknown} (known: factors, sign)")
    factors = tuple(str(f) for f in spec.get("factors") or ())
    held = [f for f in factors if f in pinned and f not in levels]
    if held:
        log.info("fractional design lifted: %s pinned to one value; the swept keys run as a full product", held)
        return None
    missing = [f for f in factors if f not in levels]
    if missing:
        raise ValueError(
            f"hydra.sweeper.fraction.factors {missing} are not swept (swept keys: {sorted(levels)}); list them under "
            "hydra.sweeper.params with two levels each"
        )
    return HalfFraction(factors, {k: [str(v) for v in levels[k]] for k in factors}, int(spec.get("sign", -1)))
