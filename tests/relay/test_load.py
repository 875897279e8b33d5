"""A bounded load test: hundreds of streams at once through a real relay, on loopback.

One trio run holds everything: a StepChat emulator, an :class:`relay.app.App`
over it, and :data:`STREAMS` raw h11 clients, each on its own connection.
The clients send their requests together when an event fires; the emulator
holds every answer stream after its response head (``StepBehavior.hold``)
until all of them have started, so all are open at once, then paces the
frames so that they interleave. Each client gets a different prompt, and the
emulator's demo answer quotes it, so a stream that lost, reordered or mixed
up a piece reads as a different text.

Afterwards the relay must have deleted every conversation it created, and
its tasks and file descriptors must come back to where they started once its
cleanups are done: while it is still running (all that may stay are the
idle upstream connections its pool keeps: one socket at each end and the
emulator's task reading it), and again after it and the emulator stop. Tasks
are counted below the test's own task (trio's system tasks, such as
relay.timers' one per run, are left out); descriptors in ``/proc/self/fd``.
"""

from __future__ import annotations

import functools
import gc
import os
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
import orjson
import pytest
import trio

from providers.step.emulator import StepBehavior, StepEmulator, demo_answer
from relay import config
from relay.app import App
from relay.cli import raise_open_files_limit
from tests.relay.conftest import sse_events, sse_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

STREAMS = 300
TOKEN = "load-token"
CREDENTIAL = f"device1@{TOKEN}"
#: Per stream: the client's, the relay's two and the emulator's socket, plus margin.
FDS_NEEDED = STREAMS * 4 + 512
#: The whole test; it takes a few seconds on an idle 2-core machine.
LOAD_TIMEOUT_S = 90
#: Characters per emulator text frame: the answers are ~220 characters, ~14 frames each.
CHUNK_CHARS = 16
#: Pause between an answer's frames: streams interleave instead of finishing one by one.
FRAME_DELAY_S = 0.01
#: How often the end state is looked at while the cleanups finish.
POLL_S = 0.01


@dataclass
class Answer:
    """What one client received."""

    status: int
    content_type: bytes
    body: bytes


def open_fds() -> int:
    """File descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def tasks_below(task: trio.lowlevel.Task) -> int:
    """``task`` and every task in its nurseries, recursively."""
    return 1 + sum(
        tasks_below(child) for nursery in task.child_nurseries for child in nursery.child_tasks
    )


def test_tasks() -> int:
    """The tasks of the running test (its own and all below it)."""
    return tasks_below(trio.lowlevel.current_task())


test_tasks.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


async def poll_until(condition: Callable[[], bool]) -> None:
    """Check ``condition`` every :data:`POLL_S` until it holds; the caller's deadline bounds it."""
    while True:
        if condition():
            return
        await trio.sleep(POLL_S)


@functools.cache
def prompt(index: int) -> str:
    """The user message of stream ``index``: different for each, one line."""
    return f"load stream {index:03d}: please say something about the number {index * 7919}"


async def one_stream(host: str, port: int, index: int, go: trio.Event) -> Answer:
    """Connect, wait for ``go``, send one streaming chat completion, read the whole answer."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        message = {"role": "user", "content": prompt(index)}
        body = orjson.dumps({"model": "step", "stream": True, "messages": [message]})
        head = h11.Request(
            method="POST",
            target="/v1/chat/completions",
            headers=[
                ("host", host),
                ("content-type", "application/json"),
                ("authorization", f"Bearer {CREDENTIAL}"),
                ("content-length", str(len(body))),
            ],
        )
        request = conn.send(head) + (conn.send(h11.Data(data=body)) or b"")
        request += conn.send(h11.EndOfMessage()) or b""
        await go.wait()
        await stream.send_all(request)
        status, content_type, parts = 0, b"", []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(64 * 1024)))
            elif isinstance(event, h11.Response):
                status = event.status_code
                content_type = dict(event.headers).get(b"content-type", b"")
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, content_type, b"".join(parts))
            else:
                raise AssertionError(f"unexpected {event!r}")


@pytest.fixture
def open_files_limit() -> Iterator[None]:
    """Raise the soft open-files limit for the test (skip if it cannot reach FDS_NEEDED);
    put it back afterwards."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before[0] < FDS_NEEDED:
        soft, hard = raise_open_files_limit()
        if soft < FDS_NEEDED:
            pytest.skip(f"open files: soft limit {soft}, hard {hard}; this test needs {FDS_NEEDED}")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.mark.usefixtures("open_files_limit")
async def test_300_concurrent_streams_arrive_whole_and_leave_nothing_behind() -> None:
    """300 streaming completions open at once through the relay, on one StepChat account:
    each client reads its own answer whole and in order, ended by [DONE] with no error; every
    conversation is deleted; the relay's tasks and file descriptors come back to their
    starting counts once its cleanups are done (only the pool's idle connections stay), and
    all the way back once the relay and the emulator have stopped."""
    gc.collect()  # sockets an earlier test left to the collector go now, not mid-count
    with trio.fail_after(LOAD_TIMEOUT_S):
        fds_before, tasks_before = open_fds(), test_tasks()
        async with trio.open_nursery() as nursery:
            hold, go = trio.Event(), trio.Event()
            emulator = StepEmulator(
                tokens=[TOKEN],
                behavior=StepBehavior(
                    chunk_chars=CHUNK_CHARS, frame_delay_s=FRAME_DELAY_S, hold=hold
                ),
            )
            await nursery.start(emulator.serve)
            settings = config.load(
                {"host": "127.0.0.1", "port": 0, "step_base_url": emulator.base_url},
                environ={},
            )
            app = App(settings)
            addresses = await nursery.start(functools.partial(app.serve))
            host, _, port = addresses[0].rpartition(":")
            fds_serving, tasks_serving = open_fds(), test_tasks()

            answers: dict[int, Answer] = {}

            async def client(index: int) -> None:
                answers[index] = await one_stream(host, int(port), index, go)

            async with trio.open_nursery() as clients:
                for index in range(STREAMS):
                    clients.start_soon(client, index)
                go.set()
                await emulator.wait_until(
                    lambda record: record.active_streams == STREAMS, timeout=LOAD_TIMEOUT_S
                )
                hold.set()

            for index in range(STREAMS):
                answer = answers[index]
                assert answer.status == 200, answer
                assert answer.content_type.startswith(b"text/event-stream")
                events = sse_events(answer.body)
                assert events[-1] == b"[DONE]", (index, events[-3:])
                assert not [e for e in events if b'"error"' in e], index
                assert sse_text(answer.body) == demo_answer(f"user:{prompt(index)}"), index
            record = emulator.record
            assert record.streams_finished == STREAMS

            # Every conversation is deleted; then nothing is left but the idle pool.
            await emulator.wait_until(
                lambda record: len(record.chats_deleted) == STREAMS, timeout=LOAD_TIMEOUT_S
            )
            assert sorted(record.chats_deleted) == sorted(record.chats_created)
            def only_the_idle_pool_is_left() -> bool:
                stats = app.statistics()
                idle = stats["upstream_idle"]
                busy = (stats["connections"], stats["upstream_active"], stats["cleanup_pending"])
                left = (open_fds() - fds_serving - 2 * idle, test_tasks() - tasks_serving - idle)
                return busy == (0, 0, 0) and left == (0, 0)

            await poll_until(only_the_idle_pool_is_left)

            app.shutdown()
            await app.stopped.wait()
            await app.aclose()
            nursery.cancel_scope.cancel()
        await poll_until(lambda: (open_fds(), test_tasks()) == (fds_before, tasks_before))
