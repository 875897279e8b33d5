"""``bench overhead --provider glm``: the snapshot reader, the direct client, the long
scenario, a tiny real run, and the emulators' pacing and ``--no-record`` fixes."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from bench.__main__ import main
from bench.glm_direct import BOUNDARY_CHECK_CHARS, GlmDirect, GlmSnapshotReader
from bench.overhead import QuarterRecord, _CpuMark, quarter_figures, quarter_thresholds
from bench.readers import StreamRecord
from bench.scenarios import scenarios, select
from bench.upstreams import GLM, PROVIDERS, STEP, EmulatorParams
from protocol.errors import AuthError
from providers.glm.emulator import GlmBehavior, GlmEmulator, emulator_from_args
from providers.glm.emulator_script import PAUSE, ScriptSpec, SnapshotScript, snapshot_events
from providers.step.emulator import StepBehavior, StepEmulator, parse_args

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

CONVERSATION = "c0ffee" * 4  # 24 characters, as the site's


def counter_clock() -> Callable[[], int]:
    """A stamp clock that counts 1, 2, 3, ..."""
    ticks = itertools.count(1)
    return lambda: next(ticks)


def stamped_wire(frames: int, layout: str = "active") -> bytes:
    """The SSE body the GLM emulator sends in stamp mode, stamps 1..frames."""
    spec = ScriptSpec(CONVERSATION, "", stamp_frames=frames, layout=layout)  # type: ignore[arg-type]
    events = snapshot_events(spec, clock_ns=counter_clock())
    return b"".join(b"data: " + event + b"\n\n" for event in events)


def snapshot(text: str, status: str = "init", logic_id: str = "part-1") -> bytes:
    """One SSE event with a snapshot whose one text item holds ``text``."""
    item = {"type": "text", "status": "init", "text": text}
    part = {"logic_id": logic_id, "status": "init", "meta_data": {}, "content": [item]}
    body = {"conversation_id": CONVERSATION, "status": status, "last_error": {}, "parts": [part]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


FINAL = b'data: {"conversation_id":"%b","status":"finish","parts":[]}\n\n' % CONVERSATION.encode()


def read(
    wire: bytes, cuts: list[int] | None = None, *, complete: bool = True
) -> tuple[StreamRecord, GlmSnapshotReader]:
    """Feed ``wire`` split at ``cuts``; the read index + 1000 is the receipt time."""
    record = StreamRecord(start_ns=0)
    reader = GlmSnapshotReader(record, stamps=True)
    start = 0
    for index, cut in enumerate([*sorted(set(cuts or [])), len(wire)]):
        reader.feed(wire[start:cut], 1000 + index)
        start = cut
    reader.finish(complete=complete, now_ns=9000)
    return record, reader


# --- the snapshot reader (sans-IO) ---------------------------------------------------


def test_cumulative_snapshots_give_one_chunk_per_new_stamp() -> None:
    """Six stamped snapshots: one chunk each, stamps 1..6 once, the whole answer counted once,
    the finish snapshot completes the stream and names the conversation."""
    record, reader = read(stamped_wire(6))
    assert record.ok
    assert record.stamps == [1, 2, 3, 4, 5, 6]
    assert len(record.chunk_ns) == 6
    assert record.chars == len("".join(f"[ts:{n}]" for n in range(1, 7)))
    assert reader.conversation_id == CONVERSATION


def test_layout_that_repeats_finished_parts_counts_nothing_twice() -> None:
    """The cumulative layout repeats finished parts in every later event: no stamp twice."""
    record, _ = read(stamped_wire(5, layout="cumulative"))
    assert record.ok
    assert record.stamps == [1, 2, 3, 4, 5]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_any_split_of_the_body_gives_the_same_stamps(cuts: list[int]) -> None:
    """Snapshots cut anywhere across reads (inside JSON, inside a stamp) give the same result."""
    wire = stamped_wire(8)
    record, _ = read(wire, [cut % (len(wire) + 1) for cut in cuts])
    assert record.ok
    assert record.stamps == list(range(1, 9))


def test_snapshot_split_across_reads_is_timed_by_the_read_that_completed_it() -> None:
    """A snapshot whose second half arrives in the next read counts at that read's time."""
    first, second = snapshot("[ts:5]"), snapshot("[ts:5][ts:6]")
    wire = first + second + FINAL
    record, _ = read(wire, [len(first) + 10])
    assert record.ok
    assert record.stamps == [5, 6]
    assert record.stamp_ns == [1000, 1001]


