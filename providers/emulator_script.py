"""What the StepChat and OpenAI-compatible emulators share to write an answer stream.

Theory of operation
-------------------
An emulator turns one answer into a *script*: an iterator of ready-to-write
frames (bytes) and :class:`Action` steps (pause before a frame, stall, drop).
:func:`write_script` writes the response head and the script through a
:class:`Writer`, which applies the ``write_size`` and ``pack_all`` knobs, and
sleeps where a :class:`Pacing` behaviour says (``hold``, ``first_delay_s``,
``frame_delay_s``). A :class:`StreamTally` keeps the record's stream counters
right, whatever way the stream ends.

The command-line helpers give the emulators' shared flags (``--answer``,
``--chunk-chars``, ``--stamp``, ``--frames``, the delays, ``--stall-after``,
``--pack-all``, ``--no-record``) one definition, and :func:`behavior_options`
the behaviour fields they set.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any, Protocol

import h11
import trio

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

    from providers.emulator_http import ClientConnection


class Action(enum.Enum):
    """Non-frame steps of an answer script."""

    PAUSE = "pause"  # wait frame_delay_s (before a frame, never after the last)
    STALL = "stall"  # go silent until the client leaves
    DROP = "drop"  # close the TCP connection without ending the body


class Outcome(enum.Enum):
    COMPLETE = "complete"  # body ended normally; the connection may be reused
    DROPPED = "dropped"  # scripted abrupt close
    ABORTED = "aborted"  # the client went away


def stamp_text() -> str:
    """A stamped frame's text: the monotonic time now."""
    return f"[ts:{time.monotonic_ns()}]"


def text_pieces(text: str, chunk_chars: int) -> Iterator[str]:
    """``text`` in pieces of ``chunk_chars`` characters (at least 1), the last maybe shorter."""
    step = max(1, chunk_chars)
    return (text[start : start + step] for start in range(0, len(text), step))


class StreamRecord(Protocol):
    """The stream counters of an emulator's record."""

    streams_started: int
    streams_finished: int
    streams_aborted: int
    active_streams: int


class Pacing(Protocol):
    """The knobs of a behaviour that :func:`write_script` applies."""

    @property
    def first_delay_s(self) -> float: ...
    @property
    def frame_delay_s(self) -> float: ...
    @property
    def write_size(self) -> int | None: ...
    @property
    def pack_all(self) -> bool: ...
    @property
    def hold(self) -> trio.Event | None: ...


class StreamTally:
    """Keeps the stream counters of a record right for one answer stream.

    :meth:`settle` may be called again with a different outcome (a stream
    counted as finished just before its last write, whose write then failed).
    """

    def __init__(self, record: StreamRecord, changed: Callable[[], None]) -> None:
        self._record = record
        self._changed = changed
        self._outcome: Outcome | None = None
        record.streams_started += 1
        record.active_streams += 1
        changed()

    def settle(self, outcome: Outcome) -> None:
        """Count the stream as finished (complete or dropped) or aborted."""
        record = self._record
        previous = self._outcome
        if previous is not None and (previous is Outcome.ABORTED) == (outcome is Outcome.ABORTED):
            return
        if previous is None:
            record.active_streams -= 1
        elif previous is Outcome.ABORTED:
            record.streams_aborted -= 1
        else:
            record.streams_finished -= 1
        if outcome is Outcome.ABORTED:
            record.streams_aborted += 1
        else:
            record.streams_finished += 1
        self._outcome = outcome
        self._changed()


