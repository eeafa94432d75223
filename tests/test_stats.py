"""mgr.stats against scipy: t quantiles, one-sample CIs, paired and Welch differences, paired ratios."""

import math

import numpy as np
import pytest
from scipy import stats as sp

from mgr.stats import describe, describe_ratio, fmt_ci, paired_difference, paired_ratio, t_quantile, welch_difference


@pytest.mark.parametrize("df", [1, 2, 2.5, 3, 4, 7.3, 10, 29, 200])
@pytest.mark.parametrize("p", [0.975, 0.95, 0.6, 0.025, 0.999])
def test_t_quantile_matches_scipy(df, p):
    assert t_quantile(p, df) == pytest.approx(sp.t.ppf(p, df), rel=1e-8, abs=1e-10)


def test_describe_ci_matches_scipy():
    x = [1.0, 2.5, 2.0, 4.0, 3.1]
    d = describe(x)
    lo, hi = sp.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sp.sem(x))
    assert d["n"] == 5 and d["mean"] == pytest.approx(np.mean(x)) and d["std"] == pytest.approx(np.std(x, ddof=1))
    assert d["ci95"] == pytest.approx([lo, hi], rel=1e-9)


def test_single_value_has_no_ci():
    assert describe([3.0]) == {"n": 1, "mean": 3.0, "std": 0.0, "ci95": None, "min": 3.0, "max": 3.0}
    assert fmt_ci(describe([3.0])) == "3 (n=1)"


def test_paired_uses_the_differences():
    a = np.array([10.0, 11.0, 12.0, 13.0])
    b = a + np.array([0.5, 0.6, 0.4, 0.55])  # a large spread between seeds, a consistent shift within them
    paired = paired_difference(a, b)
    res = sp.ttest_rel(b, a)
    ci = res.confidence_interval(0.95)
    assert paired["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert paired["significant"]
    welch = welch_difference(a, b)  # the same samples unpaired: the seed spread swamps the shift
    ci = sp.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert welch["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert welch["df"] == pytest.approx(sp.ttest_ind(b, a, equal_var=False).df)
    assert not welch["significant"]


def test_paired_ratio_is_a_geometric_mean_with_a_log_ci():
    base, var = np.array([2.0, 4.0, 3.0]), np.array([1.0, 2.1, 1.4])
    r = paired_ratio(base, var)
    logs = np.log(base / var)
    lo, hi = sp.t.interval(0.95, 2, loc=logs.mean(), scale=sp.sem(logs))
    assert r["mean"] == pytest.approx(math.exp(logs.mean()))
    assert r["ci95"] == pytest.approx([math.exp(lo), math.exp(hi)])
    assert r["significant"] and r["ci95"][0] > 1


def test_no_significant_difference_when_the_ci_spans_zero():
    d = paired_difference([1.0, 2.0, 3.0], [1.1, 1.9, 3.05])
    assert d["ci95"][0] < 0 < d["ci95"][1] and not d["significant"]


def test_speedups_over_seeds_are_geometric():
    r = describe_ratio([1.2, 0.8, 3.0])
    logs = np.log([1.2, 0.8, 3.0])
    lo, hi = sp.t.interval(0.95, 2, loc=logs.mean(), scale=sp.sem(logs))
    assert r["mean"] == pytest.approx(math.exp(logs.mean()))
    assert r["ci95"] == pytest.approx([math.exp(lo), math.exp(hi)]) and r["ci95"][0] > 0
    assert describe_ratio([-1.0, 2.0])["mean"] == 0.5  # not all positive: the plain mean
