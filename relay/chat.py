"""Chat completions: from a parsed request to a streamed or whole answer.

Theory of operation
-------------------
:func:`complete` runs one request through *attempts*. Each attempt leases an
account (:mod:`relay.accounts`), gets its session, opens the provider's chat
context (files uploaded, conversation created, upstream stream open) and
serves the answer. Leaving the chat context always deletes the upstream
conversation, shielded and bounded, whatever happened. An auth failure (401)
or a busy account (429) moves to the next account, but only while nothing has
been sent to the client.

The whole of it runs inside :meth:`Exchange.watch_disconnect`: if the client
goes away, the scope is cancelled, the upstream read stops at once, and the
cleanup still runs.

Streaming (:class:`SSEWriter`):

- The 200 is committed deliberately. We wait for the first upstream event so
  that a failure that comes first (bad token, upstream 5xx) can still become
  a real status code. The first events then leave in the same write as the
  response head and the role chunk.
- If the upstream is silent for ``commit_timeout`` (search and thinking can
  take long), the flusher (below) commits anyway and from then on sends an
  SSE comment every ``sse_keepalive`` seconds of silence, so that proxies
  and clients do not time out. The flusher keeps that clock (one task
  besides the reader, not two), and the deadline itself is a
  :mod:`relay.timers` entry, re-armed only when it rings: a wake-up for
  data costs no timer.
- Hot path: the task that reads the upstream encodes each batch of deltas
  and queues the bytes; a flusher task writes whatever is queued with one
  ``send_all``. When the upstream is slow, that is one write per event, as
  soon as it is decoded; when it is fast (or the relay is busy), the events
  that arrived in one socket read leave in one write instead of one write
  each, so the cost per event falls as load rises instead of the relay
  falling behind. After a quiet spell, with the relay idle, the reader
  writes an event itself (no task switch); a ``_busy`` flag keeps the two
  writers apart, so no lock is needed; a client slower than the upstream
  makes the reader wait once ``WRITE_HIGH_WATER`` bytes are queued.
- Once the stream has started, failures travel in-band as an SSE error event
  followed by ``[DONE]``, never as answer text.
- A stream still running when the server's grace period ends is stopped
  (:meth:`relay.server.Exchange.stop`): its work is cancelled like a
  client's leaving (the conversation is deleted, the account released), and
  the server then writes the writer's :meth:`SSEWriter.last_words`: what was
  queued, an error event with code ``server_shutting_down``, and ``[DONE]``.
  A client that stops reading is cut by the server's ``send_timeout``
  (a write raises ClientGone), which ends the stream the same way, unwritten.

Not streaming: the deltas are accumulated into one ``chat.completion`` body;
an upstream error becomes its HTTP status.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import trio

from protocol.chunks import DONE
from protocol.deltas import Delta, Finish, UpstreamError
from protocol.errors import (
    AuthError,
    NoAccountFree,
    RelayError,
    ServerShuttingDown,
    UpstreamFailed,
    UpstreamTimeout,
)
from protocol.openai import (
    ChunkEncoder,
    CompletionAccumulator,
    error_from_exception,
    prompt_tokens,
)
from relay.server import ClientGone
from relay.timers import SLACK_S, CoarseTimers, coarse_timers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from protocol.openai import ChatRequest
    from providers.contract import ChatStream, SessionT
    from relay.accounts import Account
    from relay.config import Settings
    from relay.registry import ProviderRuntime
    from relay.server import Exchange

log = logging.getLogger("relay.chat")

SSE_HEADERS = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
SSE_CONTENT_TYPE = b"text/event-stream; charset=utf-8"
RETRY_STATUSES = (401, 429)
#: queued SSE bytes past which the upstream reader waits for the client
WRITE_HIGH_WATER = 256 * 1024
#: an event this long after the previous one is written at once, not queued
DIRECT_AFTER_S = 0.0005
#: how long one look at trio's run queue stands for "the relay is busy": the
#: look (trio.lowlevel.current_statistics) walks every registered socket, about
#: 50 us with 600 of them on a small VM, too dear to take per event
BUSY_LOOK_S = 0.005


class _Load:
    """Whether other tasks are waiting to run, looked up at most every BUSY_LOOK_S."""

    __slots__ = ("_busy", "_looked_at")

    def __init__(self) -> None:
        self._looked_at = -float("inf")
        self._busy = False

    def busy(self, now: float) -> bool:
        """The last look at the run queue, taken again if older than BUSY_LOOK_S."""
        if now - self._looked_at >= BUSY_LOOK_S:
            self._busy = trio.lowlevel.current_statistics().tasks_runnable > 0
            self._looked_at = now
        return self._busy


#: one per trio run (clocks of different runs do not compare)
_LOAD: trio.lowlevel.RunVar[_Load] = trio.lowlevel.RunVar("relay.chat.load")


def _relay_busy(now: float) -> bool:
    """True if, at most BUSY_LOOK_S ago, other tasks were waiting to run."""
    try:
        load = _LOAD.get()
    except LookupError:
        load = _Load()
        _LOAD.set(load)
    return load.busy(now)

T = TypeVar("T")


def error_from_delta(delta: UpstreamError) -> RelayError:
    """The exception a pre-commit upstream error becomes."""
    message = f"upstream error: {delta.message}" if delta.message else "upstream error"
    if delta.status == 401:
        return AuthError(message, code=delta.code)
    if delta.status == 429:
        return NoAccountFree(message, code=delta.code)
    if delta.status == 504:
        return UpstreamTimeout(message, code=delta.code)
    return UpstreamFailed(message, code=delta.code, status=delta.status)


def delta_from_error(exc: RelayError) -> UpstreamError:
    """The in-band error event a post-commit exception becomes."""
    return UpstreamError(exc.code or exc.kind, exc.message, exc.status)


@dataclass
class Outcome:
    """What one request did, for the access log and metrics."""

    account: str = ""
    attempts: int = 0
    conversation: str = ""
    chunks: int = 0
    first_event_s: float | None = None


class _Retry(Exception):
    """An attempt failed in a way another account may fix."""

    def __init__(self, error: RelayError) -> None:
        super().__init__(error.message)
        self.error = error


class SSEWriter:
    """Writes one SSE response: commit, events, keep-alives, end.

    Two ways out, one writer at a time (``_busy``):

    - an event that comes after a quiet spell (``DIRECT_AFTER_S`` since the
      previous one: a paced upstream) while no other task is waiting to run
      (the relay is not busy) is written at once by the task that read it,
      with no task switch in between;
    - events that come back to back (a fast upstream, or a busy relay reading
      several events in one socket read) are *queued*, and a flusher task
      writes everything queued in one ``send_all``, so the cost per event falls
      as the load rises instead of the relay falling behind.
    """

    def __init__(self, ex: Exchange, encoder: ChunkEncoder, settings: Settings) -> None:
        self._ex = ex
        self._encoder = encoder
        self._settings = settings
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._done = trio.Event()
        self._ending = False
        self._started = False  # the response head was written
        self._busy = False  # a write is in progress
        self._rung = False  # the commit or keep-alive deadline came
        self._last_write = self._last_send = trio.current_time()
        #: True once the 200 was asked for: from then on failures go in-band
        self.committed = False
        ex.last_words = self.last_words

    def last_words(self) -> bytes:
        """The bytes that end this stream if the server stops it (Exchange.stop).

        What was queued and not written, then (unless the end is already
        among it) an OpenAI error event with code ``server_shutting_down``
        and ``[DONE]``. Called once, after the stream's tasks are gone.
        """
        data = b"".join(self._pending)
        self._pending.clear()
        if self._ending:
            return data  # the stream's own end ([DONE]) is queued
        error = ServerShuttingDown("the server is shutting down; the answer is incomplete",
                                   code="server_shutting_down")
        return data + b"data: " + error_from_exception(error) + b"\n\n" + DONE

    async def send(self, data: bytes) -> None:
        """Write or queue SSE bytes; the first call commits the 200."""
        self.committed = True
        now = trio.current_time()
        quiet = now - self._last_send >= DIRECT_AFTER_S
        self._last_send = now
        if (quiet and data and self._started and not self._busy and not self._pending
                and not self._ending  # the flusher ends the response
                and not _relay_busy(now)):
            self._busy = True
            try:
                await self._ex.send_data(data)
            finally:
                self._busy = False
                self._last_write = trio.current_time()
            return
        if data:
            self._pending.append(data)
            self._pending_size += len(data)
        self._wake.set()
        if self._pending_size > WRITE_HIGH_WATER:
            await self._drained.wait()

    async def end(self, data: bytes) -> None:
        """Queue the last SSE bytes and wait until the response is complete."""
        self._ending = True
        await self.send(data)
        await self._done.wait()

    async def flusher(self) -> None:
        """Write what is queued until the response ends (or the client goes)."""
        timers = coarse_timers()
        self._arm(timers)
        try:
            await self._flush_loop(timers)
        except ClientGone:
            self._ex.abandon()
        finally:
            timers.cancel(self)

    def expire(self) -> None:
        """The commit or keep-alive deadline came (relay.timers): wake the flusher."""
        self._rung = True
        self._wake.set()

    def _silence_allowed(self) -> float:
        return self._settings.sse_keepalive if self.committed else self._settings.commit_timeout

    def _arm(self, timers: CoarseTimers) -> None:
        """Ring when the silence since the last write runs out."""
        allowed = self._silence_allowed()
        timers.set(self, self._last_write + allowed, slack=min(SLACK_S, allowed / 4))

    async def _flush_loop(self, timers: CoarseTimers) -> None:
        while True:
            # The flusher is also the stream's clock: silence until the
            # deadline commits the 200 (commit_timeout), later silence sends a
            # keep-alive comment (sse_keepalive). The deadline is kept by
            # relay.timers, armed again only when it rings, so that a wake-up
            # for data costs no timer. One task instead of two per open stream.
            await self._wake.wait()
            self._wake = trio.Event()
            rung = self._rung
            if rung:
                self._rung = False
                now = trio.current_time()
                if self._busy:
                    self._last_write = now  # the reading task is writing: no silence
                elif (not self._pending and not self._ending
                      and now >= self._last_write + self._silence_allowed()):
                    if not self.committed:
                        self.committed = True  # commit with the head alone
                    else:
                        self._pending.append(self._encoder.keepalive())
            writing = bool(self._pending) or self._ending or (self.committed and not self._started)
            if writing and await self._write_pending():
                return  # the response is complete
            if rung:
                self._arm(timers)

    async def _write_pending(self) -> bool:
        """Write what is queued in one write (with the head first). True once the end is written."""
        ex = self._ex
        data = b"".join(self._pending) if len(self._pending) != 1 else self._pending[0]
        self._pending.clear()
        self._pending_size = 0
        ending = self._ending
        self._busy = True
        try:
            if not self._started:
                self._started = True
                first = self._encoder.start() + data
                await ex.start_stream(200, SSE_CONTENT_TYPE, SSE_HEADERS, first=first, end=ending)
            elif ending:
                await ex.end_stream(data)
            else:
                await ex.send_data(data)
        finally:
            self._busy = False
        self._last_write = trio.current_time()
        drained, self._drained = self._drained, trio.Event()
        drained.set()
        if ending:
            self._done.set()
        return ending


async def _serve_stream(
    ex: Exchange,
    answer: ChatStream,
    encoder: ChunkEncoder,
    settings: Settings,
    outcome: Outcome,
    started_at: float,
) -> None:
    writer = SSEWriter(ex, encoder, settings)
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.flusher)
        try:
            await _pump(answer, encoder, writer, outcome, started_at)
        except (RelayError, _Retry, ClientGone) as exc:
            failure = exc  # raised outside the nursery, unwrapped
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _pump(
    answer: ChatStream,
    encoder: ChunkEncoder,
    writer: SSEWriter,
    outcome: Outcome,
    started_at: float,
) -> None:
    """Upstream batches -> SSE bytes -> client, one write per upstream read."""
    data = b""
    try:
        async with aclosing(answer.__aiter__()) as batches:
            async for batch in batches:
                if outcome.first_event_s is None:
                    outcome.first_event_s = trio.current_time() - started_at
                if not writer.committed:
                    error = _leading_error(batch)
                    if error is not None:
                        # nothing sent yet: the failure can still have its own status
                        converted = error_from_delta(error)
                        if error.status in RETRY_STATUSES:
                            raise _Retry(converted)
                        raise converted
                    if answer.conversation_id:
                        encoder.completion_id = answer.conversation_id
                data = encoder.encode(batch)
                outcome.chunks += 1
                if encoder.finished:
                    break
                await writer.send(data)
            else:
                data = encoder.encode(
                    [UpstreamError("truncated", "upstream stream ended without an answer")]
                )
    except RelayError as exc:
        if not writer.committed:
            raise
        log.warning("upstream failed mid-stream: %s", exc)
        data = encoder.encode([delta_from_error(exc)])
    await writer.end(data)


def _leading_error(batch: Sequence[Delta]) -> UpstreamError | None:
    """The batch's UpstreamError if no content comes before it."""
    for delta in batch:
        if isinstance(delta, UpstreamError):
            return delta
        if not isinstance(delta, Finish):
            return None
    return None


