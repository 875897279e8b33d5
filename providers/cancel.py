"""Holding off a cancellation for a bounded while, where leaving at once loses something.

A provider sometimes learns the name of what it must clean up only from the
upstream's answer: StepChat's CreateChat returns the chat id, ChatGLM's
first snapshot names the conversation. A client that leaves while that
answer is on its way cancels the read, and the chat or conversation stays
behind on the account. :func:`hold_on_cancel` lets such a step finish, but
only for a bounded grace once the cancellation has arrived, so neither a
gone client nor a stopping relay waits out the upstream's own (much longer)
timeouts. :func:`create_held` wraps the usual use: create something held,
and undo it if the caller is cancelled once it exists.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

T = TypeVar("T")


@asynccontextmanager
async def hold_on_cancel(grace_s: float) -> AsyncIterator[trio.CancelScope]:
    """Shield the body from cancellation, but only for ``grace_s`` once one arrives.

    Used where leaving at once would lose a conversation (its id is not known
    yet): a client that goes, or a relay that stops, gets the body
    ``grace_s`` more seconds to learn the id, never the upstream's own
    (much longer) timeouts. If that runs out, the body is cancelled too and
    the caller's cancellation follows at its next checkpoint.

    Yields the shielding scope: ``cancelled_caught`` says the grace ran out,
    in which case the caller's cancellation is raised on the way out (the
    block never ends quietly with its body cut short).
    It costs a task (about 60 us here), so callers hold only the steps that
    name what they create; ``grace_s <= 0`` holds nothing and costs nothing.
    """
    if grace_s <= 0:  # nothing to hold: a plain scope, no watcher task
        with trio.CancelScope() as plain:
            yield plain
        return
    shield = trio.CancelScope(shield=True)

    async def arm() -> None:
        try:
            await trio.sleep_forever()
        finally:  # the surrounding scope was cancelled: the grace starts now
            shield.deadline = min(shield.deadline, trio.current_time() + grace_s)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(arm)
            try:
                with shield:
                    yield shield
            finally:
                nursery.cancel_scope.cancel()
        if shield.cancelled_caught:  # only ever after the caller was cancelled
            await trio.lowlevel.checkpoint()
    except BaseExceptionGroup as group:
        # The nursery is an implementation detail: the caller sees the body's
        # own exception (or the cancellation), never a group around it.
        others = [exc for exc in group.exceptions if not isinstance(exc, trio.Cancelled)]
        if len(others) > 1:
            raise
        raise (others or group.exceptions)[0] from None


async def create_held(
    grace_s: float,
    create: Callable[[], Awaitable[T]],
    undo: Callable[[T], Awaitable[None]],
) -> T:
    """``await create()`` held (:func:`hold_on_cancel`); undone if the caller is told to go.

    If the caller is cancelled while ``create`` runs, ``create`` gets
    ``grace_s`` more seconds; if it made something, ``await undo(made)``
    runs (it must shield and bound itself) before the cancellation goes on.
    """
    made: list[T] = []
    try:
        async with hold_on_cancel(grace_s):
            made.append(await create())
    except BaseException:
        if made:
            await undo(made[0])
        raise
    return made[0]
