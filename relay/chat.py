"""The chat service: from a neutral request to a streamed or whole answer.

Theory of operation
-------------------
The service speaks no client wire format: a :class:`relay.dialects.Dialect`
(the route's) gives it a stream encoder or a whole-answer builder, and the
service hands those neutral batches of events; the bytes they return are the
dialect's. So the service knows accounts, providers, commits, keep-alives
and failover, and nothing of OpenAI's or anyone's JSON.

:func:`complete` runs one request through *attempts*. Each attempt leases an
account (:mod:`relay.accounts`), gets its session, opens the provider's chat
context (files uploaded, conversation created, upstream stream open) and
serves the answer. Leaving the chat context always deletes the upstream
conversation, shielded and bounded, whatever happened. An auth failure (401)
or a busy account (429) moves to the next account, but only while nothing has
been sent to the client.

What web chats cannot do is done here, the same for every provider and
dialect. Tools, tool-call history and a JSON format are rendered into the
prompt (:func:`protocol.toolcalls.render_agent_prompt`; the provider sees
plain messages), and the answer passes through an
:class:`~protocol.shaping.AnswerShaper` (:class:`ShapedAnswer`): the client's
stop sequences and token limit, tool calls parsed out of the text, the JSON
document cut out of prose and fences. A stop or the limit ends the answer
early: the upstream is not read further and the conversation is deleted as
always. A whole (non-streamed) structured answer that is not the JSON asked
for is a 502 ``invalid_json_output`` showing the text. The dialect is given
the client's request as it was sent (its usage counts what the client asked).

The whole of it runs inside :meth:`Exchange.watch_disconnect`: if the client
goes away, the scope is cancelled, the upstream read stops at once, and the
cleanup still runs.

Streaming (:class:`SSEWriter`), one task and one write path (DESIGN.md,
"The streaming data path"):

- The 200 is committed deliberately. We wait for the first upstream event so
  that a failure that comes first (bad token, upstream 5xx) can still become
  a real status code. The first events then leave at once, in the same write
  as the response head and the role chunk.
- The task that reads the upstream also writes. The upstream answer is
  decoded one HTTP chunk at a time, so the events of one upstream read come
  as several batches; each batch's SSE bytes are kept, and all of them leave
  in one ``send_all`` just before the upstream socket is read again
  (:data:`relay.netio.before_read`, the writer's hook). Nothing is kept past
  that read, and a client slower than the upstream makes the next read wait
  (``send_all`` blocks): real back-pressure, no queue. A read bigger than
  :data:`SLICE_BATCHES` batches (a burst) leaves in slices of that many, so
  that its first events do not wait for the whole read to be decoded.
- If the upstream is silent for ``commit_timeout`` (search and thinking can
  take long), the stream's clock (:meth:`SSEWriter.start_clock`) commits
  anyway and from then on sends an SSE comment after every
  ``sse_keepalive`` seconds of silence, so that proxies and clients do not
  time out. Its deadline is a :mod:`relay.timers` entry, looked at when it
  rings (once per ``sse_keepalive`` on a busy stream, never per event), and
  a task is started for the write only when the silence is due; a
  ``trio.Lock`` keeps its writes and the reader's apart.
- Once the stream has started, failures travel in-band as the dialect's
  error event and end of stream (OpenAI: ``data: {"error": ...}`` and
  ``[DONE]``), never as answer text.
- A stream still running when the server's grace period ends is stopped
  (:meth:`relay.server.Exchange.stop`): its work is cancelled like a
  client's leaving (the conversation is deleted, the account released), and
  the server then writes the writer's :meth:`SSEWriter.last_words`: the
  dialect's error event with code ``server_shutting_down`` and its end. A client that
  stops reading is cut by the server's ``send_timeout`` (a write raises
  ClientGone), which ends the stream the same way, unwritten.

Not streaming: the deltas are accumulated into the dialect's one body (OpenAI:
a ``chat.completion``); an upstream error becomes its HTTP status.

The passthrough fast path (:func:`_pass_through`): OpenAI chat completions in
and out, and a provider that offers :class:`~providers.contract.Passthrough`
(an OpenAI-compatible upstream). The client's body goes up, and the
upstream's answer comes back as its own bytes: the provider cuts them at
event boundaries and rewrites the model name where it differs, and each
upstream read's events leave through the same :class:`SSEWriter` (one write
per read, commit timeout, keep-alives, send timeout, shutdown's last words),
with no JSON decoded or encoded per chunk here. Leasing and failover are
:func:`with_account`'s, as for every chat: the provider raises 401, 403 and
429 before any byte, and another key is tried; any other upstream status
reaches the client with the upstream's own body. An error the upstream sends
in-band as its stream's first event, under its 200, is taken as it would be
in the response head while nothing was sent yet
(:meth:`~providers.contract.RawAnswer.leading_error`): an HTTP error with its
status and fields, another key for a 401, 403 or 429; the neutral path does
the same with its first UpstreamError (:func:`_leading_error`), in the
dialect's shape. A stream that breaks after it started (the commit timeout's
head counts) ends with an in-band error and ``[DONE]``, as on the neutral
path.
"""