def test_stamps_come_from_the_new_suffix_only() -> None:
    """Text before the boundary window is not scanned again: a stamp that appears there later
    is not counted, while the suffix's stamp is."""
    padding = "x" * (BOUNDARY_CHECK_CHARS + 10)
    wire = snapshot("[ts:1]" + padding) + snapshot("[ts:7]" + padding + "[ts:2]") + FINAL
    record, _ = read(wire)
    assert record.ok
    assert record.stamps == [1, 2]


@pytest.mark.parametrize(
    "second",
    ["[ts:9][ts:2]", "[ts:1", "[ts:2][ts:3]"],
    ids=["rewritten", "shorter", "replaced"],
)
def test_snapshot_that_does_not_extend_the_last_is_an_error(second: str) -> None:
    """A snapshot that rewrites, shortens or replaces the text is a bad_frame error (no
    exception); what came before it still counts and what comes after is ignored."""
    wire = snapshot("[ts:1]") + snapshot(second) + snapshot(second + "[ts:4]") + FINAL
    record, _ = read(wire)
    assert record.error == "bad_frame"
    assert "does not extend" in record.detail
    assert record.stamps == [1]
    assert not record.ok


@pytest.mark.parametrize(
    ("wire", "complete", "kind"),
    [
        (snapshot("[ts:1]"), True, "no_done"),
        (snapshot("[ts:1]") + b'data: {"parts', True, "cut_off"),
        (snapshot("[ts:1]"), False, "cut_off"),
        (snapshot("[ts:1]") + b"data: {nope\n\n", True, "bad_frame"),
        (snapshot("[ts:1]") + b"data: [1]\n\n", True, "bad_frame"),
        (snapshot("[ts:1]", status="intervene"), True, "inband_error"),
        (snapshot("[ts:1]") + FINAL + snapshot("[ts:1][ts:2]"), True, "data_after_done"),
    ],
    ids=["no-finish", "cut-in-event", "cut-body", "not-json", "not-object", "intervene", "after"],
)
def test_broken_streams_are_classified(wire: bytes, complete: bool, kind: str) -> None:
    """Each way a snapshot stream can go wrong ends as its error kind, never as success."""
    record, _ = read(wire, complete=complete)
    assert record.error == kind
    assert not record.ok


# --- the direct client against the in-process emulator ---------------------------------


async def glm_emulator(nursery: trio.Nursery, behavior: GlmBehavior) -> GlmEmulator:
    """A GLM emulator serving on loopback."""
    emulator = GlmEmulator(behavior=behavior)
    await nursery.start(emulator.serve)
    return emulator


async def test_direct_glm_stream_is_signed_reads_every_stamp_and_deletes(
    nursery: trio.Nursery,
) -> None:
    """One refresh, then a signed stream of 4 stamps; the conversation is deleted after it."""
    emulator = await glm_emulator(nursery, GlmBehavior(stamp=True, stamp_frames=4))
    with trio.fail_after(5):
        client = await GLM.open_direct(emulator.base_url)
        record = StreamRecord()
        await client.run_stream(record, timeout_s=4)
    assert record.ok, record.detail
    assert len(record.stamps) == 4
    assert record.stamps == sorted(record.stamps)
    assert emulator.record.refreshes == 1
    assert emulator.record.bad_signatures == emulator.record.auth_failures == 0
    assert len(emulator.record.conversations_created) == 1
    assert emulator.record.conversations_deleted == emulator.record.conversations_created


