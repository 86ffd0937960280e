"""The statistics behind results agree with SciPy and numpy on the same data, and the verdict reads them."""

import json
from dataclasses import asdict
from datetime import UTC, datetime

import numpy as np
import pytest
from scipy import stats as scipy_stats

from server.experiments import stats
from server.experiments.model import Experiment, RequestRecord, Status, Variant
from server.experiments.results import analyse

RNG = np.random.default_rng(5)


@pytest.mark.parametrize("n_a,n_b,shift,scale_b", [(40, 55, 0.3, 2.0), (8, 12, 0.0, 1.0), (200, 30, -1.0, 0.5)])
def test_welch_t_test_matches_scipy(n_a, n_b, shift, scale_b):
    a = RNG.normal(3.0, 1.0, n_a).tolist()
    b = RNG.normal(3.0 + shift, scale_b, n_b).tolist()
    ours = stats.welch_t_test(a, b)
    theirs = scipy_stats.ttest_ind(b, a, equal_var=False)
    assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-8)
    assert ours.df == pytest.approx(theirs.df, rel=1e-10)


def test_welch_t_test_with_constant_arms():
    assert stats.welch_t_test([2.0, 2.0], [2.0, 2.0]).p_value == 1.0
    differ = stats.welch_t_test([2.0, 2.0], [3.0, 3.0])
    assert differ.p_value == 0.0 and differ.statistic is None


@pytest.mark.parametrize("x_a,n_a,x_b,n_b", [(30, 100, 45, 100), (12, 40, 9, 35), (500, 1000, 530, 1000)])
def test_two_proportion_z_test_matches_the_textbook_formula(x_a, n_a, x_b, n_b):
    a = np.array([1.0] * x_a + [0.0] * (n_a - x_a))
    b = np.array([1.0] * x_b + [0.0] * (n_b - x_b))
    pooled = np.concatenate([a, b]).mean()
    z = (b.mean() - a.mean()) / np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    ours = stats.two_proportion_z_test(x_a, n_a, x_b, n_b)
    assert ours.statistic == pytest.approx(z, rel=1e-12)
    assert ours.p_value == pytest.approx(2 * scipy_stats.norm.sf(abs(z)), rel=1e-12)
    # a chi-square test of the 2x2 table without continuity correction is the same test (z² = χ²)
    table = [[x_a, n_a - x_a], [x_b, n_b - x_b]]
    assert ours.p_value == pytest.approx(scipy_stats.chi2_contingency(table, correction=False).pvalue, rel=1e-9)


def test_identical_extreme_proportions_are_no_difference():
    assert stats.two_proportion_z_test(0, 10, 0, 12).p_value == 1.0
    assert stats.two_proportion_z_test(10, 10, 12, 12).p_value == 1.0


@pytest.mark.parametrize("successes,n", [(0, 10), (7, 20), (40, 40), (123, 400)])
def test_wilson_interval_matches_scipy(successes, n):
    ci = scipy_stats.binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert stats.wilson_interval(successes, n) == pytest.approx((ci.low, ci.high), rel=1e-9, abs=1e-12)


def test_t_interval_matches_scipy():
    values = RNG.normal(10, 3, 25).tolist()
    expected = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert stats.t_interval(values) == pytest.approx(expected, rel=1e-10)


def test_estimate_picks_the_interval_by_score_type():
    assert stats.estimate([], binary=True) == stats.Estimate(0, None, None, None)
    assert stats.estimate([0.4], binary=False) == stats.Estimate(1, 0.4, None, None)
    binary = stats.estimate([1.0, 0.0, 1.0, 1.0], binary=True)
    assert (binary.ci_low, binary.ci_high) == pytest.approx(stats.wilson_interval(3, 4))


@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = RNG.exponential(0.2, 37).tolist()
    assert stats.percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)
    assert stats.percentile([0.5], q) == 0.5


# ---- results and verdict --------------------------------------------------------------------------


def _experiment(*names: str, min_samples: int = 30) -> Experiment:
    now = datetime.now(UTC)
    variants = tuple(Variant(n, f"{n}@1", 1.0) for n in names)
    return Experiment("exp", "", Status.RUNNING, variants, "user", min_samples, now, now)


def _records(variant: str, scores: list[float], latency: float = 0.1) -> list[RequestRecord]:
    return [RequestRecord(variant, True, None, 5, latency / 2, latency, s) for s in scores]


def test_binary_results_name_the_better_variant():
    records = _records("A", [1.0] * 12 + [0.0] * 28) + _records("B", [1.0] * 30 + [0.0] * 10, latency=0.2)
    records.append(RequestRecord("A", True, "server_busy", 0, None, None, None))
    results = analyse(_experiment("A", "B"), records)
    a, b = results.variants
    assert results.score_type == "binary" and a.control and not b.control
    assert (a.requests, a.errors, a.errors_by_code, a.output_tokens) == (41, 1, {"server_busy": 1}, 200)
    assert b.latency == {"p50": 0.2, "p90": 0.2, "p99": 0.2} and b.ttft["p50"] == pytest.approx(0.1)
    assert a.comparison is None and b.comparison.test == "two-proportion z-test"
    assert b.comparison.p_value == pytest.approx(stats.two_proportion_z_test(12, 40, 30, 40).p_value)
    assert b.comparison.difference == pytest.approx(0.45)
    assert results.verdict.enough_data and results.verdict.winner == "B"
    json.dumps(asdict(results))  # plain Python numbers throughout (no numpy scalars)


def test_numeric_results_use_welch_and_bonferroni():
    control = RNG.normal(3.0, 1.0, 50).tolist()
    better = RNG.normal(4.0, 1.0, 50).tolist()
    same = RNG.normal(3.0, 1.0, 50).tolist()
    results = analyse(_experiment("A", "B", "C"), _records("A", control) + _records("B", better) + _records("C", same))
    assert results.score_type == "numeric" and results.alpha == pytest.approx(0.025)
    b = results.variants[1]
    assert b.comparison.p_value == pytest.approx(scipy_stats.ttest_ind(better, control, equal_var=False).pvalue)
    assert results.verdict.winner == "B"


def test_results_say_plainly_when_data_is_short_or_undecided():
    short = analyse(_experiment("A", "B"), _records("A", [1.0, 0.0] * 20) + _records("B", [1.0, 0.0] * 5))
    assert not short.verdict.enough_data and short.verdict.winner is None
    assert "not enough data" in short.verdict.message and "B has 10" in short.verdict.message
    assert short.variants[1].comparison is not None  # the test is still shown, for what it is worth
    empty = analyse(_experiment("A", "B"), [])
    assert empty.score_type is None and empty.variants[0].ttft is None and not empty.verdict.enough_data
    tie = analyse(_experiment("A", "B"), _records("A", [1.0, 0.0] * 20) + _records("B", [0.0, 1.0] * 20))
    assert tie.verdict.enough_data and tie.verdict.winner is None and "no variant differs" in tie.verdict.message
    worse = analyse(_experiment("A", "B"), _records("A", [1.0] * 35 + [0.0] * 5) + _records("B", [0.0] * 35 + [1.0] * 5))
    assert worse.verdict.winner == "A"