from __future__ import annotations

import logging
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import trio

from protocol.chunks import estimate_tokens
from protocol.deltas import Delta, Finish, UpstreamError
from protocol.errors import (
    AuthError,
    NoAccountFree,
    RateLimited,
    RelayError,
    ServerShuttingDown,
    UpstreamFailed,
    UpstreamTimeout,
)
from protocol.openai import prompt_tokens
from protocol.shaping import AnswerShaper, json_output_error
from protocol.toolcalls import needs_rendering, render_agent_prompt
from providers.contract import Passthrough
from relay.dialects.openai_chat import OPENAI_CHAT, PassthroughStream
from relay.netio import before_read
from relay.server import ClientGone
from relay.timers import SLACK_S, coarse_timers

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

    from protocol.openai import ChatRequest, ResponseFormat
    from providers.contract import ChatStream, RawAnswer, SessionT
    from relay.accounts import Account
    from relay.config import Settings
    from relay.dialects import Dialect, StreamEncoder, WholeAnswer
    from relay.registry import ProviderRuntime
    from relay.server import Exchange

log = logging.getLogger("relay.chat")

SSE_HEADERS = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
#: the account is at fault: another may do (403: an API key without the right)
RETRY_STATUSES = (401, 403, 429)
#: SSE batches (one per upstream HTTP chunk) of one upstream read written
#: together at most: a bigger read (a burst) leaves in slices of this many
SLICE_BATCHES = 32
#: ... and bytes: no slice grows past this
SLICE_BYTES = 64 * 1024

T = TypeVar("T")
AnswerT = TypeVar("AnswerT")
EncoderT = TypeVar("EncoderT", bound="StreamEncoder")


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
    provider: str = ""
    model: str = ""
    stream: bool = False
    #: estimated, as the answer's ``usage`` (0: not known)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: how the answer ended: ``done``, ``stop`` (a stop sequence), ``length``,
    #: ``upstream_error``, ``timeout`` ("": not known here; the access log decides)
    end: str = ""
    #: told the seconds between two writes of a stream (the inter-chunk gap metric)
    gap_observer: Callable[[float], None] | None = field(default=None, repr=False)


def _ending(batch: Sequence[Delta]) -> str:
    """The end reason a batch that finished an answer gives (:attr:`Outcome.end`)."""
    for delta in reversed(batch):
        if isinstance(delta, UpstreamError):
            return "timeout" if delta.status == 504 else "upstream_error"
        if isinstance(delta, Finish):
            if delta.reason == "length":
                return "length"
            return "stop" if delta.stop_sequence else "done"
    return "done"


