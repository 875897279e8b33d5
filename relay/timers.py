"""Coarse timers: one task per trio run keeps many long, approximate deadlines.

A cancel scope with a deadline is trio's exact way to bound a wait, and it
costs 5-15 us to set up and tear down on a small VM, plus about 1 KiB for as
long as the wait lasts. Some deadlines of the relay are long, are set again
all the time, and need no millisecond precision: an upstream read's timeout
(:mod:`relay.netio`: 120 s of silence in a stream, 15 s for a unary call; a
paced stream waits once per frame, and over TLS every read had a scope), and
a client write's ``send_timeout``. (An SSE response's commit and keep-alive
clock needs none of this: its task sleeps until silence would be due, once
per ``sse_keepalive`` at most, not once per event; see :mod:`relay.chat`.)

So these go in a dict instead, ``{key: deadline}``, and one system task per
trio run looks at it when the earliest deadline comes (not before
``slack`` seconds since its last look, so it looks at most a few times a
second however many keys are re-armed) and calls ``key.expire()`` for each
key past its deadline. Setting or cancelling a timer is a dict store; a
deadline fires up to ``slack`` late, never early.

``expire()`` runs in the timer task: it must be quick and must not raise
(one that does is logged and dropped, since a system task that raises
ends the whole trio run).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import trio

log = logging.getLogger("relay.timers")

#: Default lateness allowed: how soon after one look the task may look again
SLACK_S = 0.25


class Expiring(Protocol):
    """What a timer is kept for (hashable by identity)."""

    def expire(self) -> None:
        """Called once in the timer task when the deadline has passed."""


class CoarseTimers:
    """Deadlines kept by one task (module docstring). Use :func:`coarse_timers`."""

    def __init__(self) -> None:
        self._due: dict[Expiring, float] = {}
        self._slack = SLACK_S
        self._next = math.inf  # when the task will look next
        self._wake = trio.Event()

    def __len__(self) -> int:
        return len(self._due)

    def set(self, key: Expiring, deadline: float, slack: float = SLACK_S) -> None:
        """Call ``key.expire()`` at ``deadline`` (up to ``slack`` late) unless cancelled first.

        Setting a key that is already set moves its deadline.
        """
        self._due[key] = deadline
        if slack < self._slack:
            self._slack = slack
        if deadline < self._next:
            self._next = deadline
            self._wake.set()  # the task sleeps until later than this: re-plan

    def cancel(self, key: Expiring) -> None:
        """Forget ``key``'s deadline (nothing happens if it has none)."""
        self._due.pop(key, None)

    async def run(self) -> None:
        """Fire deadlines as they come, forever (a system task)."""
        due = self._due
        while True:
            if self._next == math.inf:
                await self._wake.wait()
            else:
                with trio.move_on_at(self._next):
                    await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            for key in [key for key, deadline in due.items() if deadline <= now]:
                del due[key]
                try:
                    key.expire()
                except Exception:
                    log.exception("a timer's expire() failed")
            earliest = min(due.values(), default=math.inf)
            self._next = max(earliest, now + self._slack) if earliest != math.inf else math.inf


_TIMERS: trio.lowlevel.RunVar[CoarseTimers] = trio.lowlevel.RunVar("relay.timers")


def coarse_timers() -> CoarseTimers:
    """This trio run's timers, their task started on first use."""
    try:
        return _TIMERS.get()
    except LookupError:
        timers = CoarseTimers()
        _TIMERS.set(timers)
        trio.lowlevel.spawn_system_task(timers.run, name="relay.timers")
        return timers