async def _serve_whole(
    ex: Exchange,
    answer: ChatStream,
    request: ChatRequest,
    model: str,
    settings: Settings,
    outcome: Outcome,
    started_at: float,
) -> None:
    acc = CompletionAccumulator(reasoning=settings.reasoning)
    async with aclosing(answer.__aiter__()) as batches:
        async for batch in batches:
            if outcome.first_event_s is None:
                outcome.first_event_s = trio.current_time() - started_at
            outcome.chunks += 1
            acc.add(batch)
            if acc.error is not None:
                error = error_from_delta(acc.error)
                if acc.error.status in RETRY_STATUSES and not acc.text:
                    raise _Retry(error)
                raise error
            if acc.finished:
                break
        else:
            raise UpstreamFailed("upstream stream ended without an answer", code="truncated")
    body = acc.body(
        completion_id=answer.conversation_id or _new_id(),
        model=model,
        created=int(time.time()),
        prompt_tokens=prompt_tokens(request),
    )
    await ex.respond(200, body)


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


async def complete(
    ex: Exchange,
    runtime: ProviderRuntime[SessionT],
    accounts: Sequence[Account],
    request: ChatRequest,
    settings: Settings,
    outcome: Outcome,
) -> None:
    """Serve one chat completion request (stream or not) with account failover.

    See :func:`with_account` for the failover rules; nothing moves to another
    account once bytes were sent to the client.
    """
    model = request.model or runtime.provider.default_model
    started_at = trio.current_time()

    async def attempt(session: SessionT) -> None:
        try:
            await _attempt(ex, runtime, request, model, session, settings, outcome, started_at)
        except _Retry as retry:
            raise retry.error from None

    async with ex.watch_disconnect():
        await with_account(runtime, accounts, attempt, outcome, retryable=lambda: not ex.started)