def _count_usage(outcome: Outcome, batch: Sequence[Delta]) -> bool:
    """Take the upstream's own token counts from the batch's Finish, if it has them.

    Returns:
        Whether it had them (else the outcome keeps the relay's estimates).
    """
    for delta in reversed(batch):
        if isinstance(delta, Finish) and delta.usage is not None:
            outcome.prompt_tokens = delta.usage.input_tokens
            outcome.completion_tokens = delta.usage.output_tokens
            return True
    return False


def _failure_end(exc: RelayError) -> str:
    return "timeout" if exc.status == 504 else "upstream_error"


def _with_request_id(delta: UpstreamError, request_id: str) -> UpstreamError:
    """``delta`` naming the request, so that an in-band error can be found in the logs."""
    return UpstreamError(delta.code, f"{delta.message} (request id {request_id})", delta.status)


class _Retry(Exception):
    """An attempt failed in a way another account may fix."""

    def __init__(self, error: RelayError) -> None:
        super().__init__(error.message)
        self.error = error


class SSEWriter:
    """Writes one SSE response: commit, events, keep-alives, end (module docstring).

    The reading task calls :meth:`send` per batch and :meth:`end` once; the
    batches kept since the last write leave before the next upstream read
    (:meth:`before_read`), or as soon as they make a slice. The clock
    (:meth:`start_clock`) writes from a task of its own, only when silence
    is due.
    """

    def __init__(
        self,
        ex: Exchange,
        encoder: StreamEncoder,
        settings: Settings,
        gap_observer: Callable[[float], None] | None = None,
    ) -> None:
        self._ex = ex
        self._observe_gap = gap_observer
        self._encoder = encoder
        self._settings = settings
        self._kept: list[bytes] = []
        self._kept_size = 0
        self._lock = trio.Lock()  # the reader's writes and the clock's
        self._reader = trio.lowlevel.current_task()
        self._last_write = trio.current_time()
        self._nursery: trio.Nursery | None = None  # where the clock's writes run
        self.request_id = ex.request.request_id
        ex.last_words = self.last_words

    @property
    def committed(self) -> bool:
        """True once the 200 is on its way: from then on failures go in-band."""
        return self._ex.started

    def last_words(self) -> bytes:
        """The bytes that end this stream if the server stops it (Exchange.stop).

        What was kept and not written, then the dialect's in-band error
        (code ``server_shutting_down``) and end of stream. Called once,
        after the stream's tasks are gone.
        """
        data = b"".join(self._kept)
        self._kept.clear()
        error = ServerShuttingDown("the server is shutting down; the answer is incomplete "
                                   f"(request id {self.request_id})",
                                   code="server_shutting_down")
        return data + self._encoder.last_words(error)

    async def send(self, data: bytes) -> None:
        """Keep one batch's SSE bytes for the next write; the first batch commits the 200.

        The first batch is written at once, after the head and the role
        chunk; later ones when the upstream is read again, or now if they
        make a slice (:data:`SLICE_BATCHES`, :data:`SLICE_BYTES`).
        """
        if not self._ex.started:
            await self._write(data)
            return
        if data:
            self._kept.append(data)
            self._kept_size += len(data)
            if len(self._kept) >= SLICE_BATCHES or self._kept_size >= SLICE_BYTES:
                await self._write(b"")

    async def before_read(self) -> None:
        """Write what the last upstream read gave (relay.netio's hook, in the reading task)."""
        if self._kept and trio.lowlevel.current_task() is self._reader:
            await self._write(b"")

    async def end(self, data: bytes) -> None:
        """Write what is kept and the last SSE bytes, and complete the response."""
        await self._write(data, end=True)

    async def _write(self, data: bytes, *, end: bool = False) -> None:
        """One write: the head if not sent yet, what is kept, then ``data``."""
        lock = self._lock
        if lock.locked():  # the clock is writing a keep-alive
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            kept = self._kept
            if kept:
                kept.append(data)
                data = b"".join(kept)
                kept.clear()
                self._kept_size = 0
            ex = self._ex
            opened = ex.started  # a write after the first: its gap is measured
            if not opened:
                encoder = self._encoder
                first = encoder.start() + data
                await ex.start_stream(200, encoder.content_type, SSE_HEADERS, first=first,
                                      end=end)
            elif end:
                await ex.end_stream(data)
            else:
                await ex.send_data(data)
        finally:
            lock.release()
        now = trio.current_time()
        if opened and self._observe_gap is not None:
            self._observe_gap(now - self._last_write)
        self._last_write = now

    def start_clock(self, nursery: trio.Nursery) -> None:
        """Keep the stream's silence short from now on, writing from ``nursery``'s tasks.

        Commit after ``commit_timeout`` without an event; once committed, a
        comment after every ``sse_keepalive`` seconds without a write. The
        deadline is a :mod:`relay.timers` entry (no task waits for it, no
        cancel scope per stream): when it rings, :meth:`expire` looks at the
        silence since the last write, sets the timer again if some write came
        meanwhile, and only if the silence is due starts a task for the write.
        """
        self._nursery = nursery
        self._arm()

    def stop_clock(self) -> None:
        """Forget the deadline (the stream is over)."""
        coarse_timers().cancel(self)
        self._nursery = None

    def _allowed(self) -> float:
        s = self._settings
        return s.sse_keepalive if self._ex.started else s.commit_timeout

    def _arm(self) -> None:
        allowed = self._allowed()
        coarse_timers().set(self, self._last_write + allowed, slack=min(SLACK_S, allowed / 4))

    def expire(self) -> None:
        """The deadline came (relay.timers): a write of the clock's, or a later deadline."""
        if self._nursery is None:
            return
        if trio.current_time() < self._last_write + self._allowed():
            self._arm()  # written since: silence is due later
        else:
            self._nursery.start_soon(self._fill_silence)

    async def _fill_silence(self) -> None:
        """Commit with the head alone, or write a keep-alive comment; then set the timer again."""
        ex = self._ex
        try:
            async with self._lock:  # a write in progress ends before we look again
                if trio.current_time() >= self._last_write + self._allowed():
                    if ex.started:
                        await ex.send_data(self._encoder.keepalive())
                    else:
                        await ex.start_stream(200, self._encoder.content_type, SSE_HEADERS,
                                              first=self._encoder.start())
                    self._last_write = trio.current_time()
        except ClientGone:
            ex.abandon()
            return
        if self._nursery is not None:
            self._arm()


