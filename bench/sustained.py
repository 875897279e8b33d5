"""Sustained streams: judge one concurrency level, and search for the highest (sans-IO).

Theory of operation
-------------------
The public gateway benchmarks report how many concurrent streams a gateway
*sustains*: streams of 64 content deltas 20 ms apart (a fast model's pace),
the concurrency doubled from 1 until a level fails. A level is sustained
when every frame of every stream arrives and no gap between two frames of
one stream exceeds 40 ms, i.e. no client ever waits more than two frame
intervals for the next delta. The highest sustained level is the figure;
a failure at level 1 gives 0.

:func:`judge_level` decides one level from the stream records of its run;
it needs no timing beyond what the records hold (the receipt time of each
stamp). Time to first token is not a gap: the wait for the first frame
(stream setup, the emulator's first delay) is left out, as it is in the
definition. The gap is measured between *receipts* of consecutive frames
of one stream, what a client sees; two frames that arrive in one read have
a gap of 0.

:class:`LevelSearch` walks the levels in order and stops at the first one
that fails (or after the last): ``bench overhead`` runs one search per mode
(direct, and each relay) side by side, level by level, so that the modes of
a level share one emulator process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from bench.stats import gaps

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bench.readers import StreamRecord

_NS_PER_MS = 1e-6


@dataclass(frozen=True, slots=True)
class LevelResult:
    """How one concurrency level went in one mode.

    Attributes:
        streams: the level (concurrent streams).
        sustained: every frame arrived, no stream failed, no gap over the limit.
        streams_failed: streams that ended with an error (or never completed).
        frames_lost: frames expected minus distinct frames received.
        max_gap_ms: the largest gap between two receipts of one stream, or
            None if no stream delivered two frames.
        max_send_gap_ms: the same between the emulator's stamps (its own
            hiccups, which no relay can hide).
        reason: why the level failed ("" when sustained).
        errors: failed streams by error kind.
        cpu_pct: the measured relay's (direct: the emulator's) busy share of
            one core during the run, when known.
    """

    streams: int
    sustained: bool
    streams_failed: int
    frames_lost: int
    max_gap_ms: float | None
    max_send_gap_ms: float | None
    reason: str = ""
    errors: dict[str, int] = field(default_factory=dict)
    cpu_pct: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping of every field."""
        return asdict(self)


def judge_level(
    records: Sequence[StreamRecord],
    *,
    frames_per_stream: int,
    max_gap_ms: float,
    cpu_pct: float | None = None,
) -> LevelResult:
    """Whether one level was sustained, from the records of its streams.

    Args:
        records: one per stream of the level.
        frames_per_stream: stamped frames each stream must deliver.
        max_gap_ms: the largest allowed gap between two frames of one stream.
        cpu_pct: recorded as is (see :class:`LevelResult`).

    Returns:
        The :class:`LevelResult`; ``reason`` names the first rule broken, in
        the order: failed streams, lost frames, the largest gap.
    """
    errors: dict[str, int] = {}
    lost = 0
    worst_gap: int | None = None
    worst_send_gap: int | None = None
    for record in records:
        if record.error is not None:
            errors[record.error] = errors.get(record.error, 0) + 1
        elif not record.done:
            errors["unfinished"] = errors.get("unfinished", 0) + 1
        lost += max(0, frames_per_stream - len(set(record.stamps)))
        if len(record.stamp_ns) > 1:
            gap = max(gaps(record.stamp_ns))
            worst_gap = gap if worst_gap is None else max(worst_gap, gap)
            send_gap = max(gaps(record.stamps))
            worst_send_gap = send_gap if worst_send_gap is None else max(worst_send_gap, send_gap)
    failed = sum(errors.values())
    gap_ms = None if worst_gap is None else worst_gap * _NS_PER_MS
    send_gap_ms = None if worst_send_gap is None else worst_send_gap * _NS_PER_MS
    if failed:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(errors.items()))
        reason = f"{failed} of {len(records)} streams failed ({kinds})"
    elif lost:
        reason = f"{lost} frames lost"
    elif gap_ms is not None and gap_ms > max_gap_ms:
        reason = f"a gap of {gap_ms:.1f} ms (limit {max_gap_ms:g} ms)"
    else:
        reason = ""
    return LevelResult(
        streams=len(records),
        sustained=not reason,
        streams_failed=failed,
        frames_lost=lost,
        max_gap_ms=gap_ms,
        max_send_gap_ms=send_gap_ms,
        reason=reason,
        errors=errors,
        cpu_pct=cpu_pct,
    )


class LevelSearch:
    """The levels of one mode, tried in order until one fails.

    Args:
        levels: the concurrency levels, ascending (1, 2, 4, ...).

    Attributes:
        results: one :class:`LevelResult` per level tried, in order.
    """

    def __init__(self, levels: Sequence[int]) -> None:
        self._levels = tuple(levels)
        self.results: list[LevelResult] = []
        self._aborted = ""

    @property
    def next_level(self) -> int | None:
        """The level to try next; None once a level failed or every level was tried."""
        if self._aborted or (self.results and not self.results[-1].sustained):
            return None
        if len(self.results) >= len(self._levels):
            return None
        return self._levels[len(self.results)]

    def record(self, result: LevelResult) -> None:
        """Add the outcome of :attr:`next_level`.

        Raises:
            ValueError: the search is over, or ``result`` is for another level.
        """
        expected = self.next_level
        if expected is None or result.streams != expected:
            raise ValueError(f"level {result.streams} recorded where {expected} was due")
        self.results.append(result)

    def abort(self, reason: str) -> None:
        """Stop the search without a result for the current level (the harness failed)."""
        self._aborted = reason

    @property
    def sustained(self) -> int:
        """The highest level sustained before the first failure; 0 if level 1 failed."""
        best = 0
        for result in self.results:
            if not result.sustained:
                break
            best = result.streams
        return best

    @property
    def capped(self) -> bool:
        """Every level was sustained: the figure is at least the last level, not a limit."""
        return len(self.results) == len(self._levels) and all(r.sustained for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: the figure, whether it hit the cap, every level tried.

        An aborted search has no figure (``sustained`` is None): the harness,
        not the level, ended it.
        """
        failed = next((r for r in self.results if not r.sustained), None)
        return {
            "sustained": None if self._aborted else self.sustained,
            "capped": self.capped,
            "failed_level": None if failed is None else failed.streams,
            "reason": self._aborted or ("" if failed is None else failed.reason),
            "aborted": bool(self._aborted),
            "levels": [r.as_dict() for r in self.results],
        }