@pytest.mark.parametrize(
    ("behavior", "kind"),
    [
        (GlmBehavior(stamp=True, stream_error=(200, {"code": 10002, "message": "x"})), "not_sse"),
        (GlmBehavior(stamp=True, stream_error=(503, {"code": 1, "message": "x"})), "http_503"),
        (GlmBehavior(stamp=True, stamp_frames=4, drop_after=2), "cut_off"),
        (GlmBehavior(stamp=True, stamp_frames=4, malformed_after=1), "bad_frame"),
    ],
)
async def test_direct_glm_failures_are_classified(
    nursery: trio.Nursery, behavior: GlmBehavior, kind: str
) -> None:
    """Refusals, cut-offs and broken events end as their error kind."""
    emulator = await glm_emulator(nursery, behavior)
    with trio.fail_after(5):
        client = await GLM.open_direct(emulator.base_url)
        record = StreamRecord()
        await client.run_stream(record, timeout_s=4)
    assert record.error == kind
    assert not record.ok


async def test_refused_refresh_token_fails_setup(nursery: trio.Nursery) -> None:
    """An emulator that does not know the refresh token makes setup fail with AuthError."""
    strict = GlmEmulator(tokens=["someone-else"])
    await nursery.start(strict.serve)
    with trio.fail_after(5), pytest.raises(AuthError):
        await GlmDirect.login(strict.base_url, GLM.credential, "hi")


async def test_emulator_cli_flags_allow_concurrent_streams_without_a_record(
    nursery: trio.Nursery,
) -> None:
    """--no-stream-limit serves two streams of one account at once; --no-record keeps the
    counters but no per-request list."""
    emulator, _, _ = emulator_from_args(
        ["--stamp", "--frames", "3", "--frame-delay-s", "0.002", "--no-stream-limit", "--no-record"]
    )
    await nursery.start(emulator.serve)
    records = [StreamRecord(), StreamRecord()]

    async def one(record: StreamRecord) -> None:
        await client.run_stream(record, timeout_s=4)

    with trio.fail_after(5):
        client = await GLM.open_direct(emulator.base_url)
        async with trio.open_nursery() as streams:
            for record in records:
                streams.start_soon(one, record)
    assert [r.ok for r in records] == [True, True]
    assert list(emulator.record.max_active_per_account.values()) == [2]
    assert emulator.record.streams_finished == 2
    assert emulator.record.paths == []
    assert emulator.record.streams == []
    assert emulator.record.conversations_created == emulator.record.conversations_deleted == []


async def test_step_emulator_without_record_keeps_counters_only(nursery: trio.Nursery) -> None:
    """keep_record=False: a full direct stream leaves the counters but no request list."""
    emulator = StepEmulator(behavior=StepBehavior(stamp=True, stamp_frames=3), keep_record=False)
    await nursery.start(emulator.serve)
    with trio.fail_after(5):
        client = await STEP.open_direct(emulator.base_url)
        record = StreamRecord()
        await client.run_stream(record, timeout_s=4)
    assert record.ok
    assert emulator.record.streams_finished == 1
    assert emulator.record.paths == []
    assert emulator.record.messages == []
    assert emulator.record.chats_created == emulator.record.chats_deleted == []
    assert parse_args(["--no-record"]).keep_record is False
    assert parse_args([]).keep_record is True


def test_emulator_commands_ask_for_no_record_and_many_streams() -> None:
    """Both emulators run without a request record; GLM's also without its stream limit,
    and the relay's GLM limit is lifted by a positive --glm-max-streams."""
    params = EmulatorParams(7, 0.01, 0.5)
    glm_argv = GLM.emulator_command("py", params)
    assert glm_argv[:3] == ["py", "-m", "providers.glm.emulator"]
    assert {"--no-record", "--no-stream-limit", "--stamp"} <= set(glm_argv)
    assert "--frames 7" in " ".join(glm_argv)
    assert "--no-record" in STEP.emulator_command("py", params)
    assert "--glm-max-streams 100000" in GLM.relay_cmd
    assert GLM.model.startswith("glm")
    assert set(PROVIDERS) == {"step", "glm", "openai"}