def _serve_stream(
    ex: Exchange,
    answer: ChatStream,
    encoder: StreamEncoder,
    settings: Settings,
    outcome: Outcome,
    started_at: float,
) -> Awaitable[None]:
    """``answer`` to the client as ``encoder``'s SSE (:func:`_write_stream` with :func:`_pump`).

    Not a coroutine function itself: an idle stream holds one frame less (issue 13).
    """
    return _write_stream(ex, answer, encoder, settings, outcome, started_at, _pump)


async def _write_stream(
    ex: Exchange,
    answer: AnswerT,
    encoder: EncoderT,
    settings: Settings,
    outcome: Outcome,
    started_at: float,
    pump: Callable[[AnswerT, EncoderT, SSEWriter, Outcome, float], Awaitable[None]],
) -> None:
    """Run ``pump`` with an :class:`SSEWriter`: its clock running, its hook on the reads.

    The pump gets its arguments here rather than in a closure (which an idle
    stream would hold, issue 13). A failure of the pump is raised as it is,
    outside the writer's nursery.
    """
    writer = SSEWriter(ex, encoder, settings, outcome.gap_observer)
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        writer.start_clock(nursery)
        hook = before_read.set(writer.before_read)
        try:
            await pump(answer, encoder, writer, outcome, started_at)
        except (RelayError, _Retry, ClientGone) as exc:
            failure = exc  # raised outside the nursery, unwrapped
        finally:
            before_read.reset(hook)
            writer.stop_clock()
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _pump(
    answer: ChatStream,
    encoder: StreamEncoder,
    writer: SSEWriter,
    outcome: Outcome,
    started_at: float,
) -> None:
    """Upstream batches -> SSE bytes -> client, one write per upstream read."""
    data = b""
    counted = False  # the upstream's own token counts are in the outcome
    request_id = writer.request_id
    try:
        async with aclosing(answer.__aiter__()) as batches:
            async for batch in batches:
                if batch and type(batch[-1]) is UpstreamError:
                    batch = [*batch[:-1], _with_request_id(batch[-1], request_id)]
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
                    outcome.end = _ending(batch)
                    counted = _count_usage(outcome, batch)
                    break
                await writer.send(data)
            else:
                outcome.end = "upstream_error"
                data = encoder.encode([UpstreamError(
                    "truncated",
                    f"upstream stream ended without an answer (request id {request_id})")])
    except RelayError as exc:
        if not writer.committed:
            raise
        log.warning("upstream failed mid-stream: %s", exc)
        outcome.end = _failure_end(exc)
        data = encoder.encode([_with_request_id(delta_from_error(exc), request_id)])
    if not counted:
        outcome.completion_tokens = _completion_tokens(encoder)
    await writer.end(data)


