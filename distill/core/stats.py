"""Confidence intervals over seeds, and whether two settings are distinguishable.

    t          mean ± t_{0.975, n-1} · s / √n      (Student's t; s the sample standard deviation, n ≥ 2)
    bootstrap  the 2.5th and 97.5th percentiles of the means of B resamples of the n values, drawn
               with replacement (percentile bootstrap, fixed seed; too narrow for n < ~10: it cannot
               see variance the few values did not show, so `t` is the default)

Two settings run on the same seeds are compared on their per-seed differences (paired: the seed fixes
the student's init and data order, so the pairing removes that variance): distinguishable when the
95% interval of the mean difference excludes 0 (with `t`, the paired t-test at p < 0.05). Settings
without common seeds fall back to Welch's unequal-variance t-test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

INTERVALS = ("t", "bootstrap")
LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A mean and its 95% interval (NaN bounds when one value cannot give one)."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def interval(values, method: str = "t", *, seed: int = 0) -> Interval:
    """The mean of `values` (NaN and None dropped) with its 95% interval by `method` (t | bootstrap)."""
    if method not in INTERVALS:
        raise ValueError(f"interval method {method!r}: use one of {INTERVALS}")
    array = np.asarray([float(v) for v in values if v is not None and not math.isnan(float(v))], dtype=np.float64)
    n = len(array)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, method)
    mean = float(array.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, method)
    if method == "t":
        half = float(scipy_stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * float(array.std(ddof=1)) / math.sqrt(n)
        return Interval(mean, mean - half, mean + half, n, method)
    generator = np.random.default_rng(seed)
    means = array[generator.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return Interval(mean, float(low), float(high), n, method)


@dataclass(frozen=True)
class Comparison:
    """Whether setting A differs from setting B: the interval of mean(A - B) and, for t, a p-value."""

    difference: Interval
    p_value: float  # NaN for the bootstrap
    test: str  # "paired t", "paired bootstrap", "Welch t", or "" when there are too few values

    @property
    def distinguishable(self) -> bool:
        low, high = self.difference.low, self.difference.high
        if not math.isnan(self.p_value):
            return self.p_value < 1 - LEVEL
        return not math.isnan(low) and (low > 0 or high < 0)


def compare(a: dict, b: dict, method: str = "t", *, seed: int = 0) -> Comparison:
    """A vs B, each {seed: value}: paired over their common seeds (at least 2), else Welch's t-test."""
    def clean(values: dict) -> dict:
        return {k: float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}

    a, b = clean(a), clean(b)
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        differences = [a[k] - b[k] for k in common]
        spread = interval(differences, method, seed=seed)
        if method == "bootstrap":
            return Comparison(spread, math.nan, "paired bootstrap")
        scale = max(1.0, float(np.max(np.abs(differences))))
        if float(np.std(differences)) <= 1e-12 * scale:  # every seed differs by the same amount: nothing to test against
            p = 0.0 if differences[0] != 0 else 1.0
        else:
            p = float(scipy_stats.ttest_rel([a[k] for k in common], [b[k] for k in common]).pvalue)
        return Comparison(spread, p, "paired t")
    if len(a) >= 2 and len(b) >= 2:
        first, second = np.asarray(list(a.values())), np.asarray(list(b.values()))
        result = scipy_stats.ttest_ind(first, second, equal_var=False)
        df = float(result.df)
        half = float(scipy_stats.t.ppf(0.5 + LEVEL / 2, df)) * math.sqrt(first.var(ddof=1) / len(first)
                                                                         + second.var(ddof=1) / len(second))
        mean = float(first.mean() - second.mean())
        return Comparison(Interval(mean, mean - half, mean + half, min(len(a), len(b)), "t"),
                          float(result.pvalue), "Welch t")
    mean = (np.mean(list(a.values())) - np.mean(list(b.values()))) if a and b else math.nan
    return Comparison(Interval(float(mean), math.nan, math.nan, min(len(a), len(b)), method), math.nan, "")