# --- pacing: no pause after the last frame --------------------------------------------


def test_glm_script_pauses_before_growing_events_only() -> None:
    """Stamp mode: a pause before each stamped event, none before the part's finish event;
    progress() is paced() without the pauses."""
    spec = ScriptSpec(CONVERSATION, "", stamp_frames=3)
    ids = lambda: "part-1"  # noqa: E731
    paced = list(SnapshotScript(spec, logic_ids=ids, clock_ns=counter_clock()).paced())
    assert [item is PAUSE for item in paced] == [True, False] * 3 + [False]
    plain = list(SnapshotScript(spec, logic_ids=ids, clock_ns=counter_clock()).progress())
    assert plain == [item for item in paced if item is not PAUSE]


@pytest.fixture
def idle_jump_clock() -> MockClock:
    """Virtual time that jumps only when every task has been idle for 10 ms of real time."""
    return MockClock(autojump_threshold=0.01)


FRAME_DELAY_S = 10.0  # virtual


async def test_step_stream_ends_right_after_its_last_frame(
    nursery: trio.Nursery, idle_jump_clock: MockClock
) -> None:
    """With a 10 s frame delay, 3 frames take 3 delays (one before each), not 6: the
    end of the answer is not held back after the last frame."""
    behavior = StepBehavior(stamp=True, stamp_frames=3, frame_delay_s=FRAME_DELAY_S)
    emulator = StepEmulator(behavior=behavior)
    await nursery.start(emulator.serve)
    client = await STEP.open_direct(emulator.base_url)
    record = StreamRecord()
    started = trio.current_time()
    with trio.fail_after(100 * FRAME_DELAY_S):
        await client.run_stream(record, timeout_s=50 * FRAME_DELAY_S)
    elapsed = trio.current_time() - started
    assert record.ok
    assert len(record.stamps) == 3
    assert 3 * FRAME_DELAY_S <= elapsed < 3.5 * FRAME_DELAY_S


async def test_glm_stream_ends_right_after_its_last_frame(
    nursery: trio.Nursery, idle_jump_clock: MockClock
) -> None:
    """With a 10 s frame delay, 3 snapshots take 2 delays (between frames), not 4: neither
    the part's finish event nor the final one waits."""
    behavior = GlmBehavior(stamp=True, stamp_frames=3, frame_delay_s=FRAME_DELAY_S)
    emulator = await glm_emulator(nursery, behavior)
    client = await GLM.open_direct(emulator.base_url)
    record = StreamRecord()
    started = trio.current_time()
    with trio.fail_after(100 * FRAME_DELAY_S):
        await client.run_stream(record, timeout_s=50 * FRAME_DELAY_S)
    elapsed = trio.current_time() - started
    assert record.ok
    assert len(record.stamps) == 3
    assert 2 * FRAME_DELAY_S <= elapsed < 2.5 * FRAME_DELAY_S


# --- scenarios and figures -------------------------------------------------------------


def test_long_scenario_is_optional_and_about_twenty_thousand_characters() -> None:
    """`long` is one full-speed stream of as many stamps as make 20,000 characters at
    today's clock, reported per quarter; only there when asked for, never by default."""
    assert "long" not in {s.key for s in scenarios()}
    every = scenarios(optional=True)
    long = next(s for s in every if s.key == "long")
    assert (long.streams, long.params.frame_delay_s) == (1, 0.0)
    assert long.optional
    assert long.quarters
    stamp = len(f"[ts:{time.monotonic_ns()}]")
    assert 20_000 <= long.params.frames * stamp < 20_000 + stamp
    assert "long" not in [s.key for s in select(every, None)]
    assert [s.key for s in select(every, "long")] == ["long"]
    assert next(s for s in scenarios(quick=True, optional=True) if s.key == "long").params.frames


