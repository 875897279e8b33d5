"""From stream records to figures, repeats to medians, figures to verdicts (sans-IO).

Theory of operation
-------------------
One *run* is one scenario in one mode (direct or relay) once. Its records
become a flat mapping of named figures (:func:`run_figures`); flat, so that
repeats combine the same way whatever the scenario (:func:`combine_runs`:
counts are summed, everything else is the median across repeats), and so
that targets and warnings name figures as plain strings.

Per-frame latency is ``receipt - stamp``: the emulator stamps a frame with
``time.monotonic_ns()`` as it writes it, the client reads the clock right
after the read that delivered it. Direct mode gives the floor (loopback,
the emulator's scheduling, our parsing); the relay's *added* latency is the
relay figure minus the direct one. Percentiles do not subtract, so "added
p99" is the difference of the two p99s, not a percentile of differences.

Only streams without an error count in latency figures; every stream counts
in frame accounting: ``frames_lost = expected - distinct stamps received``.
A stamp seen twice is a ``duplicate``, a stamp smaller than its
predecessor in the same stream is ``out_of_order``; both should be 0.

The largest gap is between two receipts of one stream (what a client
sees); ``max_send_gap_ms`` is the largest gap between two stamps of one
stream, i.e. the emulator's own hiccups (scheduling, garbage collection),
which no relay can hide.

Throughput (``chunks_per_s``) is frames received over the window from the
first receipt to the last, across all streams of the run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from bench.stats import gaps, median_or_none, summarize

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from bench.readers import StreamRecord

Figures = dict[str, float | None]

#: Figures that are counts: summed over repeats instead of taking the median.
COUNT_FIGURES = frozenset(
    {
        "streams_failed",
        "frames_expected",
        "frames_received",
        "frames_lost",
        "duplicates",
        "out_of_order",
    }
)
#: Per scenario group, the latency figures (lower is better) worth comparing
#: with the floor: TTFT of the paced scenarios holds the emulator's first
#: delay, and their gaps its pacing, so those are left out.
FLOOR_FIGURES: dict[str, tuple[str, ...]] = {
    "latency": ("ttft_ms_p50", "latency_ms_p50", "latency_ms_p99"),
    "throughput": (),
    "concurrency": ("latency_ms_p50", "latency_ms_p99"),
    "idle": (),
    "burst": ("ttft_ms_p50",),
}
#: Figures whose direct value measures something else than a floor of the
#: relay's (direct RSS is the emulator's; direct mode has no relay CPU).
NOT_A_FLOOR = frozenset({"rss_kib_per_stream", "cpu_us_per_chunk"})
#: A relay figure this close to the direct floor is not the relay's to claim.
FLOOR_MARGIN = 0.2
#: Busy share of one core above which a harness process is called saturated.
SATURATED_PCT = 90.0
_NS_PER_MS = 1e-6


def run_figures(
    records: Sequence[StreamRecord], *, frames_per_stream: int, wall_s: float
) -> tuple[Figures, dict[str, int]]:
    """The figures of one run and its errors by kind.

    Args:
        records: one per stream of the run.
        frames_per_stream: stamped frames each stream should deliver.
        wall_s: the run's wall-clock time.

    Returns:
        ``(figures, errors)``; see the module docstring for the figures.
    """
    errors: dict[str, int] = {}
    ttft: list[float] = []
    latency: list[float] = []
    receipt_gaps: list[int] = []  # the largest of each stream
    send_gaps: list[int] = []
    received = duplicates = out_of_order = 0
    first_ns: int | None = None
    last_ns: int | None = None
    for record in records:
        if record.error is not None:
            errors[record.error] = errors.get(record.error, 0) + 1
        distinct = set(record.stamps)
        received += len(distinct)
        duplicates += len(record.stamps) - len(distinct)
        out_of_order += sum(1 for a, b in itertools.pairwise(record.stamps) if b < a)
        if record.stamp_ns:
            low, high = record.stamp_ns[0], record.stamp_ns[-1]
            first_ns = low if first_ns is None else min(first_ns, low)
            last_ns = high if last_ns is None else max(last_ns, high)
        if record.error is not None or not record.stamp_ns:
            continue
        ttft.append((record.stamp_ns[0] - record.start_ns) * _NS_PER_MS)
        pairs = zip(record.stamps, record.stamp_ns, strict=True)
        latency.extend((got - sent) * _NS_PER_MS for sent, got in pairs)
        if len(record.stamp_ns) > 1:
            receipt_gaps.append(max(gaps(record.stamp_ns)))
            send_gaps.append(max(gaps(record.stamps)))
    expected = frames_per_stream * len(records)
    ttft_summary = summarize(ttft)
    latency_summary = summarize(latency)
    window_s = (last_ns - first_ns) / 1e9 if first_ns is not None and last_ns is not None else 0.0
    failed = sum(errors.values())
    figures: Figures = {
        "streams": float(len(records)),
        "streams_ok": float(len(records) - failed),
        "streams_failed": float(failed),
        "frames_expected": float(expected),
        "frames_received": float(received),
        "frames_lost": float(max(0, expected - received)),
        "duplicates": float(duplicates),
        "out_of_order": float(out_of_order),
        "ttft_ms_p50": ttft_summary.p50,
        "ttft_ms_p99": ttft_summary.p99,
        "latency_ms_p50": latency_summary.p50,
        "latency_ms_p90": latency_summary.p90,
        "latency_ms_p99": latency_summary.p99,
        "latency_ms_max": latency_summary.max,
        "max_gap_ms": max(receipt_gaps) * _NS_PER_MS if receipt_gaps else None,
        "max_send_gap_ms": max(send_gaps) * _NS_PER_MS if send_gaps else None,
        "chunks_per_s": received / window_s if window_s > 0 else None,
        "wall_s": wall_s,
    }
    return figures, errors


def combine_runs(runs: Sequence[Figures]) -> Figures:
    """Repeats of one scenario and mode into one set of figures.

    Counts (:data:`COUNT_FIGURES`: frames and failures, so that one bad
    repeat shows) are summed; every other figure, the number of streams
    included, is the median of the repeats where it is known (``None`` if
    in none).
    """
    names: list[str] = []
    for run in runs:
        names.extend(name for name in run if name not in names)
    combined: Figures = {}
    for name in names:
        values = [run.get(name) for run in runs]
        if name in COUNT_FIGURES:
            combined[name] = float(sum(v for v in values if v is not None))
        else:
            combined[name] = median_or_none(values)
    return combined


def merge_errors(errors: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Errors by kind of several runs, added up."""
    total: dict[str, int] = {}
    for run in errors:
        for kind, count in run.items():
            total[kind] = total.get(kind, 0) + count
    return total


