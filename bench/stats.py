"""Percentiles and summaries: the arithmetic both benchmarks report with.

Theory of operation
-------------------
Latency tools disagree on what "p99" means for a finite sample. We follow
numpy's default (``method="linear"``), which vLLM's ``benchmark_serving``
and llmperf both report through: sort the sample, take the fractional rank
``q / 100 * (n - 1)`` and interpolate linearly between the two neighbours.
So p0 is the minimum, p100 the maximum, p50 of an even-sized sample is the
mean of the two middle values, and every percentile of a one-element sample
is that element. An empty sample has no percentiles: :func:`percentile`
raises, :func:`summarize` returns a :class:`Summary` whose figures are
``None`` (a report prints a dash), because "0 ms" would read as a fast result.

Everything here is pure and allocation-light: :func:`summarize` sorts once
and reads all percentiles from that one sorted copy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

#: The percentiles every figure is reported at (the issue: p50/p90/p99/max).
REPORTED_PERCENTILES = (50.0, 90.0, 99.0)


def _check_q(q: float) -> None:
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile {q!r} is outside [0, 100]")


def percentile_of_sorted(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of an already sorted, non-empty sample.

    Args:
        ordered: the sample, ascending.
        q: the percentile, 0 to 100 inclusive.

    Returns:
        The linearly interpolated value (numpy's default method).

    Raises:
        ValueError: ``ordered`` is empty or ``q`` is outside [0, 100].
    """
    _check_q(q)
    n = len(ordered)
    if n == 0:
        raise ValueError("no percentile of an empty sample")
    rank = q / 100.0 * (n - 1)
    low = math.floor(rank)
    high = min(low + 1, n - 1)
    fraction = rank - low
    lower = float(ordered[low])
    if fraction == 0.0 or high == low:
        return lower
    return lower + (float(ordered[high]) - lower) * fraction


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (any order).

    Raises:
        ValueError: no values, or ``q`` outside [0, 100].
    """
    return percentile_of_sorted(sorted(values), q)


def median(values: Iterable[float]) -> float:
    """The median (p50) of ``values``.

    Raises:
        ValueError: no values.
    """
    return percentile(values, 50.0)


def median_or_none(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not ``None``; ``None`` if there are none."""
    present = [v for v in values if v is not None]
    return median(present) if present else None


@dataclass(frozen=True, slots=True)
class Summary:
    """The distribution of one figure: count, mean, p50/p90/p99, min and max.

    Every figure is ``None`` when the sample was empty (``n == 0``).
    """

    n: int
    mean: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    def scaled(self, factor: float) -> Summary:
        """The same distribution in another unit (e.g. ns -> ms with ``1e-6``)."""

        def scale(value: float | None) -> float | None:
            return None if value is None else value * factor

        return Summary(
            self.n,
            scale(self.mean),
            scale(self.min),
            scale(self.p50),
            scale(self.p90),
            scale(self.p99),
            scale(self.max),
        )

    def as_dict(self) -> dict[str, float | int | None]:
        """A JSON-ready mapping of every field."""
        return {
            "n": self.n,
            "mean": self.mean,
            "min": self.min,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "max": self.max,
        }


def summarize(values: Iterable[float]) -> Summary:
    """Summarize a sample in one sort.

    Args:
        values: the sample; NaN values are not allowed (they do not sort).

    Returns:
        The :class:`Summary`; all figures ``None`` for an empty sample.

    Raises:
        ValueError: a value is NaN.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return Summary(0)
    if any(math.isnan(v) for v in ordered):
        raise ValueError("a sample with NaN has no percentiles")
    p50, p90, p99 = (percentile_of_sorted(ordered, q) for q in REPORTED_PERCENTILES)
    return Summary(
        n=n,
        mean=math.fsum(ordered) / n,
        min=float(ordered[0]),
        p50=p50,
        p90=p90,
        p99=p99,
        max=float(ordered[-1]),
    )


def gaps(times: Sequence[int]) -> list[int]:
    """Differences between consecutive receipt times (same unit as ``times``).

    Args:
        times: monotonic receipt times of one stream, in arrival order.

    Returns:
        ``len(times) - 1`` gaps; empty for fewer than two times.
    """
    return [b - a for a, b in itertools.pairwise(times)]
