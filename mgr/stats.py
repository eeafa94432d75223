"""Statistics over seeds: mean, std and a 95% Student-t confidence interval; paired and Welch differences.

Every claim over seeds goes through here, so a table, a compare and a report agree on what "significant" means: a
difference is significant when its 95% CI excludes zero (a ratio: when it excludes one). Student t quantiles are
computed here (no SciPy at run time): Newton's method on the t CDF (an incomplete beta function), checked against
scipy in the tests.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

LEVEL = 0.95


def _normal_quantile(p: float) -> float:
    """Acklam's rational approximation of the standard normal quantile (relative error < 1.2e-9)."""
    a = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
         -3.066479806614716e+01, 2.506628277459239e+00)
    b = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
         -1.328068155288572e+01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
         4.374664141464968e+00, 2.938163982698783e+00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)
    if p < 0.02425:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    if p > 1 - 0.02425:
        return -_normal_quantile(1 - p)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)


def _t_cdf(t: float, df: float) -> float:
    """Student t CDF through the regularised incomplete beta function (continued fraction, Numerical Recipes)."""
    if t == 0:
        return 0.5
    x = df / (df + t * t)
    a, b = df / 2, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))

    def betacf(a, b, x):
        qab, qap, qam = a + b, a + 1, a - 1
        c, d = 1.0, 1 - qab * x / qap
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        h = d
        for m in range(1, 300):
            m2 = 2 * m
            for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
                d = 1 + aa * d
                d = 1 / (d if abs(d) > 1e-300 else 1e-300)
                c = 1 + aa / c if abs(1 + aa / c) > 1e-300 else 1e-300
                h *= d * c
            if abs(d * c - 1) < 1e-15:
                break
        return h

    if x < (a + 1) / (a + b + 2):
        tail = front * betacf(a, b, x) / a
    else:
        tail = 1 - front * betacf(b, a, 1 - x) / b
    return 1 - tail / 2 if t > 0 else tail / 2


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (df may be fractional, as Welch's is): Newton on the
    CDF from the normal quantile."""
    if df <= 0 or not math.isfinite(df):
        return _normal_quantile(p)
    t = _normal_quantile(p)
    if df < 3:  # the normal start is far out in heavy tails; start from the exact df=1/df=2 quantiles
        t = math.tan(math.pi * (p - 0.5)) if df == 1 else (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    for _ in range(50):
        density = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
            * (1 + t * t / df) ** (-(df + 1) / 2)
        step = (_t_cdf(t, df) - p) / density
        t -= step
        if abs(step) < 1e-12 * max(1.0, abs(t)):
            break
    return t


def _clean(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64).reshape(-1)
    return arr[np.isfinite(arr)]


def describe(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (ddof 1), and the 95% Student-t CI of the mean; ci is null for n < 2."""
    arr = _clean(values)
    n = int(arr.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None, "min": None, "max": None}
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if n > 1 else 0.0
    ci = None
    if n > 1:
        half = t_quantile(0.5 + LEVEL / 2, n - 1) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"n": n, "mean": mean, "std": std, "ci95": ci, "min": float(arr.min()), "max": float(arr.max())}


def describe_ratio(values: Sequence[float]) -> dict[str, Any]:
    """Like ``describe`` for positive ratios (speedups): geometric mean, CI from the t interval of the logs, so it
    never dips below zero; ``std`` is that of the logs."""
    arr = _clean(values)
    if arr.size == 0 or np.any(arr <= 0):
        return describe(values)
    logs = describe(np.log(arr))
    return {**logs, "mean": math.exp(logs["mean"]), "min": float(arr.min()), "max": float(arr.max()),
            "ci95": None if logs["ci95"] is None else [math.exp(x) for x in logs["ci95"]], "geometric": True}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """b - a paired by position (same seed): the mean difference and its CI, significant when the CI excludes 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in size: {a.shape} vs {b.shape}")
    out = describe(b - a)
    return {**out, "test": "paired t", "significant": _excludes(out["ci95"], 0.0)}


def welch_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(b) - mean(a) for independent samples, Welch's t CI (Welch-Satterthwaite degrees of freedom)."""
    a, b = _clean(a), _clean(b)
    diff = float(b.mean() - a.mean()) if a.size and b.size else None
    out: dict[str, Any] = {"n": [int(a.size), int(b.size)], "mean": diff, "ci95": None, "df": None,
                           "test": "Welch t", "significant": False}
    if a.size < 2 or b.size < 2:
        return out
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        out.update(ci95=[diff, diff], df=float(a.size + b.size - 2), significant=diff != 0)
        return out
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = t_quantile(0.5 + LEVEL / 2, df) * se
    out.update(ci95=[diff - half, diff + half], df=float(df), significant=_excludes([diff - half, diff + half], 0))
    return out


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a/b per seed (a speedup when a and b are times of baseline and variant): mean of the log ratios and its
    CI, mapped back (a geometric mean), significant when the CI excludes 1."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = (a > 0) & (b > 0) & np.isfinite(a) & np.isfinite(b)
    logs = describe(np.log(a[ok] / b[ok]))
    if logs["mean"] is None:
        return {"n": 0, "mean": None, "ci95": None, "test": "paired t on log ratio", "significant": False}
    ci = None if logs["ci95"] is None else [math.exp(x) for x in logs["ci95"]]
    return {"n": logs["n"], "mean": math.exp(logs["mean"]), "ci95": ci, "test": "paired t on log ratio",
            "significant": _excludes(ci, 1.0)}


def _excludes(ci: list[float] | None, value: float) -> bool:
    return bool(ci is not None and (ci[0] > value or ci[1] < value))


def fmt_ci(stat: dict[str, Any], digits: int = 4, pct: bool = False) -> str:
    """'mean [lo, hi] (n=N)' with the same number format throughout; '—' without a mean."""
    if stat.get("mean") is None:
        return "—"
    scale, suffix = (100.0, "%") if pct else (1.0, "")

    def f(x):
        return f"{x * scale:+.{digits - 1}g}{suffix}" if pct else f"{x * scale:.{digits}g}"
    n = stat["n"] if not isinstance(stat["n"], list) else "+".join(map(str, stat["n"]))
    if stat.get("ci95") is None:
        return f"{f(stat['mean'])} (n={n})"
    lo, hi = stat["ci95"]
    return f"{f(stat['mean'])} [{f(lo)}, {f(hi)}] (n={n})"
