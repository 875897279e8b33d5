"""``python -m bench overhead``: what the relay adds, measured against the wire.

Theory of operation
-------------------
Per scenario (:func:`bench.scenarios.scenarios`) this module starts the provider's emulator
as a process, in stamp mode, and a relay as another process pointed at it
(ours by default; ``--relay-cmd`` runs any other). The relay runs in the log
directory, not ours, with this checkout last on ``PYTHONPATH``: ``python -m``
puts the working directory first on ``sys.path``, so from ours a command's
``env PYTHONPATH=<other checkout>`` would still run this checkout's relay
(A/B figures of one relay against itself). Then, for each repeat, it
runs the scenario twice: *direct*, where the benchmark client reads the
emulator's native stream itself (the floor: loopback plus parsing), and
*relay*, where it reads the relay's OpenAI stream. Every frame carries the
emulator's ``monotonic_ns`` at write time, so each chunk's delivery latency
is exact (:mod:`bench.measure`). Around each run the CPU time of the relay,
the emulator and the client itself is read (:mod:`bench.procs`), so the
report can say which process was busy, and so is the time each spent
runnable but waiting for a CPU (``<process>_runq_pct``, from the kernel's
``schedstat``): busy plus waiting plus asleep is the whole run, so a relay
that is neither busy nor waiting had nothing to do. The median of the repeats is
reported, with the difference, the ratio, the issue's targets and warnings
where the harness rather than the relay decides a figure.

Scenarios (full size; ``--quick`` and ``--frames/--streams/--idle-streams``
scale them down):

- ``latency``: 1 stream, 200 frames 2 ms apart: TTFT (chat creation
  included) and per-chunk latency;
- ``throughput-1``, ``throughput-16``: frames as fast as the emulator can
  write: chunks/s and relay CPU per delivered chunk;
- ``concurrency-500`` (100 frames 20 ms apart) and ``concurrency-200`` (10 ms):
  per-chunk latency, the largest gap between two frames of a stream, frames
  lost. Stream starts are spread evenly over one frame interval
  (:attr:`bench.scenarios.Scenario.start_spacing_s`), and the first frame is delayed
  (``--first-delay-s`` of the emulator) so that every stream is set up
  before the paced frames start: the figures are the steady state, not the
  connection storm;
- ``idle``: 1,000 streams whose upstream holds after the first frame: relay
  RSS growth per open stream (direct mode shows the emulator's, for scale).
  The relay is restarted for every repeat, since freed memory stays in the
  process and would flatter later repeats;
- ``sustained``: the highest number of concurrent streams (64 deltas 20 ms
  apart) at which every frame arrives with no gap over 40 ms, doubling from
  1 (:mod:`bench.sustained`). Each level gets a fresh emulator (its first
  delay grows with the level) and a fresh relay; the modes of a level run
  one after the other against that emulator, and a mode stops at its first
  failed level. A relay command holding ``{workers}`` (the default ones do)
  is searched once per count of :data:`bench.upstreams.SUSTAINED_WORKERS`;
  every other scenario runs it with one worker;
- ``long`` (only when named): 1 stream of 1,000 frames at full speed, an
  answer of about 20,000 characters. Besides the overall figures it reports
  chunks/s and CPU per chunk (relay, emulator, client) for the first and the
  last quarter of the stream: its record (:class:`QuarterRecord`) reads the
  processes' CPU clocks when the stamps received reach 1, N/4, 3N/4 and N,
  so the growth of the cost per chunk with the answer's length (ChatGLM's
  cumulative snapshots) shows. It reads each process's own clock, without
  descendants (the default relay is one process), and follows the first
  stream of the run (``long`` has one).

Gateways side by side (``--gateway NAME=CMD``, repeatable; issue 16): each
named command is measured beside the relay (ours, or ``--relay-cmd``'s) in
the same invocation, so that a comparison is not two runs minutes apart on
a machine whose load drifted. Per scenario and repeat, the relay and each
gateway run one after the other in an order that rotates with the repeat
(repeat 0: relay, g1, g2; repeat 1: g1, g2, relay; ...), so none always
runs first or last. Each turn is the single-gateway machinery with one
repeat (:func:`run_scenario` with ``gateway`` and ``repeats``): a fresh
emulator, the gateway's own direct run right before it, then its runs (for
``sustained``, its own level search: direct and each of its variants, a
command without ``{workers}`` being one). So every gateway's figures are
against its own floor, exactly as in a run of its own; the price is an
emulator and a relay restarted per repeat. A gateway's turns are merged
with :func:`merge_results`, which gives what one run of that many repeats
gives (runs concatenated; counts summed, medians, verdicts, warnings and
sustained levels worked out again by :func:`finish_result` and
:func:`finish_sustained`); a gateway that failed a repeat sits out that
scenario's later repeats, as one run stops at its failure. Each turn logs
to ``<log dir>/<NAME>/<repeat>/`` (the relay's name is ``relay``). The
report stays the relay's at the top level, so every reader of a single run
still works, with ``"gateways": [{"name", "relay_cmd", "scenarios"}, ...]``
(the same shape per scenario) and ``"order"``: per scenario key, per
repeat, the names in the order their turns ran. ``--api-key`` and
``--relay-path`` apply to every gateway alike.

Bounds: every run is inside ``trio.move_on_after`` (a run that overruns
marks its unfinished streams ``timeout``), every stream has the same bound,
start-up waits are bounded, and the processes are stopped in ``finally``
blocks, shielded, so Ctrl-C and errors also stop them.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import trio

from bench import procs
from bench.measure import Figures, combine_runs, floor_warnings, judge, merge_errors, run_figures
from bench.progress import NoProgress, Progress
from bench.readers import StreamRecord
from bench.runners import chat_body, request_headers, run_openai_stream
from bench.scenarios import SUSTAINED_MAX_GAP_MS, Scenario, scenarios, select
from bench.stats import median_or_none
from bench.sustained import LevelSearch, judge_level
from bench.upstreams import BENCH_PROMPT, PROVIDERS, SUSTAINED_WORKERS, DirectClient, Provider
from bench.wire import Endpoint
from protocol.errors import RelayError, RequestError, UpstreamFailed
from relay.cli import raise_open_files_limit

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

#: The checkout this bench runs from: the default relay command imports its ``relay``.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Pause between runs, so that the previous run's cleanup (chat deletion) is over.
SETTLE_S = 0.3
#: Fewest distinct reads in a quarter for its chunk rate (fewer: a burst, not a rate).
QUARTER_MIN_READS = 4
#: What a ``--gateway`` name may be: it labels report columns and names a log directory.
GATEWAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: Names a ``--gateway`` may not take: the relay's column and the floor's.
RESERVED_NAMES = frozenset({"relay", "direct"})


@dataclass(frozen=True, slots=True)
class Gateway:
    """A gateway measured beside the relay in the same run (``--gateway NAME=CMD``).

    Attributes:
        name: its label in the report and the comparison.
        relay_cmd: its command template, with ``--relay-cmd``'s placeholders.
    """

    name: str
    relay_cmd: str


def parse_gateway(text: str) -> Gateway:
    """A ``--gateway`` value, ``NAME=CMD``, split at the first ``=`` (CMD may hold more).

    Raises:
        RequestError: no ``=``, an empty command, or a name that is not
            letters, digits, ``.``, ``_`` and ``-`` (first a letter or digit),
            or is ``relay`` or ``direct`` (checked in :func:`check_gateways`).
    """
    name, sep, command = text.partition("=")
    if not sep or not command.strip():
        raise RequestError(
            f"--gateway {text!r}: expected NAME=CMD (a name, '=', a command)", param="gateway"
        )
    gateway = Gateway(name.strip(), command.strip())
    check_gateways([gateway])
    return gateway


def check_gateways(gateways: Sequence[Gateway]) -> None:
    """Refuse gateways the report could not tell apart, or whose command cannot be filled.

    Raises:
        RequestError: a name that is empty, not :data:`GATEWAY_NAME`, one of
            :data:`RESERVED_NAMES` or given twice (case-insensitive), or a
            command with an unknown placeholder (as ``--relay-cmd``).
    """
    seen: set[str] = set()
    for gateway in gateways:
        name = gateway.name
        if not GATEWAY_NAME.fullmatch(name):
            raise RequestError(
                f"--gateway name {name!r}: use letters, digits, '.', '_' and '-',"
                " starting with a letter or digit",
                param="gateway",
            )
        if name.casefold() in RESERVED_NAMES:
            raise RequestError(
                f"--gateway name {name!r} is taken: {' and '.join(sorted(RESERVED_NAMES))}"
                " name the relay's and the direct floor's columns",
                param="gateway",
            )
        if name.casefold() in seen:
            raise RequestError(f"--gateway name {name!r} is given twice", param="gateway")
        seen.add(name.casefold())
        try:
            relay_argv(
                gateway.relay_cmd, python="", host="", port=0, upstream="", token="", workers=1
            )
        except RequestError as exc:
            raise RequestError(f"--gateway {name}: {exc.message}", param="gateway") from exc


@dataclass(frozen=True, slots=True)
class OverheadOptions:
    """What ``bench overhead`` was asked to do (see ``--help``)."""

    provider: str = "step"
    scenario: str | None = None
    repeats: int = 3
    quick: bool = False
    frames: int | None = None
    streams: int | None = None
    idle_streams: int | None = None
    first_delay_s: float | None = None
    relay_cmd: str | None = None
    api_key: str | None = None
    relay_path: str = "/v1/chat/completions"
    python: str = sys.executable
    settle_s: float = SETTLE_S
    log_dir: str | None = None
    gateways: tuple[Gateway, ...] = ()


@dataclass(slots=True)
class ScenarioResult:
    """Figures of one scenario in both modes, with verdicts and warnings."""

    key: str
    label: str
    params: dict[str, Any]
    streams: int
    repeats: int = 0
    direct: Figures = field(default_factory=dict)
    relay: Figures = field(default_factory=dict)
    direct_errors: dict[str, int] = field(default_factory=dict)
    relay_errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    direct_runs: list[Figures] = field(default_factory=list)
    relay_runs: list[Figures] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failure: str | None = None
    sustained: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RelayVariant:
    """One relay the ``sustained`` scenario searches: its report key, label and workers."""

    key: str
    label: str
    workers: int


def relay_variants(template: str, name: str = "relay") -> list[RelayVariant]:
    """The relays of the ``sustained`` scenario for a relay command ``template``.

    With ``{workers}`` in the template, one per count of
    :data:`~bench.upstreams.SUSTAINED_WORKERS` (``relay_w1``, ``relay_w2``);
    otherwise the command as it is (``relay``). ``name`` labels them in the
    report (``relay-cmd`` for another gateway's command).
    """
    if "{workers}" not in template:
        return [RelayVariant("relay", name, 1)]
    return [RelayVariant(f"relay_w{n}", f"{name} --workers {n}", n) for n in SUSTAINED_WORKERS]


def relay_argv(template: str, **values: object) -> list[str]:
    """Split a relay command template and fill its placeholders.

    Args:
        template: e.g. ``"{python} -m relay serve --port {port} ..."``.
        values: ``python``, ``host``, ``port``, ``upstream``, ``token``, ``workers``.

    Raises:
        RequestError: an unknown placeholder (write ``{{`` for a literal brace).
    """
    try:
        return [part.format_map(values) for part in shlex.split(template)]
    except (KeyError, IndexError, ValueError) as exc:
        raise RequestError(
            f"relay command: bad placeholder {exc}; known: {', '.join(sorted(values))}",
            param="relay_cmd",
        ) from exc


class _Harness:
    """The processes and clients of one scenario, for one relay command."""

    def __init__(
        self, options: OverheadOptions, provider: Provider, log_dir: str, relay_cmd: str
    ) -> None:
        self.options = options
        self.provider = provider
        self.log_dir = log_dir
        self.relay_cmd = relay_cmd
        self.emulator: procs.Child | None = None
        self.relay: procs.Child | None = None
        self.upstream = ""
        self.direct: DirectClient | None = None
        self.relay_endpoint: Endpoint | None = None
        self._body = chat_body(provider.model, BENCH_PROMPT)
        key = options.api_key.replace("{token}", provider.credential) if options.api_key else None
        self._headers = request_headers(key)
        self._starts = 0
        self._emulator_starts = 0

    async def start_emulator(self, scenario: Scenario) -> None:
        if self.emulator is not None:
            await procs.stop_child(self.emulator)
            self.emulator = None
        argv = self.provider.emulator_command(self.options.python, scenario.params)
        self._emulator_starts += 1
        log = os.path.join(self.log_dir, f"{scenario.key}-emulator-{self._emulator_starts}.log")
        self.emulator = await procs.start_child("emulator", argv, log, capture_stdout=True)
        self.upstream = await procs.wait_listening(self.emulator)
        self.direct = await self.provider.open_direct(self.upstream)
        record = await self.first_frame(self.direct_stream, scenario.bound_s)
        if record.error is not None or not record.stamps:
            raise UpstreamFailed(
                f"warm-up stream from the emulator failed: {record.error}: {record.detail}\n"
                + self.emulator.log_tail()
            )

    async def start_relay(self, scenario: Scenario, workers: int = 1) -> None:
        await self.stop_relay()
        port = procs.free_port()
        argv = relay_argv(
            self.relay_cmd,
            python=self.options.python,
            host="127.0.0.1",
            port=port,
            upstream=self.upstream,
            token=self.provider.credential,
            workers=workers,
        )
        self._starts += 1
        log = os.path.join(self.log_dir, f"{scenario.key}-relay-{self._starts}.log")
        # Not in our working directory: ``python -m`` puts the current directory
        # first on sys.path, so a relay command's own PYTHONPATH (an A/B
        # against another checkout) would lose to the checkout we run from.
        self.relay = await procs.start_child(
            "relay", argv, log, cwd=self.log_dir, env=procs.source_root_env(SOURCE_ROOT)
        )
        await procs.wait_port(self.relay, "127.0.0.1", port)
        self.relay_endpoint = Endpoint("http", "127.0.0.1", port, "")
        record = await self.first_frame(self.relay_stream, scenario.bound_s)
        if record.error is not None or not record.stamps:
            raise UpstreamFailed(
                f"warm-up stream through the relay failed: {record.error}: {record.detail}\n"
                + self.relay.log_tail()
            )

    async def stop_relay(self) -> None:
        if self.relay is not None:
            await procs.stop_child(self.relay)
            self.relay = None

    async def stop(self) -> None:
        for child in (self.relay, self.emulator):
            if child is not None:
                await procs.stop_child(child)
        self.relay = self.emulator = None

    async def direct_stream(self, record: StreamRecord, bound_s: float = 60.0) -> None:
        assert self.direct is not None
        await self.direct.run_stream(record, timeout_s=bound_s)

    async def relay_stream(self, record: StreamRecord, bound_s: float = 60.0) -> None:
        assert self.relay_endpoint is not None
        await run_openai_stream(
            self.relay_endpoint,
            self._body,
            self._headers,
            record,
            timeout_s=bound_s,
            stamps=True,
            path=self.options.relay_path,
        )

    async def first_frame(
        self, stream: Callable[[StreamRecord, float], Awaitable[None]], bound_s: float
    ) -> StreamRecord:
        """Run one stream until its first stamp (or its end), then close it."""
        arrived = trio.Event()
        record = StreamRecord(notify=arrived.set)
        with trio.move_on_after(bound_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, record, bound_s)
                await arrived.wait()
                nursery.cancel_scope.cancel()
        return record

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.emulator is not None:
            out["emulator"] = self.emulator.pid
        if self.relay is not None:
            out["relay"] = self.relay.pid
        return out


def _cpu(pids: dict[str, int]) -> dict[str, float | None]:
    sample: dict[str, float | None] = {name: procs.cpu_seconds(pid) for name, pid in pids.items()}
    sample["client"] = procs.own_cpu_seconds()
    return sample


def _run_queue(pids: dict[str, int]) -> dict[str, float | None]:
    """Seconds each process (and the client) has waited for a CPU so far."""
    sample = {name: procs.run_queue_seconds(pid) for name, pid in pids.items()}
    sample["client"] = procs.own_run_queue_seconds()
    return sample


#: How often :func:`_sample_steady` reads the clocks during a paced run.
STEADY_SAMPLE_S = 0.05


@dataclass(frozen=True, slots=True)
class _ClockSample:
    """One reading of every process's CPU clock and run-queue wait, and when."""

    at_ns: int
    cpu_s: dict[str, float | None]
    waited_s: dict[str, float | None]


async def _sample_steady(pids: dict[str, int], out: list[_ClockSample]) -> None:
    """Read the clocks every :data:`STEADY_SAMPLE_S` until cancelled (see steady_figures)."""
    while True:
        out.append(_ClockSample(time.monotonic_ns(), _cpu_now(pids), _run_queue(pids)))
        await trio.sleep(STEADY_SAMPLE_S)


def steady_figures(records: list[StreamRecord], samples: list[_ClockSample]) -> Figures:
    """CPU busy and run-queue wait per process while *every* stream was streaming.

    The window runs from the moment the last stream got its first stamp to
    the moment the first stream got its last one, so stream setup (the
    emulator's first delay) and the tail are left out: what a relay does
    with all its streams flowing. Its bounds are the first sample at or
    after the start and the last at or before the end.

    Returns:
        ``<process>_cpu_pct_steady`` and ``<process>_runq_pct_steady`` (100
        = one core) and ``steady_s``; nothing when the window holds fewer
        than two samples.
    """
    firsts = [r.stamp_ns[0] for r in records if r.stamp_ns]
    lasts = [r.stamp_ns[-1] for r in records if r.stamp_ns]
    if not firsts or len(firsts) < len(records):
        return {}
    start, end = max(firsts), min(lasts)
    inside = [sample for sample in samples if start <= sample.at_ns <= end]
    if len(inside) < 2:
        return {}
    low, high = inside[0], inside[-1]
    span_s = (high.at_ns - low.at_ns) / 1e9
    figures: Figures = {"steady_s": span_s}
    for name, before in low.cpu_s.items():
        after = high.cpu_s.get(name)
        if before is not None and after is not None:
            figures[f"{name}_cpu_pct_steady"] = (after - before) / span_s * 100
        waited, waited_then = high.waited_s.get(name), low.waited_s.get(name)
        if waited is not None and waited_then is not None:
            figures[f"{name}_runq_pct_steady"] = (waited - waited_then) / span_s * 100
    return figures


@dataclass(frozen=True, slots=True)
class _CpuMark:
    """CPU clocks read when the stamps received reached ``count``."""

    count: int
    cpu_s: dict[str, float | None]


def _cpu_now(pids: dict[str, int]) -> dict[str, float | None]:
    """Each process's own CPU clock (cheap: no walk of /proc), and the client's."""
    sample: dict[str, float | None] = {
        name: procs.process_cpu_seconds(pid) for name, pid in pids.items()
    }
    sample["client"] = procs.own_cpu_seconds()
    return sample


@dataclass(slots=True)
class QuarterRecord(StreamRecord):
    """A stream record that reads the CPU clocks as its stamps reach 1, N/4, 3N/4 and N.

    The clocks are read in :meth:`text_chunk`, i.e. right when the chunk that
    crossed a threshold was received, with no polling task whose scheduling
    would blur the quarters. A chunk that crosses several thresholds marks
    them all with the same reading.

    Attributes:
        thresholds: the stamp counts to mark (see :func:`quarter_thresholds`).
        pids: the processes whose clocks are read (the client's is added).
        marks: one :class:`_CpuMark` per threshold reached, in order.
    """

    thresholds: tuple[int, ...] = ()
    pids: dict[str, int] = field(default_factory=dict)
    marks: list[_CpuMark] = field(default_factory=list)

    def text_chunk(self, text: str, now_ns: int, stamps: bool) -> None:
        """Count the chunk, then mark every threshold its stamps reached."""
        StreamRecord.text_chunk(self, text, now_ns, stamps)
        marks, thresholds = self.marks, self.thresholds
        if len(marks) < len(thresholds) and len(self.stamps) >= thresholds[len(marks)]:
            sample = _cpu_now(self.pids)
            count = len(self.stamps)
            while len(marks) < len(thresholds) and count >= thresholds[len(marks)]:
                marks.append(_CpuMark(count, sample))


def quarter_thresholds(frames: int) -> tuple[int, ...]:
    """Stamp counts that bound the first and the last quarter of ``frames``."""
    return (1, max(1, frames // 4), max(1, frames * 3 // 4), frames)


def quarter_figures(records: list[StreamRecord], marks: list[_CpuMark]) -> Figures:
    """Chunks/s and CPU per chunk in the first and the last quarter of a run.

    Args:
        records: the run's streams (their stamp receipt times give the rates).
        marks: of :class:`QuarterRecord`: stamps received 1, N/4, 3N/4, N.

    Returns:
        ``chunks_per_s_q1/_q4`` from the receipt times, and
        ``<process>_us_per_chunk_q1/_q4`` from the marks (the relay's is
        named ``cpu_us_per_chunk_q1/_q4``, like ``cpu_us_per_chunk``);
        figures that cannot be computed are left out, as is the rate of a
        quarter that arrived in fewer than :data:`QUARTER_MIN_READS` reads.
    """
    figures: Figures = {}
    receipts = sorted(ns for record in records for ns in record.stamp_ns)
    quarter = len(receipts) // 4
    if quarter >= 2:
        for name, window in (("q1", receipts[:quarter]), ("q4", receipts[-quarter:])):
            span_s = (window[-1] - window[0]) / 1e9
            if span_s > 0 and len(set(window)) >= QUARTER_MIN_READS:
                figures[f"chunks_per_s_{name}"] = (len(window) - 1) / span_s
    if len(marks) == 4:
        for name, (low, high) in (("q1", (marks[0], marks[1])), ("q4", (marks[2], marks[3]))):
            chunks = high.count - low.count
            for who, before in low.cpu_s.items():
                after = high.cpu_s.get(who)
                if chunks <= 0 or before is None or after is None:
                    continue
                label = "cpu" if who == "relay" else who
                figures[f"{label}_us_per_chunk_{name}"] = (after - before) * 1e6 / chunks
    return figures


async def _run_mode(
    harness: _Harness,
    scenario: Scenario,
    mode: str,
    progress: Progress,
    keep: list[StreamRecord] | None = None,
) -> tuple[Figures, dict[str, int], list[str]]:
    """One run of ``scenario`` in ``mode`` (``direct`` or ``relay``); ``keep`` gets its records."""
    stream = harness.direct_stream if mode == "direct" else harness.relay_stream
    pids = harness.pids()
    if mode == "direct":
        pids.pop("relay", None)
    measured_pid = pids.get("relay" if mode == "relay" else "emulator")
    bound = scenario.bound_s
    all_in = trio.Event()
    waiting = scenario.streams

    def arrived() -> None:  # a stream's first chunk, end or error
        nonlocal waiting
        waiting -= 1
        if waiting == 0:
            all_in.set()

    records: list[StreamRecord]
    if scenario.quarters:
        thresholds = quarter_thresholds(scenario.frames_per_stream)
        records = [
            QuarterRecord(notify=arrived, thresholds=thresholds, pids=pids)
            for _ in range(scenario.streams)
        ]
    else:
        records = [StreamRecord(notify=arrived) for _ in range(scenario.streams)]
    rss_base = procs.rss_kib(measured_pid) if scenario.idle and measured_pid else None
    rss_open: int | None = None

    async def one(record: StreamRecord, delay_s: float) -> None:
        try:
            if delay_s:
                await trio.sleep(delay_s)
            await stream(record, bound)
        finally:
            progress.advance()

    waited_before = _run_queue(pids)
    cpu_before = _cpu(pids)
    clocks: list[_ClockSample] = []
    started = time.perf_counter()
    with trio.move_on_after(bound):
        async with trio.open_nursery() as sampling:
            if scenario.group == "concurrency":  # paced streams: the steady state's clocks
                sampling.start_soon(_sample_steady, pids, clocks)
            async with trio.open_nursery() as nursery:
                spacing = scenario.start_spacing_s
                for index, record in enumerate(records):
                    nursery.start_soon(one, record, index * spacing)
                if scenario.idle:
                    await all_in.wait()
                    await trio.sleep(min(harness.options.settle_s, 0.1))
                    if measured_pid:
                        rss_open = procs.rss_kib(measured_pid)
                    nursery.cancel_scope.cancel()
            sampling.cancel_scope.cancel()
    wall_s = time.perf_counter() - started
    cpu_after = _cpu(pids)
    waited_after = _run_queue(pids)
    now = time.monotonic_ns()
    for record in records:  # what the bound cut short
        unfinished = not record.stamps if scenario.idle else not record.done
        if unfinished and record.error is None:
            record.fail("timeout", f"the run did not end within {bound:g} s", now)
    figures, errors = run_figures(
        records, frames_per_stream=scenario.frames_per_stream, wall_s=wall_s
    )
    for name in cpu_before:
        before, after = cpu_before[name], cpu_after.get(name)
        if before is not None and after is not None and wall_s > 0:
            figures[f"{name}_cpu_pct"] = (after - before) / wall_s * 100
            waited, waited_then = waited_after.get(name), waited_before.get(name)
            if waited is not None and waited_then is not None:
                figures[f"{name}_runq_pct"] = (waited - waited_then) / wall_s * 100
            if name == "relay" and figures["frames_received"]:
                received = figures["frames_received"] or 1.0
                figures["cpu_us_per_chunk"] = (after - before) * 1e6 / received
    figures.update(steady_figures(records, clocks))
    if scenario.quarters:
        figures["answer_chars"] = float(max((r.chars for r in records), default=0))
        first = records[0] if records else None
        marks = first.marks if isinstance(first, QuarterRecord) else []
        figures.update(quarter_figures(records[:1], marks))
    if rss_base is not None and rss_open is not None and scenario.streams:
        figures["rss_kib_base"] = float(rss_base)
        figures["rss_kib_open"] = float(rss_open)
        figures["rss_kib_per_stream"] = (rss_open - rss_base) / scenario.streams
    samples = [f"{mode}: {r.error}: {r.detail}" for r in records if r.error is not None][:3]
    if keep is not None:
        keep.extend(records)
    return figures, errors, samples


async def _search_levels(
    harness: _Harness,
    scenario: Scenario,
    variants: list[RelayVariant],
    searches: dict[str, LevelSearch],
    progress: Progress,
    note: Callable[[str], None],
) -> None:
    """One search of every mode, level by level; a mode stops at its first failed level.

    Raises:
        RelayError: the emulator of a level did not start (a relay that does
            not start only stops its own search, with the reason).
    """
    options = harness.options
    by_key = {variant.key: variant for variant in variants}
    while True:
        due = [key for key, search in searches.items() if search.next_level is not None]
        if not due:
            return
        level = min(level for key in due if (level := searches[key].next_level) is not None)
        at_level = scenario.at_level(level, options.first_delay_s)
        await harness.start_emulator(at_level)
        for key in due:
            search = searches[key]
            if search.next_level != level:
                continue
            variant = by_key.get(key)
            label = variant.label if variant else key
            try:
                if variant is not None:
                    await harness.start_relay(at_level, variant.workers)
                progress.begin(f"sustained {label}: {level} streams", level)
                records: list[StreamRecord] = []
                try:
                    mode = "direct" if variant is None else "relay"
                    figures, _, _ = await _run_mode(
                        harness, at_level, mode, progress, keep=records
                    )
                finally:
                    progress.end()
            except RelayError as exc:
                search.abort(f"{label} at {level} streams: {exc.message}")
                note(f"{label} at {level} streams: {exc.message}")
                continue
            finally:
                await harness.stop_relay()
            busy = figures.get("relay_cpu_pct" if variant else "emulator_cpu_pct")
            search.record(
                judge_level(
                    records,
                    frames_per_stream=at_level.frames_per_stream,
                    max_gap_ms=SUSTAINED_MAX_GAP_MS,
                    cpu_pct=busy,
                )
            )
            await trio.sleep(options.settle_s)


def _relay_cmd(options: OverheadOptions, provider: Provider, gateway: Gateway | None) -> str:
    """The command template of ``gateway``, or of the relay (``--relay-cmd``, else ours)."""
    if gateway is not None:
        return gateway.relay_cmd
    return options.relay_cmd or provider.relay_cmd


def _new_result(scenario: Scenario) -> ScenarioResult:
    return ScenarioResult(scenario.key, scenario.label, asdict(scenario.params), scenario.streams)


async def run_sustained(
    options: OverheadOptions,
    provider: Provider,
    scenario: Scenario,
    progress: Progress,
    *,
    gateway: Gateway | None = None,
    repeats: range | None = None,
) -> ScenarioResult:
    """The ``sustained`` scenario: one level search per mode and repeat (see the module doc).

    ``gateway`` and ``repeats`` are :func:`run_scenario`'s.
    """
    result = _new_result(scenario)
    log_dir = options.log_dir or tempfile.mkdtemp(prefix="bench-overhead-")
    os.makedirs(log_dir, exist_ok=True)
    command = _relay_cmd(options, provider, gateway)
    harness = _Harness(options, provider, log_dir, command)
    if gateway is not None:
        variants = relay_variants(command, gateway.name)
    elif options.relay_cmd:
        variants = relay_variants(command, "relay-cmd")
    else:
        variants = relay_variants(command)
    labels = {"direct": "direct", **{v.key: v.label for v in variants}}
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in labels}
    aborted: list[str] = []
    try:
        for _ in repeats if repeats is not None else range(options.repeats):
            searches = {key: LevelSearch(scenario.levels) for key in labels}
            try:
                await _search_levels(
                    harness, scenario, variants, searches, progress, aborted.append
                )
            finally:
                for key, search in searches.items():
                    runs[key].append(search.as_dict())
            result.repeats += 1
    except RelayError as exc:
        result.failure = exc.message
    finally:
        await harness.stop()
    if aborted and result.failure is None:
        result.failure = "; ".join(aborted)
    return finish_sustained(result, scenario, labels, runs)


def finish_sustained(
    result: ScenarioResult,
    scenario: Scenario,
    labels: dict[str, str],
    runs: dict[str, list[dict[str, Any]]],
) -> ScenarioResult:
    """Fill a ``sustained`` result's levels, figures and verdicts from its searches.

    Args:
        result: the result to fill (its repeats and failure are left as they are).
        scenario: the ``sustained`` scenario.
        labels: each mode's report key and label, ``direct`` first, then the
            relay's variants in order (``relay_w1``, ...: :func:`relay_variants`).
        runs: per mode key, every repeat's :meth:`LevelSearch.as_dict`, in order.

    Returns:
        ``result``, with ``sustained`` (each mode's median level and its runs),
        ``direct``/``relay`` and their runs as figures, and one verdict per
        relay variant (at least half of direct's level).
    """
    levels = {key: median_or_none([run["sustained"] for run in got]) for key, got in runs.items()}
    result.sustained = {
        "frames": scenario.params.frames,
        "frame_delay_ms": scenario.params.frame_delay_s * 1000,
        "max_gap_ms": SUSTAINED_MAX_GAP_MS,
        "levels": list(scenario.levels),
        "modes": {
            key: {"label": labels[key], "sustained": levels[key], "runs": runs[key]}
            for key in labels
        },
    }
    result.direct_runs = [{"sustained_streams": run["sustained"]} for run in runs["direct"]]
    result.direct = {"sustained_streams": levels["direct"]}
    relay_keys = [key for key in labels if key != "direct"]
    result.relay_runs = []
    for index in range(len(runs["direct"])):
        result.relay_runs.append(
            {
                _sustained_figure(key, relay_keys): runs[key][index]["sustained"]
                for key in relay_keys
                if index < len(runs[key])
            }
        )
    result.relay = {_sustained_figure(key, relay_keys): levels[key] for key in relay_keys}
    result.verdicts = []
    direct_level = levels["direct"]
    for key in relay_keys:
        value = levels[key]
        if direct_level is None or value is None:
            continue
        limit = direct_level / 2
        result.verdicts.append(
            {
                "target": f"{labels[key]} sustains at least half of direct's level",
                "figure": _sustained_figure(key, relay_keys),
                "basis": "relay",
                "limit": limit,
                "value": value,
                "result": "PASS" if value >= limit else "MISS",
            }
        )
    return result


def _sustained_figure(key: str, relay_keys: list[str]) -> str:
    """The figure name of a relay's sustained level: the first relay's is plain."""
    return "sustained_streams" if key == relay_keys[0] else f"sustained_streams_{key[6:]}"


async def run_scenario(
    options: OverheadOptions,
    provider: Provider,
    scenario: Scenario,
    progress: Progress,
    *,
    gateway: Gateway | None = None,
    repeats: range | None = None,
) -> ScenarioResult:
    """Start the processes, run the repeats in both modes, stop the processes.

    Args:
        options: what was asked; ``options.repeats`` is the count the
            progress labels show (``2/3``).
        provider: whose emulator and credential.
        scenario: what to run.
        progress: where runs are shown.
        gateway: measure this ``--gateway`` instead of the relay; None: the
            relay (``--relay-cmd``'s command, else ours).
        repeats: the repeat numbers to run (default ``range(options.repeats)``);
            ``--gateway`` runs one repeat per call (:func:`run_beside`).

    Returns:
        The scenario's result (:func:`finish_result`); a failure of the
        harness or the relay ends the repeats and is the result's ``failure``.
    """
    if scenario.levels:
        return await run_sustained(
            options, provider, scenario, progress, gateway=gateway, repeats=repeats
        )
    result = _new_result(scenario)
    log_dir = options.log_dir or tempfile.mkdtemp(prefix="bench-overhead-")
    os.makedirs(log_dir, exist_ok=True)
    harness = _Harness(options, provider, log_dir, _relay_cmd(options, provider, gateway))
    names = {"direct": "direct", "relay": "relay"}
    if gateway is not None:
        names = {"direct": f"direct ({gateway.name})", "relay": gateway.name}
    direct_errors: list[dict[str, int]] = []
    relay_errors: list[dict[str, int]] = []
    try:
        await harness.start_emulator(scenario)
        for count, repeat in enumerate(repeats if repeats is not None else range(options.repeats)):
            if scenario.idle and count:
                # memory is measured as growth from a fresh process, on both sides:
                # a second run in the same emulator reuses the heap the first grew
                await harness.start_emulator(scenario)
            if harness.relay is None or scenario.idle:
                await harness.start_relay(scenario)
            for mode in ("direct", "relay"):
                progress.begin(
                    f"{scenario.key} {names[mode]} {repeat + 1}/{options.repeats}",
                    scenario.streams,
                )
                try:
                    figures, errors, samples = await _run_mode(harness, scenario, mode, progress)
                finally:
                    progress.end()
                (result.direct_runs if mode == "direct" else result.relay_runs).append(figures)
                (direct_errors if mode == "direct" else relay_errors).append(errors)
                result.error_samples.extend(samples[: 3 - len(result.error_samples)])
                await trio.sleep(options.settle_s)
            result.repeats += 1
    except RelayError as exc:
        result.failure = exc.message
    finally:
        await harness.stop()
    result.direct_errors = merge_errors(direct_errors)
    result.relay_errors = merge_errors(relay_errors)
    return finish_result(result, scenario)


def finish_result(result: ScenarioResult, scenario: Scenario) -> ScenarioResult:
    """Work out a (non-``sustained``) result's figures, verdicts and warnings from its runs.

    Returns:
        ``result``, with ``direct`` and ``relay`` the :func:`combine_runs` of
        their runs and, if the relay ran at all, the issue's verdicts and the
        floor warnings; everything else is left as it is.
    """
    result.direct = combine_runs(result.direct_runs)
    result.relay = combine_runs(result.relay_runs)
    result.verdicts, result.warnings = [], []
    if result.relay_runs:
        result.verdicts = [
            {
                "target": v.target.text,
                "figure": v.target.figure,
                "basis": v.target.basis,
                "limit": v.target.limit,
                "value": v.value,
                "result": v.result,
            }
            for v in judge(scenario.key, result.direct, result.relay)
        ]
        result.warnings = floor_warnings(scenario.key, scenario.group, result.direct, result.relay)
    return result


def merge_results(scenario: Scenario, parts: Sequence[ScenarioResult]) -> ScenarioResult:
    """One result from the results of consecutive repeats of one relay (or gateway).

    The same as one run of all those repeats gives: runs concatenated in
    order, errors added up, the first three error samples, the repeats
    counted, and the figures, verdicts, warnings (and ``sustained`` levels)
    worked out again from the runs. Failure: a run stops at a failure that
    ends its repeats (a part with no repeat done), so that part is the last
    one and its failure is the result's; otherwise the parts' failures (the
    sustained searches a relay that did not start cut short) joined by
    ``"; "``.

    Args:
        scenario: the scenario every part ran.
        parts: one-or-more-repeat results of :func:`run_scenario` for that
            scenario and one relay command, in the order they ran.
    """
    merged = _new_result(scenario)
    merged.repeats = sum(part.repeats for part in parts)
    if parts and parts[-1].repeats < 1:
        merged.failure = parts[-1].failure
    else:
        merged.failure = "; ".join(part.failure for part in parts if part.failure) or None
    if scenario.levels:
        modes: dict[str, Any] = parts[0].sustained.get("modes", {}) if parts else {}
        labels = {"direct": "direct", **{key: mode["label"] for key, mode in modes.items()}}
        runs = {
            key: [run for part in parts for run in part.sustained["modes"][key]["runs"]]
            for key in labels
            if key in modes
        }
        runs.setdefault("direct", [])
        return finish_sustained(merged, scenario, labels, runs)
    for part in parts:
        merged.direct_runs.extend(part.direct_runs)
        merged.relay_runs.extend(part.relay_runs)
        merged.error_samples.extend(part.error_samples[: 3 - len(merged.error_samples)])
    merged.direct_errors = merge_errors(part.direct_errors for part in parts)
    merged.relay_errors = merge_errors(part.relay_errors for part in parts)
    return finish_result(merged, scenario)


@dataclass(frozen=True, slots=True)
class BesideResult:
    """One scenario for the relay and every ``--gateway``, each merged over the repeats.

    Attributes:
        relay: the relay's result.
        gateways: each gateway's, in the order of ``--gateway``.
        order: per repeat, the names in the order their turns ran.
    """

    relay: ScenarioResult
    gateways: list[ScenarioResult]
    order: list[list[str]]


async def run_beside(
    options: OverheadOptions,
    provider: Provider,
    scenario: Scenario,
    progress: Progress,
    log_dir: str,
) -> BesideResult:
    """The relay and every ``options.gateways`` on one scenario, one repeat at a time.

    Repeat ``r`` runs the line-up (the relay, then the gateways in order)
    rotated left by ``r``: each turn is :func:`run_scenario` for that one
    repeat, with its own emulator and direct run, logging to
    ``log_dir/<name>/<r + 1>``. A gateway whose turn failed (no repeat
    done) sits out the later repeats. Turns are merged per gateway with
    :func:`merge_results`.
    """
    lineup: list[Gateway | None] = [None, *options.gateways]
    names = ["relay", *(gateway.name for gateway in options.gateways)]
    parts: list[list[ScenarioResult]] = [[] for _ in lineup]
    order: list[list[str]] = []
    for repeat in range(options.repeats):
        shift = repeat % len(lineup)
        ran: list[str] = []
        order.append(ran)
        for index in [*range(shift, len(lineup)), *range(shift)]:
            done = parts[index]
            if done and done[-1].repeats < 1:
                continue  # failed: one run of its own would have stopped there too
            ran.append(names[index])
            turn = replace(options, log_dir=os.path.join(log_dir, names[index], str(repeat + 1)))
            done.append(
                await run_scenario(
                    turn,
                    provider,
                    scenario,
                    progress,
                    gateway=lineup[index],
                    repeats=range(repeat, repeat + 1),
                )
            )
    merged = [merge_results(scenario, done) for done in parts]
    return BesideResult(merged[0], merged[1:], order)


async def _cancel_on_sigterm(scope: trio.CancelScope) -> None:
    """Turn SIGTERM into a cancellation, so that ``finally`` blocks stop the children."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def machine_info() -> dict[str, Any]:
    """Where the figures come from: CPU count, load, Python and trio versions."""
    try:
        load: list[float] | None = list(os.getloadavg())
    except OSError:  # pragma: no cover - not available
        load = None
    return {
        "cpus": os.cpu_count(),
        "loadavg": load,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "trio": trio.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


async def run_overhead(
    options: OverheadOptions, progress: Progress | None = None
) -> dict[str, Any]:
    """Run the selected scenarios; the report as a JSON-ready mapping.

    With ``options.gateways``, each scenario runs the relay and every gateway
    side by side (:func:`run_beside`); the report is the relay's as without
    them, plus ``gateways`` (per gateway: ``name``, ``relay_cmd``,
    ``scenarios`` of the same shape) and ``order`` (per scenario key, per
    repeat, the names in the order their turns ran). Without gateways the
    report has neither key, and its ``options`` no ``gateways``.

    Raises:
        RequestError: an unknown provider or scenario, a bad relay command,
            or a bad ``--gateway`` (:func:`check_gateways`).
    """
    provider = PROVIDERS.get(options.provider)
    if provider is None:
        raise RequestError(
            f"unknown provider {options.provider!r}; available: {', '.join(PROVIDERS)}",
            param="provider",
        )
    if options.repeats < 1:
        raise RequestError("--repeats must be at least 1", param="repeats")
    if options.relay_cmd:
        relay_argv(
            options.relay_cmd, python="", host="", port=0, upstream="", token="", workers=1
        )
    check_gateways(options.gateways)
    chosen = select(
        scenarios(
            quick=options.quick,
            frames=options.frames,
            streams=options.streams,
            idle_streams=options.idle_streams,
            first_delay_s=options.first_delay_s,
            optional=True,
        ),
        options.scenario,
    )
    limits = raise_open_files_limit()
    results: list[ScenarioResult] = []
    beside: list[list[ScenarioResult]] = [[] for _ in options.gateways]
    order: dict[str, list[list[str]]] = {}
    failure: Exception | None = None  # raised outside the nursery: no exception group
    async with trio.open_nursery() as nursery:
        if threading.current_thread() is threading.main_thread():
            nursery.start_soon(_cancel_on_sigterm, nursery.cancel_scope)
        try:
            log_dir = options.log_dir
            if options.gateways and log_dir is None:
                log_dir = tempfile.mkdtemp(prefix="bench-overhead-")
            for scenario in chosen:
                shown = progress or NoProgress()
                if log_dir is None or not options.gateways:
                    results.append(await run_scenario(options, provider, scenario, shown))
                    continue
                both = await run_beside(options, provider, scenario, shown, log_dir)
                for got, result in zip(beside, both.gateways, strict=True):
                    got.append(result)
                order[scenario.key] = both.order
                results.append(both.relay)
        except Exception as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    terminated = len(results) < len(chosen)
    if terminated:
        raise UpstreamFailed("terminated by SIGTERM; the child processes were stopped")
    shown_options = asdict(replace(options, api_key="***" if options.api_key else None))
    if not options.gateways:
        del shown_options["gateways"]  # the report of a single run is as it always was
    report: dict[str, Any] = {
        "tool": "bench overhead",
        "options": shown_options,
        "machine": {**machine_info(), "fd_limit": list(limits)},
        "relay_cmd": options.relay_cmd or provider.relay_cmd,
        "scenarios": [asdict(r) for r in results],
    }
    if options.gateways:
        report["gateways"] = [
            {
                "name": gateway.name,
                "relay_cmd": gateway.relay_cmd,
                "scenarios": [asdict(r) for r in got],
            }
            for gateway, got in zip(options.gateways, beside, strict=True)
        ]
        report["order"] = order
    return report
