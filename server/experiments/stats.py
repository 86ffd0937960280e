"""The statistics behind experiment results: means with 95% intervals, tests against the control, and
latency percentiles. Pure functions of plain numbers; SciPy gives only the distribution functions (whose
numpy scalars are turned back into floats, so results serialise as JSON)."""

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import norm, t

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean and its 95% interval; the interval is None with fewer than two values."""

    n: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True)
class HypothesisTest:
    test: str  # "two-proportion z-test" or "welch t-test"
    statistic: float | None  # z or t, positive when the treatment's mean is higher; None when infinite
    p_value: float  # two-sided
    df: float | None = None  # Welch–Satterthwaite degrees of freedom (t-test only)


def is_binary(values: Sequence[float]) -> bool:
    """Scores are read as binary (success rates) when every one is 0 or 1."""
    return bool(values) and all(v in (0.0, 1.0) for v in values)


def estimate(values: Sequence[float], binary: bool) -> Estimate:
    """The mean with a Wilson interval for binary scores, a Student t interval for numeric ones."""
    n = len(values)
    if n == 0:
        return Estimate(0, None, None, None)
    mean = statistics.fmean(values)
    if n < 2:
        return Estimate(n, mean, None, None)
    low, high = wilson_interval(round(sum(values)), n) if binary else t_interval(values)
    return Estimate(n, mean, low, high)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion. With p̂ = x/n and z = Φ⁻¹(1 − (1 − c)/2):
        centre = (p̂ + z²/2n) / (1 + z²/n)
        half   = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²)
    Unlike p̂ ± z·sqrt(p̂(1 − p̂)/n) it stays inside [0, 1] and does not shrink to a point at p̂ = 0 or 1.
    """
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """x̄ ± t_{1 − (1 − c)/2, n − 1} · s/√n, with s the sample standard deviation (n − 1 denominator)."""
    n = len(values)
    mean = statistics.fmean(values)
    half = float(t.ppf(1 - (1 - confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def two_proportion_z_test(successes_a: int, n_a: int, successes_b: int, n_b: int) -> HypothesisTest:
    """H0: p_a = p_b, two-sided, b the treatment and a the control. Under H0 both arms share
        p̂ = (x_a + x_b) / (n_a + n_b),
        z = (x_b/n_b − x_a/n_a) / sqrt(p̂(1 − p̂)(1/n_a + 1/n_b)),   p = 2·(1 − Φ(|z|)).
    When p̂ is 0 or 1 the arms are identical: z = 0, p = 1.
    """
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return HypothesisTest("two-proportion z-test", 0.0, 1.0)
    z = (successes_b / n_b - successes_a / n_a) / se
    return HypothesisTest("two-proportion z-test", z, 2 * float(norm.sf(abs(z))))


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> HypothesisTest:
    """H0: μ_a = μ_b without assuming equal variances, two-sided, b the treatment and a the control.
        v_a = s_a²/n_a,  v_b = s_b²/n_b,  t = (x̄_b − x̄_a) / sqrt(v_a + v_b),
        ν = (v_a + v_b)² / (v_a²/(n_a − 1) + v_b²/(n_b − 1))       (Welch–Satterthwaite),
        p = 2·(1 − F_ν(|t|)),  F_ν the Student t CDF.   Needs n ≥ 2 in each arm.
    Both arms constant: t = 0 and p = 1 when the means agree, else t is infinite (None) and p = 0.
    """
    var_a = statistics.variance(a) / len(a)
    var_b = statistics.variance(b) / len(b)
    diff = statistics.fmean(b) - statistics.fmean(a)
    if var_a + var_b == 0:
        return HypothesisTest("welch t-test", None, 0.0) if diff else HypothesisTest("welch t-test", 0.0, 1.0)
    statistic = diff / math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return HypothesisTest("welch t-test", statistic, 2 * float(t.sf(abs(statistic), df)), df)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default). With x sorted, h = (n − 1)·q/100:
        P_q = x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋ + 1] − x[⌊h⌋])
    """
    ordered = sorted(values)
    h = (len(ordered) - 1) * q / 100
    low = math.floor(h)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (h - low) * (ordered[high] - ordered[low])
