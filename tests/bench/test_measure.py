"""From records to figures, repeats to medians, figures to verdicts (bench.measure)."""

from __future__ import annotations

import pytest

from bench.measure import (
    Figures,
    added,
    combine_runs,
    floor_warnings,
    judge,
    merge_errors,
    run_figures,
)
from bench.readers import StreamRecord

MS = 1_000_000


def stamped(stamps: list[int], receipts: list[int], start: int = 0) -> StreamRecord:
    """A finished record with these stamps received at these times."""
    record = StreamRecord(start_ns=start, stamps=list(stamps), stamp_ns=list(receipts))
    record.done = True
    return record


def test_frames_lost_counts_missing_stamps() -> None:
    """Expected minus distinct stamps received is frames lost; duplicates are counted apart."""
    records = [
        stamped([1 * MS, 2 * MS, 3 * MS], [2 * MS, 3 * MS, 4 * MS]),
        stamped([5 * MS, 5 * MS], [6 * MS, 6 * MS]),  # one frame delivered twice, two missing
    ]
    figures, errors = run_figures(records, frames_per_stream=3, wall_s=1.0)
    assert errors == {}
    assert figures["frames_expected"] == 6
    assert figures["frames_received"] == 4
    assert figures["frames_lost"] == 2
    assert figures["duplicates"] == 1


def test_latency_ttft_gap_and_rate() -> None:
    """Latency is receipt minus stamp, TTFT start to first stamp; gaps and rate from receipts."""
    record = stamped([10 * MS, 20 * MS, 30 * MS], [11 * MS, 22 * MS, 33 * MS], start=5 * MS)
    figures, _ = run_figures([record], frames_per_stream=3, wall_s=0.1)
    assert figures["latency_ms_p50"] == pytest.approx(2.0)
    assert figures["latency_ms_max"] == pytest.approx(3.0)
    assert figures["ttft_ms_p50"] == pytest.approx(6.0)
    assert figures["max_gap_ms"] == pytest.approx(11.0)
    assert figures["max_send_gap_ms"] == pytest.approx(10.0)
    assert figures["chunks_per_s"] == pytest.approx(3 / 0.022)
    assert figures["frames_lost"] == 0


def test_failed_streams_count_as_errors_not_latency() -> None:
    """A failed stream's stamps count as received, but its timings stay out of latency."""
    good = stamped([1 * MS], [2 * MS])
    bad = stamped([1 * MS], [900 * MS])
    bad.fail("cut_off", "dropped")
    figures, errors = run_figures([good, bad], frames_per_stream=2, wall_s=1.0)
    assert errors == {"cut_off": 1}
    assert figures["streams_failed"] == 1
    assert figures["latency_ms_max"] == pytest.approx(1.0)
    assert figures["frames_lost"] == 2


def test_out_of_order_stamps_are_counted() -> None:
    """A stamp smaller than its predecessor in one stream is out of order."""
    figures, _ = run_figures([stamped([3, 1, 2], [10, 11, 12])], frames_per_stream=3, wall_s=1)
    assert figures["out_of_order"] == 1


def test_no_stamps_gives_unknown_figures() -> None:
    """Without any stamp the latency figures are None, and every frame is lost."""
    figures, _ = run_figures([StreamRecord()], frames_per_stream=4, wall_s=1)
    assert figures["latency_ms_p50"] is None
    assert figures["chunks_per_s"] is None
    assert figures["frames_lost"] == 4


def test_combine_runs_sums_counts_and_takes_medians() -> None:
    """Counts add up over repeats; other figures are medians; unknown values are skipped."""
    runs: list[Figures] = [
        {"frames_lost": 1.0, "streams": 5.0, "latency_ms_p50": 1.0, "chunks_per_s": None},
        {"frames_lost": 0.0, "streams": 5.0, "latency_ms_p50": 5.0, "chunks_per_s": 10.0},
        {"frames_lost": 2.0, "streams": 5.0, "latency_ms_p50": 2.0, "chunks_per_s": None},
    ]
    combined = combine_runs(runs)
    assert combined == {
        "frames_lost": 3.0,
        "streams": 5.0,
        "latency_ms_p50": 2.0,
        "chunks_per_s": 10.0,
    }


def test_merge_errors_adds_kinds() -> None:
    """Errors by kind of several runs add up."""
    assert merge_errors([{"timeout": 1}, {"timeout": 2, "cut_off": 1}]) == {
        "timeout": 3,
        "cut_off": 1,
    }


def test_added_difference_and_ratio() -> None:
    """added() is relay minus direct and relay over direct; unknown gives None."""
    assert added({"x": 2.0}, {"x": 3.0}, "x") == (1.0, 1.5)
    assert added({"x": 0.0}, {"x": 3.0}, "x") == (3.0, None)
    assert added({}, {"x": 3.0}, "x") == (None, None)


def test_judge_pass_miss_and_unknown() -> None:
    """Targets compare 'added' or the relay figure with the limit; unknown is n/a."""
    direct: Figures = {"ttft_ms_p50": 1.0, "latency_ms_p50": 0.2, "latency_ms_p99": None}
    relay: Figures = {"ttft_ms_p50": 1.3, "latency_ms_p50": 0.5, "latency_ms_p99": 0.9}
    results = {v.target.figure: v.result for v in judge("latency", direct, relay)}
    assert results == {"ttft_ms_p50": "PASS", "latency_ms_p50": "MISS", "latency_ms_p99": "n/a"}
    lost = judge("concurrency-500", {}, {"frames_lost": 1.0, "max_gap_ms": 25.0})
    assert [v.result for v in lost] == ["MISS", "PASS"]
    assert judge("no-such-scenario", {}, {}) == []


def test_floor_warnings() -> None:
    """Latency within 20% of direct, throughput within 20%, and a saturated harness warn."""
    direct: Figures = {"latency_ms_p50": 1.0, "chunks_per_s": 1000.0}
    relay: Figures = {"latency_ms_p50": 1.1, "chunks_per_s": 900.0, "emulator_cpu_pct": 97.0}
    latency = floor_warnings("latency", "latency", direct, relay)
    assert any(w.startswith("latency_ms_p50") for w in latency)
    assert not any("chunks_per_s" in w for w in latency)
    throughput = floor_warnings("throughput-1", "throughput", direct, relay)
    assert any("harness (emulator + client), not the relay, is the limit" in w for w in throughput)
    assert any("emulator used 97%" in w for w in throughput)
    assert floor_warnings("latency", "latency", direct, {"latency_ms_p50": 2.0}) == []


def test_floor_warning_when_the_harness_alone_misses_a_target() -> None:
    """A relay-basis target that the direct figures already miss is flagged as unjudgeable."""
    direct: Figures = {"max_gap_ms": 60.0, "frames_lost": 0.0}
    relay: Figures = {"max_gap_ms": 90.0, "frames_lost": 0.0}
    warnings = floor_warnings("concurrency-500", "concurrency", direct, relay)
    assert any("harness alone (direct) has 60" in w for w in warnings)
    assert not any("frames_lost" in w for w in warnings)
