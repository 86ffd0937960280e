"""An experiment's results: per-variant traffic, latency and feedback, each variant tested against the
control, and a plain verdict. Higher scores are better."""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from server.experiments import stats
from server.experiments.model import Experiment, RequestRecord, Variant

ALPHA = 0.05  # family-wise significance level, split over the comparisons (Bonferroni)
PERCENTILES = (50, 90, 99)

ScoreType = Literal["binary", "numeric"]


@dataclass(frozen=True)
class Comparison:
    """A variant against the control: difference of means (variant − control) and the test's verdict."""

    against: str
    test: str
    difference: float
    statistic: float | None
    p_value: float
    df: float | None
    significant: bool  # p below the Bonferroni-corrected threshold


@dataclass(frozen=True)
class VariantResult:
    name: str
    adapter: str | None  # None = the bare base
    weight: float
    control: bool  # the variant the others are compared against
    requests: int
    errors: int
    errors_by_code: dict[str, int]
    output_tokens: int
    ttft: dict[str, float] | None  # {"p50", "p90", "p99"} seconds over served requests; None if none
    latency: dict[str, float] | None
    feedback: stats.Estimate
    comparison: Comparison | None  # None for the control, or with fewer than two scores in an arm


@dataclass(frozen=True)
class Verdict:
    enough_data: bool
    winner: str | None
    message: str


@dataclass(frozen=True)
class Results:
    experiment: str
    status: str
    score_type: ScoreType | None  # None until the first feedback
    alpha: float  # the threshold each comparison's p-value is held to
    min_samples: int
    variants: tuple[VariantResult, ...]
    verdict: Verdict


def analyse(experiment: Experiment, records: Sequence[RequestRecord]) -> Results:
    by_variant: dict[str, list[RequestRecord]] = {v.name: [] for v in experiment.variants}
    for record in records:
        by_variant[record.variant].append(record)  # variants never change after creation
    scores = {name: [r.score for r in rows if r.score is not None] for name, rows in by_variant.items()}
    binary = stats.is_binary([s for values in scores.values() for s in values])
    score_type = ("binary" if binary else "numeric") if any(scores.values()) else None
    control = experiment.control
    threshold = ALPHA / max(1, len(experiment.variants) - 1)
    variants = tuple(
        _variant(v, v is control, by_variant[v.name], scores[v.name], binary,
                 None if v is control else _compare(control.name, scores[control.name], scores[v.name], binary,
                                                    threshold))
        for v in experiment.variants
    )
    return Results(experiment.name, experiment.status.value, score_type, threshold, experiment.min_samples,
                   variants, _verdict(experiment, variants, threshold))


def _variant(variant: Variant, control: bool, rows: list[RequestRecord], scores: list[float], binary: bool,
             comparison: Comparison | None) -> VariantResult:
    errors = Counter(r.error for r in rows if r.error is not None)
    served = [r for r in rows if r.finished and r.error is None]
    return VariantResult(
        name=variant.name, adapter=variant.adapter, weight=variant.weight, control=control,
        requests=len(rows), errors=sum(errors.values()), errors_by_code=dict(errors),
        output_tokens=sum(r.output_tokens for r in rows),
        ttft=_percentiles([r.ttft_s for r in served if r.ttft_s is not None]),
        latency=_percentiles([r.latency_s for r in served if r.latency_s is not None]),
        feedback=stats.estimate(scores, binary), comparison=comparison,
    )


def _compare(control: str, a: list[float], b: list[float], binary: bool, threshold: float) -> Comparison | None:
    if len(a) < 2 or len(b) < 2:
        return None
    if binary:
        test = stats.two_proportion_z_test(round(sum(a)), len(a), round(sum(b)), len(b))
    else:
        test = stats.welch_t_test(a, b)
    difference = sum(b) / len(b) - sum(a) / len(a)
    return Comparison(control, test.test, difference, test.statistic, test.p_value, test.df,
                      test.p_value < threshold)


def _verdict(experiment: Experiment, variants: tuple[VariantResult, ...], threshold: float) -> Verdict:
    short = [v for v in variants if v.feedback.n < experiment.min_samples]
    if short:
        counts = ", ".join(f"{v.name} has {v.feedback.n}" for v in short)
        return Verdict(False, None, f"not enough data yet: every variant needs {experiment.min_samples} scored "
                                    f"requests ({counts})")
    control = next(v for v in variants if v.name == experiment.control.name)
    treatments = [v for v in variants if v is not control]
    better = [v for v in treatments if v.comparison.significant and v.comparison.difference > 0]
    if better:
        best = max(better, key=lambda v: v.feedback.mean)
        return Verdict(True, best.name, f"{best.name} beats the control {control.name}: mean score "
                                        f"{best.feedback.mean:.4g} against {control.feedback.mean:.4g} "
                                        f"(p = {best.comparison.p_value:.3g}, {best.comparison.test})")
    if all(v.comparison.significant for v in treatments):  # all significant, none better: all worse
        return Verdict(True, control.name, f"the control {control.name} beats every other variant "
                                           f"(each p < {threshold:.3g})")
    return Verdict(True, None, f"no variant differs significantly from the control {control.name} "
                               f"(threshold p < {threshold:.3g}); collect more data or keep the control")


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {f"p{q}": stats.percentile(values, q) for q in PERCENTILES}
