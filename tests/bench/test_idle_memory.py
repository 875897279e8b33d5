"""bench.idle_memory: a small real run against this checkout's relay and emulator."""

from __future__ import annotations

import trio

from bench import idle_memory
from bench.overhead import SOURCE_ROOT


def test_a_tiny_run_counts_what_idle_streams_hold() -> None:
    """Four idle streams through this tree's relay: each holds gc-tracked objects (trio's
    cancel scopes among them) and the report has one line per tree and the breakdowns."""
    [sample] = trio.run(idle_memory.run, [SOURCE_ROOT], 4, 1, 0)
    assert sample.tree == SOURCE_ROOT
    assert sample.streams == 4
    assert sample.tracked() / sample.streams > 5_000  # two connections, tasks, scopes
    assert sample.by_type["CancelScope"] >= 4
    text = idle_memory.report([sample], [SOURCE_ROOT], top=5)
    assert text.startswith(f"{SOURCE_ROOT}, bytes per idle stream, median (runs): RSS ")
    assert "gc-tracked objects by type, count per stream" in text
    assert "traced" not in text  # no tracemalloc without --depth