def _completion_tokens(encoder: StreamEncoder) -> int:
    """The encoder's estimate of the answer's tokens, if it keeps one (0 if not)."""
    count = getattr(encoder, "completion_tokens", None)
    if count is None:
        count = getattr(encoder, "output_tokens", 0)
    return count if isinstance(count, int) else 0


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
    acc: WholeAnswer,
    outcome: Outcome,
    started_at: float,
    response_format: ResponseFormat | None,
) -> None:
    async with aclosing(answer.__aiter__()) as batches:
        async for batch in batches:
            if outcome.first_event_s is None:
                outcome.first_event_s = trio.current_time() - started_at
            outcome.chunks += 1
            acc.add(batch)
            if acc.error is not None:
                outcome.end = _ending([acc.error])
                error = error_from_delta(acc.error)
                if acc.error.status in RETRY_STATUSES and not acc.text:
                    raise _Retry(error)
                raise error
            if acc.finished:
                outcome.end = _ending(batch)
                break
        else:
            outcome.end = "upstream_error"
            raise UpstreamFailed("upstream stream ended without an answer", code="truncated")
    if not _count_usage(outcome, batch):
        outcome.completion_tokens = estimate_tokens(acc.text)
    if response_format is not None:
        problem = json_output_error(acc.text, response_format)
        if problem is not None:
            raise UpstreamFailed(
                f"the model's answer is not the JSON asked for ({problem}); its text was: "
                f"{_clip(acc.text, JSON_TEXT_SHOWN)}",
                code="invalid_json_output",
            )
    await ex.respond(200, acc.answer(answer.conversation_id))


#: how much of a non-JSON answer a 502 invalid_json_output shows
JSON_TEXT_SHOWN = 1000


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


class ShapedAnswer:
    """An upstream answer seen through an :class:`~protocol.shaping.AnswerShaper`.

    The shaper applies what web chats cannot: the client's stop sequences,
    its token limit, tool calls parsed out of the text, the JSON document
    cut out of a structured answer. Once the shaper has ended the answer
    (a stop sequence, the limit), the upstream is not read any further:
    leaving the iteration closes it, and the provider's chat context then
    deletes the conversation as always.
    """

    def __init__(self, answer: ChatStream, shaper: AnswerShaper) -> None:
        self._answer = answer
        self._shaper = shaper

    @property
    def conversation_id(self) -> str:
        """The upstream conversation (the answer's)."""
        return self._answer.conversation_id

    async def __aiter__(self) -> AsyncGenerator[list[Delta], None]:
        """The shaped batches; a batch the shaper holds back entirely is skipped."""
        shaper = self._shaper
        async with aclosing(self._answer.__aiter__()) as batches:
            async for batch in batches:
                shaped = shaper.feed(batch)
                if shaped:
                    yield shaped
                if shaper.done:
                    return


