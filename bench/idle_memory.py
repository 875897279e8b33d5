"""Where a relay's memory per idle stream goes: by object type, and by source line.

Theory of operation: one StepChat emulator in stamp mode holds every stream
after its first frame (``--frames 2 --stall-after 1``, the idle scenario of
``bench overhead``). For each source tree named, a relay from that tree runs
as a child (``relay serve``, one worker) through a small hook (:data:`_HOOK`)
that on SIGUSR1 collects garbage, counts the gc-tracked objects by type (and
coroutines, async generators, functions and bound methods by name) with
their ``sys.getsizeof`` sums, reads its RSS and, under ``--depth N``
(``-X tracemalloc=N``), dumps a tracemalloc snapshot too. The client here
warms the relay up with a few streams, dumps it with none open, opens
``--streams`` streams, waits until each got its first frame, and dumps it
again. The difference divided by the streams is what one idle stream holds.
Trees alternate within each repeat (``A B A B ...``) so drift hits both.

Run from a checkout (its ``bench`` is the client; the relays come from the
trees named, e.g. git worktrees of two commits)::

    python -m bench.idle_memory /tmp/e76 /tmp/head --streams 300 --repeats 3
    python -m bench.idle_memory /tmp/e76 /tmp/head --depth 12  # by line, slow

RSS is the figure ``bench overhead`` reports and moves by a KiB or two from
run to run; the gc-tracked bytes are exact but leave out untracked objects
(bytes, str, ints) and allocator slack; tracemalloc's bytes have everything
Python allocated, by line and by the innermost frame of ``relay/``,
``protocol/`` or ``providers/`` on the allocation's traceback (tracing makes
the relay several times slower and its RSS meaningless).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import trio

from bench import procs
from bench.readers import StreamRecord
from bench.runners import chat_body, request_headers, run_openai_stream
from bench.upstreams import BENCH_PROMPT, STEP, EmulatorParams
from bench.wire import Endpoint

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

#: Runs in the relay child: ``python -X tracemalloc=N -c _HOOK OUT_DIR serve ...``.
#: SIGUSR1 writes ``<n>.snap`` (tracemalloc, when tracing), ``<n>.json`` (the
#: count and ``sys.getsizeof`` sum of gc-tracked objects by type, coroutines
#: by function, and RSS), then prints ``idle-memory: dumped <n>``; ``n``
#: counts the signals from 0.
_HOOK = """
import gc, json, os, runpy, signal, sys, tracemalloc
from collections import Counter
out, seen = sys.argv[1], [0]
def name_of(o):
    name = type(o).__qualname__
    code = getattr(o, "cr_code", None) or getattr(o, "ag_code", None) or getattr(o, "gi_code", None)
    if code is not None:
        return f"{name} {code.co_filename.rsplit('/', 2)[-2]}/{code.co_qualname}"
    if name in ("method", "function"):
        return f"{name} {getattr(o, '__qualname__', '?')}"
    if name == "cell":
        try:
            return f"cell of {type(o.cell_contents).__qualname__}"
        except ValueError:
            return "cell (empty)"
    return name
def dump(signum, frame):
    gc.collect()
    path = os.path.join(out, str(seen[0]))
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(path + ".snap")
    types, sizes = Counter(), Counter()
    for o in gc.get_objects():
        name = name_of(o)
        types[name] += 1
        sizes[name] += sys.getsizeof(o)
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    with open(path + ".json", "w") as f:
        json.dump({"types": types, "sizes": sizes, "rss_kib": rss}, f)
    print(f"idle-memory: dumped {seen[0]}", flush=True)
    seen[0] += 1
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["relay", *sys.argv[2:]]
runpy.run_module("relay", run_name="__main__", alter_sys=True)
"""
#: Streams opened and closed before the empty snapshot (imports, caches, pools).
WARMUP_STREAMS = 20
#: Bound on one dump (a tracemalloc snapshot of a relay with many streams is slow).
DUMP_TIMEOUT_S = 120.0
#: Seconds to let the relay settle before a snapshot.
SETTLE_S = 1.0
#: The relay's chat path.
_CHAT_PATH = "/v1/chat/completions"
#: Packages whose innermost frame on a traceback names the owner of an allocation.
OWN_PACKAGES = ("/relay/", "/protocol/", "/providers/")


@dataclass(slots=True)
class Sample:
    """One relay's growth from no stream to ``streams`` idle ones."""

    tree: str
    streams: int
    rss_kib: int
    by_line: Counter[str] = field(default_factory=Counter)
    by_owner: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)
    by_size: Counter[str] = field(default_factory=Counter)

    def traced(self) -> int:
        """Bytes traced by tracemalloc in all (0 when not tracing)."""
        return sum(self.by_line.values())

    def tracked(self) -> int:
        """``sys.getsizeof`` bytes of the gc-tracked objects in all."""
        return sum(self.by_size.values())


