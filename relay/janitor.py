"""Cleanup after the answer, off the request's path.

Every answer ends with an upstream call that the client does not need to
wait for: deleting the chat (StepChat) or conversation (ChatGLM) the answer
used. Run inline, it holds the client's connection for one more upstream
round trip, so a keep-alive client (the ``openai`` SDK, chat front ends)
waits that long before its next request is even read. The :class:`Janitor`
takes those jobs (providers.contract.Background) and runs them in a nursery
of its own.

Nothing is lost on the way out: :meth:`Janitor.run` lives for the whole of
``App.serve``; once the server has stopped taking requests :meth:`close` is
called, later jobs are refused (the caller runs them itself), and ``run``
returns only when every job it took has finished. Jobs are the providers'
cleanup coroutines, which are already bounded by the cleanup timeout,
shielded and never raise, so a job can neither hang the janitor nor take it
down. Should one raise anyway, it is logged and the others go on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from providers.contract import Job

log = logging.getLogger("relay.janitor")


class Janitor:
    """Runs cleanup jobs in the background while :meth:`run` is running.

    Attributes:
        pending: jobs taken and not finished yet.
        done: jobs finished since start.
    """

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()
        self._idle = trio.lowlevel.ParkingLot()
        self.pending = 0
        self.done = 0

    def defer(self, job: Job) -> bool:
        """Take ``job`` (providers.contract.Background); False when not running or closing."""
        nursery = self._nursery
        if nursery is None:
            return False
        self.pending += 1
        nursery.start_soon(self._run_job, job)
        return True

    async def _run_job(self, job: Job) -> None:
        try:
            await job()
        except Exception:
            log.exception("a cleanup job failed")
        finally:
            self.pending -= 1
            self.done += 1
            if not self.pending:
                self._idle.unpark_all()

    async def wait_idle(self) -> None:
        """Return once no job is pending (at once if none is)."""
        while self.pending:
            await self._idle.park()

    def close(self) -> None:
        """Take no more jobs; :meth:`run` returns once the running ones are done."""
        self._nursery = None
        self._closed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run jobs until :meth:`close`, then wait for the ones still running."""
        async with trio.open_nursery() as nursery:
            if not self._closed.is_set():
                self._nursery = nursery
            task_status.started()
            try:
                await self._closed.wait()
            finally:
                # cancelled from outside too: the nursery is about to close,
                # so later jobs are refused (their callers run them)
                self._nursery = None