async def complete(
    ex: Exchange,
    dialect: Dialect,
    runtime: ProviderRuntime[SessionT],
    accounts: Sequence[Account],
    request: ChatRequest,
    settings: Settings,
    outcome: Outcome,
    body: bytes | None = None,
) -> None:
    """Serve one chat request (stream or not) in ``dialect``, with account failover.

    See :func:`with_account` for the failover rules; nothing moves to another
    account once bytes were sent to the client. With the client's ``body``,
    OpenAI chat completions go to a provider that offers
    :class:`~providers.contract.Passthrough` by the fast path
    (:func:`_pass_through`).
    """
    model = request.model or runtime.provider.default_model
    started_at = trio.current_time()
    outcome.provider = runtime.provider.name
    outcome.model = model
    outcome.stream = request.stream
    outcome.prompt_tokens = prompt_tokens(request)
    provider = runtime.provider
    fast = provider if dialect is OPENAI_CHAT and isinstance(provider, Passthrough) else None

    async def attempt(session: SessionT) -> None:
        try:
            if fast is not None and body is not None:
                await _pass_through(ex, fast, session, body, request, settings, outcome,
                                    started_at)
            else:
                await _attempt(ex, dialect, runtime, request, model, session, settings,
                               outcome, started_at)
        except _Retry as retry:
            raise retry.error from None

    async with ex.watch_disconnect():
        # a kept conversation's follow-up goes to the account that owns it (any instance's)
        accounts = await runtime.pool.for_conversation(accounts, request)
        await with_account(runtime, accounts, attempt, outcome, retryable=lambda: not ex.started)


async def _attempt(
    ex: Exchange,
    dialect: Dialect,
    runtime: ProviderRuntime[SessionT],
    request: ChatRequest,
    model: str,
    session: SessionT,
    settings: Settings,
    outcome: Outcome,
    started_at: float,
) -> None:
    async with open_answer(runtime, session, request, outcome) as answer:
        await _answer(ex, dialect, runtime, request, model, answer, settings, outcome,
                      started_at)
        outcome.conversation = answer.conversation_id


@asynccontextmanager
async def open_answer(
    runtime: ProviderRuntime[SessionT],
    session: SessionT,
    request: ChatRequest,
    outcome: Outcome,
) -> AsyncIterator[ChatStream]:
    """The provider's answer to ``request`` on ``session``, for the block (no HTTP in it).

    What web chats cannot do is added here: tools, their history and a JSON
    format go into the prompt, and the answer comes through an
    :class:`~protocol.shaping.AnswerShaper` when the request needs one; not
    for a provider whose upstream does these natively
    (:attr:`~providers.contract.Provider.native_agents`).
    Leaving the block closes the upstream and deletes the conversation (the
    provider's chat context); a conversation the client keeps has its owner
    noted first (:meth:`AccountPool.remember_conversation`), even when the
    block is left by cancellation. :func:`complete` and :class:`relay.Relay`
    both answer through here, inside :func:`with_account`.
    """
    native = runtime.provider.native_agents  # the upstream does tools and formats itself
    upstream_request = (render_agent_prompt(request)
                        if not native and needs_rendering(request) else request)
    async with runtime.provider.chat(session, upstream_request) as upstream:
        answer: ChatStream = upstream
        if not native and AnswerShaper.needed(request):
            answer = ShapedAnswer(upstream, AnswerShaper(request))
        outcome.conversation = answer.conversation_id
        try:
            yield answer
        finally:
            with trio.CancelScope(shield=True):
                await runtime.pool.remember_conversation(
                    upstream_request, answer.conversation_id, outcome.account)


