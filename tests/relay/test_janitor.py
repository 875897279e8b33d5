"""The janitor: cleanup jobs after the answer, none lost at shutdown (relay/janitor.py)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import trio

from relay.janitor import Janitor
from tests.relay.conftest import RelayFactory, Running, chat_body, sse_text
from tests.relay.test_server import CHAT, JSON_HEADERS, connect, encode_request, read_reply

if TYPE_CHECKING:
    import pytest

    from providers.step.emulator import StepEmulator


async def test_jobs_run_in_the_background_and_run_waits_for_them_after_close() -> None:
    janitor = Janitor()
    finished: list[int] = []

    async def job(n: int) -> None:
        await trio.sleep(0.05 * n)
        finished.append(n)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(janitor.run)
            assert janitor.defer(functools.partial(job, 2))
            assert janitor.defer(functools.partial(job, 1))
            assert janitor.pending == 2
            janitor.close()
            assert not janitor.defer(functools.partial(job, 0))  # closing: the caller runs it
        # the nursery (and run) ended only after both jobs were done
    assert finished == [1, 2]
    assert (janitor.pending, janitor.done) == (0, 2)


async def test_defer_before_run_is_refused() -> None:
    async def job() -> None:
        raise AssertionError("not run")

    assert not Janitor().defer(job)


async def test_a_failing_job_is_logged_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    janitor = Janitor()
    ran: list[str] = []

    async def bad() -> None:
        raise RuntimeError("boom")

    async def good() -> None:
        await trio.sleep(0.01)
        ran.append("good")

    with trio.fail_after(5), caplog.at_level(logging.ERROR, "relay.janitor"):
        async with trio.open_nursery() as nursery:
            await nursery.start(janitor.run)
            janitor.defer(bad)
            janitor.defer(good)
            await janitor.wait_idle()
            janitor.close()
    assert ran == ["good"]
    assert "a cleanup job failed" in caplog.text


async def test_next_keep_alive_request_does_not_wait_for_the_cleanup(
    relay: Running, step: StepEmulator
) -> None:
    """A slow DelChat runs after the answer: the next request on the connection goes first."""
    step.behavior.delete_delay_s = 0.5
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            await stream.send_all(
                encode_request(conn, "POST", CHAT, JSON_HEADERS, chat_body(stream=True))
            )
            chat = await read_reply(stream, conn)
            conn.start_next_cycle()
            await stream.send_all(encode_request(conn, "GET", "/ping"))
            ping = await read_reply(stream, conn)
            # the chat is still being deleted while the ping was answered
            assert step.record.chats_deleted == []
        assert sse_text(chat.body) == "Hello world!"
        assert ping.body == b"pong"
        await step.wait_until(lambda r: r.chats_deleted == r.chats_created)


async def test_shutdown_waits_for_pending_cleanup(
    relay_factory: RelayFactory, step: StepEmulator
) -> None:
    """A relay that stops right after an answer still deletes the chat before serve() returns."""
    step.behavior.delete_delay_s = 0.3
    relay = await relay_factory()
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            await stream.send_all(
                encode_request(conn, "POST", CHAT, JSON_HEADERS, chat_body(stream=False))
            )
            reply = await read_reply(stream, conn)
        assert reply.status == 200
        # the handler leaves the chat right after replying: poll the relay's counter
        while not relay.app.janitor.pending:  # noqa: ASYNC110
            await trio.sleep(0.001)
        assert step.record.chats_deleted == []  # DelChat is under way (0.3 s)
        relay.app.shutdown()
        await relay.app.stopped.wait()
    assert step.record.chats_deleted == step.record.chats_created
    assert relay.app.janitor.pending == 0


async def test_a_janitor_cancelled_from_outside_refuses_jobs_it_can_no_longer_run() -> None:
    """A relay cancelled as a whole (not shut down) unwinds requests after the
    janitor's nursery is gone: their cleanup must be refused (and run by the
    caller), not crash with 'Nursery is closed to new arrivals'."""
    janitor = Janitor()
    ran: list[str] = []

    async def job() -> None:
        ran.append("job")

    async with trio.open_nursery() as nursery:
        await nursery.start(janitor.run)
        nursery.cancel_scope.cancel()
    assert janitor.defer(job) is False
    assert janitor.pending == 0
    assert ran == []
