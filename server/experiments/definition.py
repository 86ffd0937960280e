"""Checks on an experiment's variants and weights, each reporting every problem at once."""

import math
from dataclasses import replace

from server.experiments.errors import InvalidExperimentError
from server.experiments.model import Variant
from server.registry.errors import InvalidNameError
from server.registry.names import check_name


def check_variants(variants: tuple[Variant, ...]) -> None:
    """Every problem at once, as one error."""
    problems = []
    if len(variants) < 2:
        problems.append("an experiment needs at least two variants")
    names = [v.name for v in variants]
    for name in names:
        try:
            check_name(name, "variant name")
        except InvalidNameError as exc:
            problems.append(str(exc))
    if len(set(names)) != len(names):
        problems.append("variant names must be unique")
    problems += _weight_problems([v.weight for v in variants])
    if sum(v.control for v in variants) > 1:
        problems.append("at most one variant can be the control")
    if problems:
        raise InvalidExperimentError("invalid experiment: " + "; ".join(problems))


def _weight_problems(weights: list[float]) -> list[str]:
    if any(not math.isfinite(w) or w < 0 for w in weights):
        return ["weights must be finite and >= 0"]
    if not any(w > 0 for w in weights):
        return ["at least one weight must be positive"]
    return []


def reweighted(variants: tuple[Variant, ...], weights: dict[str, float]) -> tuple[Variant, ...]:
    unknown = sorted(set(weights) - {v.name for v in variants})
    if unknown:
        raise InvalidExperimentError(f"no such variant(s): {', '.join(unknown)}")
    changed = tuple(replace(v, weight=weights.get(v.name, v.weight)) for v in variants)
    if problems := _weight_problems([v.weight for v in changed]):
        raise InvalidExperimentError("invalid weights: " + "; ".join(problems))
    return changed