def _answer(
    ex: Exchange,
    dialect: Dialect,
    runtime: ProviderRuntime[SessionT],
    request: ChatRequest,
    model: str,
    answer: ChatStream,
    settings: Settings,
    outcome: Outcome,
    started_at: float,
) -> Awaitable[None]:
    """Serve ``answer`` in ``dialect``, streamed or whole.

    Not a coroutine function itself: an idle stream holds one frame less (issue 13).
    """
    if request.stream:
        encoder = dialect.stream(
            request,
            model=model,
            conversation_id=answer.conversation_id,
            reasoning=settings.reasoning,
            citation_line=runtime.provider.citation_line,
        )
        return _serve_stream(ex, answer, encoder, settings, outcome, started_at)
    whole = dialect.whole(request, model=model, reasoning=settings.reasoning)
    return _serve_whole(ex, answer, whole, outcome, started_at, request.response_format)


async def _pass_through(
    ex: Exchange,
    provider: Passthrough[SessionT],
    session: SessionT,
    body: bytes,
    request: ChatRequest,
    settings: Settings,
    outcome: Outcome,
    started_at: float,
) -> None:
    """The fast path (module docstring): the upstream's answer to ``body``, as it is."""
    async with provider.passthrough(session, body, request) as answer:
        if answer.streamed:
            await _serve_raw(ex, answer, settings, outcome, started_at)
            return
        data = await answer.body()  # a whole answer, or the upstream's error as it sent it
        outcome.first_event_s = trio.current_time() - started_at
        outcome.chunks += 1
        if answer.status >= 500:
            outcome.end = "timeout" if answer.status == 504 else "upstream_error"
        await ex.respond(answer.status, data, answer.content_type)


def _serve_raw(
    ex: Exchange, answer: RawAnswer, settings: Settings, outcome: Outcome, started_at: float
) -> Awaitable[None]:
    """The upstream's events to the client: :func:`_serve_stream` without encoding."""
    return _write_stream(ex, answer, PassthroughStream(), settings, outcome, started_at, _pump_raw)


async def _pump_raw(
    answer: RawAnswer,
    encoder: PassthroughStream,
    writer: SSEWriter,
    outcome: Outcome,
    started_at: float,
) -> None:
    """Upstream events -> client, one write per upstream read; the last with the end."""
    data = b""
    try:
        async with aclosing(answer.events()) as events:
            async for data in events:
                if outcome.first_event_s is None:
                    outcome.first_event_s = trio.current_time() - started_at
                if not writer.committed:
                    error = answer.leading_error(data)
                    if error is not None:  # nothing sent yet: it can have its own status
                        outcome.end = _failure_end(error)
                        raise error
                outcome.chunks += 1
                if answer.done:
                    break  # the end goes out in the same write as these events
                await writer.send(data)
            else:
                data = b""
        outcome.end = "done"
        data += encoder.end()
    except RelayError as exc:
        if not writer.committed:
            raise
        log.warning("upstream failed mid-stream: %s", exc)
        outcome.end = _failure_end(exc)
        data = encoder.fail(f"{exc.message} (request id {writer.request_id})",
                            exc.code or exc.kind)
    await writer.end(data)


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
    with a fresh login (when the provider's sessions can be renewed:
    :attr:`~providers.contract.Provider.renews_sessions`), then rests it and
    moves on; a rate-limited one (:class:`~protocol.errors.RateLimited`, an
    API key's 429) rests at once; a busy account (429)
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
        # only the lease's own NoAccountFree (no account left) ends the search
        # here; one the work raises once leased is the work's failure
        leased = False
        try:
            async with runtime.pool.lease(accounts, tried) as account:
                leased = True
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
                    if exc.status in (401, 403):
                        await runtime.pool.evict(account, session)
                        if account not in relogged and runtime.provider.renews_sessions:
                            relogged.add(account)  # same account, fresh login
                            continue
                        await runtime.pool.rest(account, exc.message)
                    elif isinstance(exc, RateLimited):  # an API key limited for a while
                        await runtime.pool.rest(account, exc.message)
                    else:
                        log.info("%s account %s is busy: %s", runtime.provider.name,
                                 account.id, exc.message)
                    tried.add(account)
        except NoAccountFree:
            if leased:
                raise
            if last_error is not None:
                raise last_error from None
            raise
