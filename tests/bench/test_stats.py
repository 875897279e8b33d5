"""Percentiles and summaries (bench.stats): numpy's linear method, edge cases included."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.stats import (
    Summary,
    gaps,
    median,
    median_or_none,
    percentile,
    percentile_of_sorted,
    summarize,
)

finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


def test_percentile_of_one_value_is_that_value() -> None:
    """A one-element sample has that element as every percentile."""
    assert [percentile([7.5], q) for q in (0, 1, 50, 99, 100)] == [7.5] * 5


def test_percentile_interpolates_linearly_between_ranks() -> None:
    """p50 of an even sample is the mean of the middle two; p90 of 1..10 is 9.1 (numpy)."""
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile(range(1, 11), 90) == pytest.approx(9.1)
    assert percentile(range(1, 101), 99) == pytest.approx(99.01)


def test_percentile_ends_are_min_and_max() -> None:
    """p0 is the minimum and p100 the maximum, whatever the order of the input."""
    values = [5.0, -2.0, 9.0, 3.0]
    assert percentile(values, 0) == -2.0
    assert percentile(values, 100) == 9.0


def test_percentile_of_empty_sample_raises() -> None:
    """An empty sample has no percentile: ValueError, not a misleading 0."""
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="empty"):
        median([])


@pytest.mark.parametrize("q", [-0.1, 100.5, math.nan])
def test_percentile_outside_0_100_raises(q: float) -> None:
    """A percentile outside [0, 100] (or NaN) is refused."""
    with pytest.raises(ValueError, match="outside"):
        percentile_of_sorted([1.0, 2.0], q)


def test_summarize_empty_gives_none_figures() -> None:
    """Summarizing nothing gives n=0 and None everywhere (a report prints a dash)."""
    assert summarize([]) == Summary(0)
    assert summarize([]).as_dict()["p99"] is None


def test_summarize_known_sample() -> None:
    """The summary of 1..100 has the numpy percentiles, the mean, the min and the max."""
    summary = summarize(float(v) for v in range(100, 0, -1))
    assert summary.n == 100
    assert summary.min == 1.0
    assert summary.max == 100.0
    assert summary.mean == 50.5
    assert summary.p50 == pytest.approx(50.5)
    assert summary.p90 == pytest.approx(90.1)
    assert summary.p99 == pytest.approx(99.01)


def test_summarize_rejects_nan() -> None:
    """NaN does not sort, so a sample holding one is refused."""
    with pytest.raises(ValueError, match="NaN"):
        summarize([1.0, math.nan])


def test_scaled_converts_every_figure() -> None:
    """scaled() converts units (ns to ms) and keeps None as None."""
    scaled = summarize([1e6, 3e6]).scaled(1e-6).as_dict()
    assert scaled == pytest.approx(
        {"n": 2, "mean": 2.0, "min": 1.0, "p50": 2.0, "p90": 2.8, "p99": 2.98, "max": 3.0}
    )
    assert Summary(0).scaled(1e-6) == Summary(0)


def test_median_or_none_skips_missing_values() -> None:
    """Repeats where a figure is unknown are left out; all unknown gives None."""
    assert median_or_none([None, 3.0, 1.0, None, 2.0]) == 2.0
    assert median_or_none([None, None]) is None


def test_gaps_of_receipt_times() -> None:
    """Gaps are the differences of consecutive times; fewer than two times give none."""
    assert gaps([10, 15, 15, 40]) == [5, 0, 25]
    assert gaps([10]) == []
    assert gaps([]) == []


@settings(max_examples=200, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=50), q1=st.floats(0, 100), q2=st.floats(0, 100))
def test_percentile_is_monotonic_and_bounded(values: list[float], q1: float, q2: float) -> None:
    """Any percentile lies within [min, max], and a larger q never gives a smaller value."""
    low, high = sorted((q1, q2))
    a, b = percentile(values, low), percentile(values, high)
    assert min(values) <= a <= max(values)
    assert a <= b + 1e-6 * max(1.0, abs(b))


@settings(max_examples=200, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=51))
def test_p50_agrees_with_statistics_median(values: list[float]) -> None:
    """p50 is the statistics module's median (same convention for even sizes)."""
    assert percentile(values, 50) == pytest.approx(statistics.median(values), rel=1e-9, abs=1e-6)