def test_quarter_figures_from_receipts_and_cpu_marks() -> None:
    """Chunk rates come from the first and last quarter of the receipts; CPU per chunk from
    the marks at 1, N/4, 3N/4 and N stamps, the relay's named like cpu_us_per_chunk."""
    record = StreamRecord(stamps=list(range(16)), stamp_ns=[n * 1_000_000 for n in range(16)])
    marks = [
        _CpuMark(1, {"relay": 1.0, "client": 0.5}),
        _CpuMark(2, {"relay": 1.0001, "client": 0.5}),
        _CpuMark(6, {"relay": 2.0, "client": 0.6}),
        _CpuMark(8, {"relay": 2.001, "client": None}),
    ]
    figures = quarter_figures([record], marks)
    assert figures["chunks_per_s_q1"] == pytest.approx(1000.0)
    assert figures["chunks_per_s_q4"] == pytest.approx(1000.0)
    assert figures["cpu_us_per_chunk_q1"] == pytest.approx(100.0)
    assert figures["cpu_us_per_chunk_q4"] == pytest.approx(500.0)
    assert figures["client_us_per_chunk_q1"] == pytest.approx(0.0)
    assert "client_us_per_chunk_q4" not in figures
    assert quarter_figures([StreamRecord()], marks[:2]) == {}
    burst = StreamRecord(stamps=list(range(8)), stamp_ns=[5, 5, 5, 5, 6, 7, 8, 9])
    assert "chunks_per_s_q1" not in quarter_figures([burst], [])


def test_quarter_record_reads_the_clocks_as_stamps_reach_each_threshold() -> None:
    """Marks fall at the chunks whose stamps reach 1, N/4, 3N/4 and N; a chunk that
    crosses two thresholds marks both with one reading; the client's clock is read."""
    record = QuarterRecord(thresholds=quarter_thresholds(8), pids={})
    assert record.thresholds == (1, 2, 6, 8)
    record.text_chunk("[ts:1]", 10, True)
    assert [mark.count for mark in record.marks] == [1]
    record.text_chunk("[ts:2][ts:3][ts:4][ts:5][ts:6]", 11, True)
    assert [mark.count for mark in record.marks] == [1, 6, 6]
    assert record.marks[1] is not record.marks[0]
    assert record.marks[1].cpu_s == record.marks[2].cpu_s
    record.text_chunk("[ts:7]", 12, True)
    assert len(record.marks) == 3
    record.text_chunk("[ts:8]", 13, True)
    assert [mark.count for mark in record.marks] == [1, 6, 6, 8]
    assert set(record.marks[0].cpu_s) == {"client"}
    assert record.stamps == list(range(1, 9))


# --- a tiny real run --------------------------------------------------------------------


@pytest.fixture(scope="module")
def glm_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`bench overhead --provider glm` over latency and long, tiny, with real processes."""
    out: Path = tmp_path_factory.mktemp("glm-overhead") / "report.json"
    status = main(["overhead", "--provider", "glm", "--quick", "--repeats", "1", "--frames", "6",
                   "--scenario", "latency,long", "--settle", "0.02", "--no-progress",
                   "--json", str(out)])  # fmt: skip
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    report["exit_status"] = status
    return report


def test_tiny_glm_run_delivers_every_stamp(glm_report: dict[str, Any]) -> None:
    """Both scenarios ran in both modes against the GLM emulator: every stamp arrived, no
    error, exit status 0, and the relay was started with the GLM flags."""
    assert glm_report["exit_status"] == 0
    assert "--glm-base-url" in glm_report["relay_cmd"]
    assert [s["key"] for s in glm_report["scenarios"]] == ["latency", "long"]
    for result in glm_report["scenarios"]:
        assert result["failure"] is None, result["failure"]
        assert result["direct_errors"] == result["relay_errors"] == {}
        for mode in ("direct", "relay"):
            figures = result[mode]
            assert figures["frames_received"] == figures["frames_expected"] == 6
            assert figures["frames_lost"] == figures["duplicates"] == 0
            assert figures["latency_ms_p50"] is not None
    long = next(s for s in glm_report["scenarios"] if s["key"] == "long")
    assert long["relay"]["answer_chars"] >= 6 * len("[ts:1]")
    assert long["relay"]["cpu_us_per_chunk"] is not None