class Writer:
    """Applies ``write_size`` and ``pack_all`` to the bytes of one response."""

    def __init__(self, conn: ClientConnection, write_size: int | None, pack_all: bool) -> None:
        # Straight to the stream, one call less per frame than conn.send: a
        # failed write ends the answer and the connection (conn.watched gives
        # None), so h11 need not be told.
        self._send = conn.stream.send_all
        self._write_size = max(1, write_size) if write_size is not None else None
        self._pack_all = pack_all
        self._pending = bytearray()

    async def write(self, data: bytes) -> None:
        """Send ``data`` now, or keep it until a whole ``write_size`` piece is there."""
        if not data:
            return
        if self._pack_all:
            self._pending += data
            return
        size = self._write_size
        if size is None:
            await self._send(data)
            return
        pending = self._pending
        pending += data
        while len(pending) >= size:
            piece = bytes(pending[:size])
            del pending[:size]
            await self._send(piece)

    async def pause(self) -> None:
        """Before a delay: push out a partial piece (not in ``pack_all`` mode)."""
        if not self._pack_all:
            await self.flush()

    async def flush(self) -> None:
        """Send everything held back, in one write."""
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            await self._send(data)


async def write_script(
    conn: ClientConnection,
    behavior: Pacing,
    tally: StreamTally,
    head: h11.Response,
    script: Iterator[bytes | Action],
) -> Outcome:
    """Write the head and the script; COMPLETE or DROPPED (a stall waits to be cancelled).

    Raises:
        trio.BrokenResourceError: the client is gone.
    """
    writer = Writer(conn, behavior.write_size, behavior.pack_all)
    await writer.write(conn.encode(head))
    if behavior.hold is not None:
        await writer.pause()
        await behavior.hold.wait()
    if behavior.first_delay_s > 0:
        await writer.pause()
        await trio.sleep(behavior.first_delay_s)
    for item in script:  # stamps are taken in the script, after their pause
        if item is Action.PAUSE:
            if behavior.frame_delay_s > 0:
                await writer.pause()
                await trio.sleep(behavior.frame_delay_s)
            continue
        if item is Action.STALL:
            await writer.flush()
            await trio.sleep_forever()
        if item is Action.DROP:
            await writer.flush()
            tally.settle(Outcome.DROPPED)
            return Outcome.DROPPED
        if isinstance(item, bytes):
            await writer.write(item)
    # Count the stream as finished before its last bytes leave, so that a
    # client that has seen the end also sees the record say so.
    tally.settle(Outcome.COMPLETE)
    await writer.write(conn.encode(h11.EndOfMessage()))
    await writer.flush()
    return Outcome.COMPLETE


# --- command line -------------------------------------------------------------


def add_answer_flags(
    parser: argparse.ArgumentParser,
    *,
    chunk_chars: int = 6,
    chunk_help: str | None = None,
) -> None:
    """Add the flags every emulator has for its answer stream.

    Args:
        parser: the emulator's parser.
        chunk_chars: ``--chunk-chars``' default.
        chunk_help: ``--chunk-chars``' help.
    """
    parser.add_argument("--answer", help="answer text (default: a demo answer quoting the prompt)")
    parser.add_argument("--chunk-chars", type=int, default=chunk_chars, help=chunk_help)


def add_pacing_flags(parser: argparse.ArgumentParser, *, frame: str) -> None:
    """Add the stamp, delay, stall and packing flags (``--stall-after`` counts ``frame``s)."""
    parser.add_argument("--stamp", action="store_true", help="frames carry [ts:<monotonic_ns>]")
    parser.add_argument("--frames", type=int, default=100, help="number of stamped frames")
    parser.add_argument("--frame-delay-s", type=float, default=0.0, help="delay between frames")
    parser.add_argument("--first-delay-s", type=float, default=0.0, help="delay before frame 1")
    parser.add_argument("--stall-after", type=int, help=f"go silent after N {frame}s")
    parser.add_argument("--pack-all", action="store_true", help="the whole answer in one write")


def add_record_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--no-record``."""
    parser.add_argument(
        "--no-record",
        action="store_true",
        help="keep only counters, not the list of every request (long benchmark runs)",
    )


def behavior_options(args: argparse.Namespace) -> dict[str, Any]:
    """The behaviour fields the shared flags set (names as in every emulator's behaviour)."""
    return {
        "answer": args.answer,
        "chunk_chars": args.chunk_chars,
        "stamp": args.stamp,
        "stamp_frames": args.frames,
        "frame_delay_s": args.frame_delay_s,
        "first_delay_s": args.first_delay_s,
        "stall_after": args.stall_after,
        "pack_all": args.pack_all,
    }