async def _attempt(
    ex: Exchange,
    runtime: ProviderRuntime[SessionT],
    request: ChatRequest,
    model: str,
    session: SessionT,
    settings: Settings,
    outcome: Outcome,
    started_at: float,
) -> None:
    async with runtime.provider.chat(session, request) as answer:
        outcome.conversation = answer.conversation_id
        if request.stream:
            encoder = ChunkEncoder(
                completion_id=answer.conversation_id or _new_id(),
                model=model,
                created=int(time.time()),
                reasoning=settings.reasoning,
                include_usage=request.include_usage,
                prompt_tokens=prompt_tokens(request),
                citation_line=runtime.provider.citation_line,
            )
            await _serve_stream(ex, answer, encoder, settings, outcome, started_at)
        else:
            await _serve_whole(ex, answer, request, model, settings, outcome, started_at)
        outcome.conversation = answer.conversation_id


async def iterate(answer: ChatStream) -> AsyncIterator[list[Delta]]:
    """All batches of an answer (a typed helper for tests and tools)."""
    async for batch in answer:
        yield batch


async def with_account(
    runtime: ProviderRuntime[SessionT],
    accounts: Sequence[Account],
    call: Callable[[SessionT], Awaitable[T]],
    outcome: Outcome,
    *,
    retryable: Callable[[], bool] = lambda: True,
) -> T:
    """Run ``call(session)`` on a leased account, failing over to others.

    Chat, image and video generation all go through here: the account is
    leased for the whole call (so per-account stream limits hold), its
    session comes from the pool's cache (single-flight login). An auth
    failure (401) evicts the session and tries the same account once more
    with a fresh login, then rests it and moves on; a busy account (429)
    moves on at once. Any other failure is raised as it is.

    Args:
        runtime: the provider and its account pool.
        accounts: the candidate accounts (from :func:`relay.access.accounts_for`).
        call: the work; it gets the session and may raise RelayError.
        outcome: filled in for the access log.
        retryable: False once the call has sent bytes to the client.

    Returns:
        What ``call`` returned.

    Raises:
        NoAccountFree: no account was free in time (or the last account's
            failure, when every account was tried).
        RelayError: ``call``'s failure.
    """
    tried: set[Account] = set()
    relogged: set[Account] = set()
    last_error: RelayError | None = None
    while True:
        # the stack enters the lease apart from the work, so that only the
        # lease's own NoAccountFree is taken for "no account left"; leaving
        # it releases the account with whatever the work raised
        async with AsyncExitStack() as stack:
            try:
                account = await stack.enter_async_context(runtime.pool.lease(accounts, tried))
            except NoAccountFree:
                if last_error is not None:
                    raise last_error from None
                raise
            outcome.account = account.id
            outcome.attempts += 1
            try:
                session = await runtime.pool.session(account)
            except AuthError as exc:  # login refused: the pool rested the account
                tried.add(account)
                last_error = exc
                continue
            try:
                return await call(session)
            except RelayError as exc:
                if exc.status not in RETRY_STATUSES or not retryable():
                    raise
                last_error = exc
                if exc.status == 401:
                    runtime.pool.evict(account, session)
                    if account not in relogged:
                        relogged.add(account)  # same account, fresh login
                        continue
                    runtime.pool.rest(account, exc.message)
                else:
                    log.info("%s account %s is busy: %s", runtime.provider.name,
                             account.id, exc.message)
                tried.add(account)