async def _snapshot(child: procs.Child, index: int) -> None:
    """Have the hook dump snapshot ``index``; wait for its line on the child's stdout."""
    stdout = child.process.stdout
    assert stdout is not None
    child.process.send_signal(signal.SIGUSR1)
    marker = f"idle-memory: dumped {index}\n".encode()
    seen = b""
    with trio.fail_after(DUMP_TIMEOUT_S):
        while marker not in seen:
            data = await stdout.receive_some()
            if not data:
                raise RuntimeError(f"the relay exited:\n{child.log_tail()}")
            seen += data


async def _to_first_frame(
    endpoint: Endpoint, count: int, while_open: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Open ``count`` streams; once each has its first frame, await ``while_open``, close all."""
    body, headers = chat_body(STEP.model, BENCH_PROMPT), request_headers(None)
    left = count
    all_in = trio.Event()

    def arrived() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            all_in.set()

    async def one(record: StreamRecord) -> None:
        await run_openai_stream(
            endpoint, body, headers, record, timeout_s=120, stamps=True, path=_CHAT_PATH
        )

    records = [StreamRecord(notify=arrived) for _ in range(count)]
    async with trio.open_nursery() as nursery:
        for record in records:
            nursery.start_soon(one, record)
        with trio.fail_after(120):
            await all_in.wait()
        if while_open is not None:
            await while_open()
        nursery.cancel_scope.cancel()
    failed = [r for r in records if not r.stamps]
    if failed:
        raise RuntimeError(f"{len(failed)} of {count} streams failed: {failed[0].detail}")


def _owner(trace: tracemalloc.Traceback) -> str:
    for frame in reversed(trace):  # most recent call first
        if any(package in frame.filename for package in OWN_PACKAGES):
            return f"{_short(frame.filename)}:{frame.lineno}"
    return "(none of ours)"


def _short(filename: str) -> str:
    for marker in (*OWN_PACKAGES, "/site-packages/", "/lib/python3"):
        at = filename.rfind(marker)
        if at >= 0:
            return filename[at + 1 :]
    return filename


def _grow(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot
) -> tuple[Counter[str], Counter[str]]:
    """Growth by allocating line, and by the innermost frame of ours on the traceback."""
    by_line: Counter[str] = Counter()
    for stat in after.compare_to(before, "lineno"):
        frame = stat.traceback[0]
        by_line[f"{_short(frame.filename)}:{frame.lineno}"] += stat.size_diff
    by_owner: Counter[str] = Counter()
    for stat in after.compare_to(before, "traceback"):
        by_owner[_owner(stat.traceback)] += stat.size_diff
    return by_line, by_owner


async def measure(tree: str, base_url: str, streams: int, depth: int) -> Sample:
    """One relay from ``tree``: its growth from no stream to ``streams`` idle ones."""
    out = tempfile.mkdtemp(prefix="idle-memory-")
    port = procs.free_port()
    argv = [
        sys.executable, *([f"-Xtracemalloc={depth}"] if depth else []), "-c", _HOOK, out,
        "serve", "--host", "127.0.0.1", "--port", str(port), "--step-base-url", base_url,
        "--step-tokens", STEP.credential, "--workers", "1", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": tree}  # ahead of the editable install's finder
    log = os.path.join(out, "relay.log")
    child = await procs.start_child("relay", argv, log, capture_stdout=True, cwd=tree, env=env)
    try:
        await procs.wait_port(child, "127.0.0.1", port)
        endpoint = Endpoint("http", "127.0.0.1", port, "")
        await _to_first_frame(endpoint, WARMUP_STREAMS)
        await trio.sleep(SETTLE_S)  # the relay ends the closed streams
        await _snapshot(child, 0)

        async def open_snapshot() -> None:
            await trio.sleep(SETTLE_S)
            await _snapshot(child, 1)

        await _to_first_frame(endpoint, streams, open_snapshot)
    finally:
        await procs.stop_child(child)
    return _sample(tree, out, streams, depth)


def _sample(tree: str, out: str, streams: int, depth: int) -> Sample:
    """Read the two dumps in ``out``: their difference."""
    counts = [_load_json(os.path.join(out, f"{n}.json")) for n in (0, 1)]
    sample = Sample(tree, streams, counts[1]["rss_kib"] - counts[0]["rss_kib"])
    for key, pick in (("types", sample.by_type), ("sizes", sample.by_size)):
        pick.update(counts[1][key])
        pick.subtract(counts[0][key])
    if depth:
        before, after = (tracemalloc.Snapshot.load(os.path.join(out, f"{n}.snap")) for n in (0, 1))
        sample.by_line, sample.by_owner = _grow(before, after)
    return sample


def _load_json(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        loaded: dict[str, Any] = orjson.loads(f.read())
    return loaded


def _per_stream(samples: list[Sample], pick: Callable[[Sample], Counter[str]]) -> dict[str, float]:
    """Median bytes per stream of every key over ``samples``."""
    keys = {key for sample in samples for key in pick(sample)}
    return {
        key: statistics.median(pick(sample)[key] / sample.streams for sample in samples)
        for key in keys
    }


def report(samples: list[Sample], trees: list[str], top: int) -> str:
    """Per tree: bytes per stream in all; then the top rows of each breakdown."""
    lines: list[str] = []
    by_tree = {tree: [s for s in samples if s.tree == tree] for tree in trees}
    for tree, got in by_tree.items():
        figures = [
            ("RSS", [s.rss_kib * 1024 for s in got]),
            ("gc-tracked", [s.tracked() for s in got]),
        ]
        if any(s.traced() for s in got):
            figures.append(("traced", [s.traced() for s in got]))
        cells = []
        for label, values in figures:
            each = [value / sample.streams for value, sample in zip(values, got, strict=True)]
            runs = " ".join(f"{v:,.0f}" for v in each)
            cells.append(f"{label} {statistics.median(each):,.0f} ({runs})")
        lines.append(f"{tree}, bytes per idle stream, median (runs): " + "; ".join(cells))
    breakdowns: list[tuple[str, Callable[[Sample], Counter[str]]]] = [
        ("gc-tracked objects by type, getsizeof bytes", lambda s: s.by_size),
        ("gc-tracked objects by type, count", lambda s: s.by_type),
    ]
    if any(s.traced() for s in samples):
        breakdowns += [
            ("traced bytes by allocating line", lambda s: s.by_line),
            ("traced bytes by the innermost frame of ours", lambda s: s.by_owner),
        ]
    for title, pick in breakdowns:
        tables = {tree: _per_stream(got, pick) for tree, got in by_tree.items()}
        keys = sorted(
            {key for table in tables.values() for key in table},
            key=lambda key: -max(abs(table.get(key, 0.0)) for table in tables.values()),
        )
        heads = " | ".join(os.path.basename(t) or t for t in trees)
        lines.append(f"\n{title} per stream (medians: {heads}):")
        for key in keys[:top]:
            row = " ".join(f"{tables[tree].get(key, 0.0):>9,.1f}" for tree in trees)
            lines.append(f"{row}  {key}")
    return "\n".join(lines)


async def run(trees: list[str], streams: int, repeats: int, depth: int) -> list[Sample]:
    """Start the emulator, then measure each tree ``repeats`` times, alternating."""
    params = EmulatorParams(frames=2, stall_after=1)
    log = os.path.join(tempfile.mkdtemp(prefix="idle-memory-"), "emulator.log")
    emulator = await procs.start_child(
        "emulator", STEP.emulator_command(sys.executable, params), log, capture_stdout=True
    )
    samples: list[Sample] = []
    try:
        base_url = await procs.wait_listening(emulator)
        for _ in range(repeats):
            for tree in trees:
                sample = await measure(tree, base_url, streams, depth)
                print(
                    f"{tree}: RSS {sample.rss_kib * 1024 / streams:,.0f},"
                    f" gc-tracked {sample.tracked() / streams:,.0f} bytes per stream",
                    file=sys.stderr,
                )
                samples.append(sample)
    finally:
        await procs.stop_child(emulator)
    return samples


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.idle_memory TREE [TREE ...]``: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.idle_memory", description=__doc__)
    parser.add_argument("trees", nargs="+", help="source trees whose relay to measure")
    parser.add_argument("--streams", type=int, default=300, help="idle streams held open")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tree, alternating")
    parser.add_argument(
        "--depth", type=int, default=0, help="tracemalloc frames per allocation (0: no tracing)"
    )
    parser.add_argument("--top", type=int, default=25, help="rows per breakdown")
    options = parser.parse_args(argv)
    trees = [os.path.abspath(tree) for tree in options.trees]
    samples = trio.run(run, trees, options.streams, options.repeats, options.depth)
    print(report(samples, trees, options.top))


if __name__ == "__main__":
    main()
