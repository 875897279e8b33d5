"""hold_on_cancel: a step finishes despite a cancellation, for a bounded grace."""

from __future__ import annotations

import pytest
import trio

from providers.cancel import hold_on_cancel


async def test_the_step_finishes_then_the_cancellation_goes_on() -> None:
    done: list[str] = []
    with trio.fail_after(2), trio.CancelScope() as outer:
        async with hold_on_cancel(1.0):
            outer.cancel()
            await trio.sleep(0.05)  # would be cancelled at once without the hold
            done.append("step")
        done.append("after")  # not reached: the cancellation resumes at the exit
    assert done == ["step"]
    assert outer.cancelled_caught


async def test_the_grace_bounds_the_step() -> None:
    started = trio.current_time()
    with trio.fail_after(2), trio.CancelScope() as outer:
        async with hold_on_cancel(0.1) as held:
            outer.cancel()
            await trio.sleep(10)
    assert outer.cancelled_caught
    assert held.cancelled_caught
    assert trio.current_time() - started < 1


async def test_without_a_cancellation_nothing_changes() -> None:
    with trio.fail_after(2):
        async with hold_on_cancel(0.01) as held:
            await trio.sleep(0.05)  # longer than the grace: the grace has not started
    assert not held.cancelled_caught


async def test_exceptions_come_out_as_they_are() -> None:
    with pytest.raises(KeyError):
        async with hold_on_cancel(1.0):
            raise KeyError("x")


async def test_zero_grace_holds_nothing() -> None:
    reached: list[bool] = []
    with trio.fail_after(2), trio.CancelScope() as outer:
        async with hold_on_cancel(0):
            outer.cancel()
            await trio.sleep(1)
            reached.append(True)
    assert reached == []
    assert outer.cancelled_caught