def added(direct: Figures, relay: Figures, name: str) -> tuple[float | None, float | None]:
    """``(relay - direct, relay / direct)`` for figure ``name``; None where unknown."""
    a, b = direct.get(name), relay.get(name)
    if a is None or b is None:
        return None, None
    return b - a, (b / a if a else None)


@dataclass(frozen=True, slots=True)
class Target:
    """A goal from the issue, printed beside the figure it judges.

    Attributes:
        scenario: the scenario key it applies to.
        figure: the figure's name.
        basis: compare the relay figure itself, or what it adds over direct.
        limit: the largest passing value.
        text: the goal as the report prints it.
    """

    scenario: str
    figure: str
    basis: Literal["relay", "added"]
    limit: float
    text: str


#: The issue's targets.
TARGETS = (
    Target("latency", "ttft_ms_p50", "added", 0.5, "added TTFT p50 <= 0.5 ms"),
    Target("latency", "latency_ms_p50", "added", 0.1, "added per-chunk latency p50 <= 0.1 ms"),
    Target("latency", "latency_ms_p99", "added", 0.3, "added per-chunk latency p99 <= 0.3 ms"),
    Target("throughput-16", "cpu_us_per_chunk", "relay", 15.0, "relay CPU per chunk <= 15 us"),
    Target("concurrency-200", "frames_lost", "relay", 0.0, "no frame lost"),
    Target("concurrency-200", "latency_ms_p99", "added", 5.0, "added per-chunk p99 <= 5 ms"),
    Target("concurrency-500", "frames_lost", "relay", 0.0, "no frame lost"),
    Target("concurrency-500", "max_gap_ms", "relay", 40.0, "no gap over 40 ms"),
    Target("idle", "rss_kib_per_stream", "relay", 20.0, "relay memory per open stream <= 20 KB"),
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A target and how the run fared: ``PASS``, ``MISS`` or ``n/a`` (figure unknown)."""

    target: Target
    value: float | None
    result: Literal["PASS", "MISS", "n/a"]


def judge(scenario: str, direct: Figures, relay: Figures) -> list[Verdict]:
    """The verdicts of every target of ``scenario``."""
    verdicts: list[Verdict] = []
    for target in TARGETS:
        if target.scenario != scenario:
            continue
        if target.basis == "added":
            value = added(direct, relay, target.figure)[0]
        else:
            value = relay.get(target.figure)
        if value is None:
            verdicts.append(Verdict(target, None, "n/a"))
        else:
            verdicts.append(Verdict(target, value, "PASS" if value <= target.limit else "MISS"))
    return verdicts


def floor_warnings(scenario: str, group: str, direct: Figures, relay: Figures) -> list[str]:
    """Warnings where the harness, not the relay, may decide a figure.

    Args:
        scenario: the scenario key (for its targets).
        group: the scenario group (its figures are in :data:`FLOOR_FIGURES`).
        direct: the direct figures.
        relay: the relay figures.

    Returns:
        One sentence per warning:

    - a latency figure of the relay within :data:`FLOOR_MARGIN` of the
      direct one: the added part is small next to the floor and noisy;
    - relay throughput at least 80% of direct: the emulator and the client,
      not the relay, are the limit;
    - a target on the relay figure that the direct figure already misses:
      the harness alone is over the limit (except :data:`NOT_A_FLOOR`);
    - the emulator or the client busy above :data:`SATURATED_PCT` of a core
      during the relay run.
    """
    warnings: list[str] = []
    for name in FLOOR_FIGURES.get(group, ()):
        a, b = direct.get(name), relay.get(name)
        if a is not None and b is not None and a > 0 and b <= a * (1 + FLOOR_MARGIN):
            warnings.append(
                f"{name}: relay {b:.3f} is within {FLOOR_MARGIN:.0%} of the direct floor"
                f" {a:.3f}; the harness, not the relay, dominates this figure"
            )
    a, b = direct.get("chunks_per_s"), relay.get("chunks_per_s")
    if group != "throughput":
        a = None
    if (
        group == "throughput"
        and a is not None
        and b is not None
        and a > 0
        and b >= a * (1 - FLOOR_MARGIN)
    ):
        warnings.append(
            f"chunks_per_s: relay {b:,.0f}/s is within {FLOOR_MARGIN:.0%} of direct {a:,.0f}/s:"
            " the harness (emulator + client), not the relay, is the limit"
        )
    for verdict in judge(scenario, direct, direct):
        target = verdict.target
        if target.figure in NOT_A_FLOOR:
            continue
        if target.basis == "relay" and verdict.result == "MISS" and verdict.value is not None:
            warnings.append(
                f"{target.figure}: the harness alone (direct) has {verdict.value:.3g}, over the"
                f" target's {target.limit:g}: no relay can meet '{target.text}' on this machine"
            )
    for who in ("emulator", "client"):
        busy = relay.get(f"{who}_cpu_pct")
        if busy is not None and busy >= SATURATED_PCT:
            warnings.append(
                f"the {who} used {busy:.0f}% of a core during the relay run:"
                " it may be the bottleneck"
            )
    return warnings
