"""Confidence intervals over seeds and the best-vs-runner-up test (core.stats), against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from distill.core import stats


def test_t_interval_of_one_two_three_by_hand():
    # mean 2, s = 1, n = 3: t_{0.975, 2} = 4.302653 (tables) -> half-width 4.302653 / sqrt(3) = 2.484138
    spread = stats.interval([1.0, 2.0, 3.0], "t")
    assert spread.mean == pytest.approx(2.0)
    assert spread.low == pytest.approx(2.0 - 2.484138, abs=1e-6)
    assert spread.high == pytest.approx(2.0 + 2.484138, abs=1e-6)
    assert spread.n == 3


def test_t_interval_of_two_values_uses_twelve_point_seven():
    # n = 2: t_{0.975, 1} = 12.7062; s = |a - b| / sqrt(2), so the half-width is 12.7062 * |a - b| / 2
    spread = stats.interval([0.5, 0.7], "t")
    assert spread.half_width == pytest.approx(12.7062 * 0.2 / 2, rel=1e-5)


def test_one_value_has_no_interval_and_missing_values_are_dropped():
    spread = stats.interval([0.3, None, float("nan")])
    assert spread.mean == pytest.approx(0.3) and spread.n == 1
    assert math.isnan(spread.low) and math.isnan(spread.high)
    assert math.isnan(stats.interval([]).mean)


def test_bootstrap_is_seeded_inside_the_range_and_narrower_than_t_for_few_values():
    values = [0.2, 0.5, 0.4, 0.9]
    first, again = stats.interval(values, "bootstrap"), stats.interval(values, "bootstrap")
    assert (first.low, first.high) == (again.low, again.high)
    assert min(values) <= first.low < np.mean(values) < first.high <= max(values)
    t = stats.interval(values, "t")
    assert t.low < first.low and first.high < t.high  # the percentile bootstrap cannot see beyond the values
    constant = stats.interval([1.0, 1.0, 1.0], "bootstrap")
    assert constant.low == constant.high == 1.0


def test_paired_comparison_by_hand():
    # per-seed differences [1, 1.5, 0.5]: mean 1, s = 0.5, t = 1 / (0.5 / sqrt 3) = 3.4641 on 2 df;
    # the t cdf on 2 df is 1/2 + t / (2 sqrt(2 + t^2)) -> p = 2 (1/2 - 3.4641 / (2 sqrt 14)) = 0.07418
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.5, 2: 2.5}
    result = stats.compare(a, b, "t")
    assert result.test == "paired t"
    assert result.difference.mean == pytest.approx(1.0)
    assert result.difference.half_width == pytest.approx(4.302653 * 0.5 / math.sqrt(3), abs=1e-6)
    assert result.p_value == pytest.approx(2 * (0.5 - 3.4641016 / (2 * math.sqrt(14))), abs=1e-6)
    assert not result.distinguishable
    # the same gap on every seed is distinguishable however small it is
    assert stats.compare({0: 1.0, 1: 2.0}, {0: 0.9, 1: 1.9}).distinguishable


def test_unpaired_settings_use_welch():
    a, b = {0: 1.0, 1: 1.2, 2: 1.1}, {5: 2.0, 6: 2.1, 7: 2.3}
    result = stats.compare(a, b, "t")
    assert result.test == "Welch t" and result.distinguishable
    assert result.difference.mean == pytest.approx(1.1 - 6.4 / 3)
    assert result.difference.high < 0
