"""Coarse timers (relay/timers.py): never early, at most ``slack`` late, cheap to move.

Time is trio's ``autojump_clock``: nothing here does I/O.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
import trio.testing

from relay.timers import SLACK_S, coarse_timers

if TYPE_CHECKING:
    import pytest


class Key:
    """Records when it expired."""

    def __init__(self, name: str, fired: list[tuple[str, float]]) -> None:
        self.name = name
        self.fired = fired

    def expire(self) -> None:
        self.fired.append((self.name, trio.current_time()))


async def test_deadlines_fire_in_order_never_early_and_at_most_slack_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = coarse_timers()
    fired: list[tuple[str, float]] = []
    start = trio.current_time()
    deadlines = {"a": 10.0, "b": 30.0, "c": 20.0, "d": 20.1}
    for name, after in deadlines.items():
        timers.set(Key(name, fired), start + after)
    await trio.sleep(60)
    assert [name for name, _ in fired] == ["a", "c", "d", "b"]
    for name, at in fired:
        assert start + deadlines[name] <= at <= start + deadlines[name] + SLACK_S
    assert len(timers) == 0


async def test_cancel_forgets_and_set_moves(autojump_clock: trio.testing.MockClock) -> None:
    timers = coarse_timers()
    fired: list[tuple[str, float]] = []
    start = trio.current_time()
    gone, moved = Key("gone", fired), Key("moved", fired)
    timers.set(gone, start + 5)
    timers.set(moved, start + 5)
    await trio.sleep(1)
    timers.cancel(gone)
    timers.cancel(gone)  # twice: nothing happens
    timers.set(moved, start + 15)  # re-armed before it came
    await trio.sleep(30)
    assert [name for name, _ in fired] == ["moved"]
    assert start + 15 <= fired[0][1] <= start + 15 + SLACK_S


async def test_an_earlier_deadline_set_while_the_task_sleeps_is_not_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The task plans to look at the earliest deadline; a new, earlier one re-plans it."""
    timers = coarse_timers()
    fired: list[tuple[str, float]] = []
    start = trio.current_time()
    timers.set(Key("late", fired), start + 100)
    await trio.sleep(1)  # the task now sleeps until start + 100
    timers.set(Key("soon", fired), start + 3, slack=0.01)
    await trio.sleep(5)
    assert [name for name, _ in fired] == ["soon"]
    assert start + 3 <= fired[0][1] <= start + 3.01


async def test_a_failing_expire_is_logged_and_the_others_still_fire(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def expire(self) -> None:
            raise RuntimeError("boom")

    timers = coarse_timers()
    fired: list[tuple[str, float]] = []
    start = trio.current_time()
    timers.set(Broken(), start + 1)
    timers.set(Key("after", fired), start + 2)
    with caplog.at_level(logging.ERROR, logger="relay.timers"):
        await trio.sleep(5)
    assert [name for name, _ in fired] == ["after"]
    assert "expire() failed" in caplog.text
