"""The relay inside another trio program: served on a port, or asked in process.

What :mod:`relay` exports comes from here (and from :mod:`relay.config` and
:mod:`protocol`); the README's "Embedding it in a trio program" shows it at work.

- :func:`settings` builds a :class:`~relay.config.Settings` in code. Unlike
  ``relay serve``, it reads no ``RELAY_*`` variable and no ``RELAY_CONFIG``
  file unless asked to (``from_environ=True``): a library must not pick up
  the host process's environment by accident.
- :func:`serve` runs the HTTP relay in the caller's nursery
  (``addresses = await nursery.start(relay.serve, settings)``). Cancelling
  it is a graceful stop, as SIGTERM is for ``relay serve``: no new
  connection is taken, answers in flight get ``grace_period`` to end (then
  they are ended with an in-band error), their upstream conversations are
  deleted, and only then does it return.
- :class:`Relay` is the chat service without HTTP, an async context
  manager: ``Relay.chat(request)`` is an async iterator of the neutral
  events (:mod:`protocol.deltas`), with the same account leasing, failover,
  per-account stream limits, answer shaping (tools, JSON formats, stop,
  max_tokens) and conversation cleanup as a request through the server.
- :func:`start_app` is what all of them and the CLI share: the
  :class:`~relay.app.App` for some settings, with the built-in emulators
  started first when ``settings.demo`` is on.

A chat, seen from the caller
----------------------------
Nothing runs until the first event is asked for. Then an account is leased
and the upstream answer opened in a task of the :class:`Relay`'s own; the
events come through an unbuffered channel, so the upstream is read only as
fast as the caller takes them. Until the first event has been handed over,
a failure is raised (:class:`~protocol.errors.RelayError`: 401 and 429 move
to the next account first, as over HTTP); once events have come, the last
one is :class:`~protocol.deltas.Finish` or
:class:`~protocol.deltas.UpstreamError`, as on an SSE stream.

Leaving early ends the answer: ``aclose()`` (or leaving ``async with
relay.chat(...)``), a cancelled wait for the next event, or dropping the
iterator (a ``break`` out of ``async for`` over ``relay.chat(...)``, once
nothing refers to it) cancels the task; its upstream read stops, the
account is released and the conversation deleted (shielded and bounded,
by the janitor when it runs), as when an HTTP client hangs up. Leaving the
:class:`Relay` ends every chat still open the same way.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
import trio

from protocol.deltas import Finish, UpstreamError
from protocol.errors import AuthError, RelayError, ServerShuttingDown
from protocol.openai import ChatRequest, check_file_count, parse_chat_request
from relay.accounts import connected as accounts_connected
from relay.app import App
from relay.chat import (
    Outcome,
    _leading_error,
    delta_from_error,
    error_from_delta,
    open_answer,
    with_account,
)
from relay.config import load as load_settings
from relay.registry import ENTRIES, start_emulators

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Mapping, Sequence
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType
    from typing import Any

    from protocol.deltas import Delta
    from protocol.urls import Origin
    from relay.accounts import Account
    from relay.config import Settings
    from relay.registry import Entries, Entry, ProviderRuntime

log = logging.getLogger("relay.embed")

__all__ = ["Chat", "Relay", "serve", "settings", "start_app"]


# --- settings ------------------------------------------------------------------------------


def settings(
    values: Mapping[str, object] | None = None,
    /,
    *,
    from_environ: bool = False,
    config_file: str | None = None,
    **more: object,
) -> Settings:
    """Settings built in code: defaults < ``config_file`` < environment (if asked) < values.

    Values are Python values or strings, by field name (``relay settings``
    lists them): ``relay.settings(port=0, glm_tokens=["..."], demo=True)``.
    ``None`` values are skipped (the default stays).

    Args:
        values: settings by name (merged with ``more``, which wins).
        from_environ: also read the ``RELAY_*`` variables of this process
            (and the TOML file ``RELAY_CONFIG`` names), as ``relay serve`` does;
            by default the environment is not looked at.
        config_file: a TOML settings file to start from.
        **more: settings by name.

    Raises:
        ConfigError: an unknown name, a value that does not convert, or one
            that cannot be used (the message names it).
    """
    merged = {**(values or {}), **more}
    environ: Mapping[str, str] = os.environ if from_environ else {}
    return load_settings(merged, config_file=config_file, environ=environ)


# --- the app, with the demo's emulators ------------------------------------------------------


async def start_app(
    settings: Settings,
    nursery: trio.Nursery,
    *,
    providers: Sequence[Entry | Entries] = ENTRIES,
    upstream_ssl_context: ssl.SSLContext | None = None,
) -> App:
    """The :class:`~relay.app.App` for ``settings``; in demo mode, its emulators first.

    With ``settings.demo``, every provider's emulator is started in
    ``nursery`` (it serves until that nursery is cancelled), and the app's
    settings point at them (``app.settings``), with their accounts as the
    server-side ones; their loopback file URLs are trusted by the fetcher.
    ``relay serve --demo``, :func:`serve` and :class:`Relay` all start here.

    The app is not serving yet: use it as an async context manager (it
    closes the upstream connections) and run :meth:`App.serve`.

    Raises:
        ConfigError: a server-side token list has a malformed entry.
    """
    trusted: frozenset[Origin] = frozenset()
    if settings.demo:
        settings, trusted = await start_emulators(settings, nursery, providers)
    return App(settings, upstream_ssl_context=upstream_ssl_context,
               trusted_file_origins=trusted, providers=providers)


# --- serving over HTTP ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Serving:
    app: App
    addresses: list[str]
    stopped: trio.Event


async def serve(
    settings: Settings,
    *,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the relay over HTTP until cancelled, then stop gracefully.

    Start it with ``addresses = await nursery.start(relay.serve, settings)``:
    the listeners are bound (``port=0`` picks a free port) and ``addresses``
    are ``host:port`` strings (or the socket path with ``uds``). With
    ``settings.demo`` the emulators are started first, in process.

    Cancelling it (the nursery's ``cancel_scope.cancel()``) stops it as
    SIGTERM stops ``relay serve``: no more connections are taken, requests
    in flight get ``grace_period`` seconds to finish, then streams still
    running end with an in-band ``server_shutting_down`` error; their
    upstream conversations are deleted, accounts released, the emulators
    stopped last. It returns (raising the Cancelled) once all of that is
    done, which takes at most about ``grace_period`` plus
    ``cleanup_timeout``.

    Raises:
        ConfigError: a server-side token list has a malformed entry.
        OSError: the address cannot be listened on (CannotListen).
    """
    with _one_error():
        async with trio.open_nursery() as nursery:
            serving: _Serving = await nursery.start(_serve_shielded, settings, reuse_port)
            task_status.started(serving.addresses)
            try:
                await serving.stopped.wait()
            finally:
                serving.app.shutdown()
                with trio.CancelScope(shield=True):
                    await serving.stopped.wait()


async def _serve_shielded(
    settings: Settings,
    reuse_port: bool,
    *,
    task_status: trio.TaskStatus[_Serving],
) -> None:
    """Run the app (and the emulators) out of reach of the caller's cancellation.

    :func:`serve` turns that cancellation into ``App.shutdown()``, so the
    server drains on its own terms (its grace period, its stop bound) and
    the emulators outlive the last cleanup.
    """
    stopped = trio.Event()
    try:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                app = await start_app(settings, nursery)
                async with app:
                    addresses = await nursery.start(
                        functools.partial(app.serve, reuse_port=reuse_port)
                    )
                    task_status.started(_Serving(app, addresses, stopped))
                    await app.stopped.wait()
                nursery.cancel_scope.cancel()  # the emulators
    finally:
        stopped.set()


# --- the chat service without HTTP ----------------------------------------------------------


#: what the producing task hands the caller: a batch of events, or the failure
_Item = list["Delta"] | Exception


@dataclass(eq=False)
class _Run:
    """The producing side of one :class:`Chat`: all its task holds (never the Chat,
    so that a dropped Chat is collected and can cancel it)."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome = field(default_factory=Outcome)


class Chat:
    """One answer of :meth:`Relay.chat`: an async iterator of neutral events.

    The events are :mod:`protocol.deltas`' (``TextDelta``,
    ``ReasoningDelta``, ``Citation``, ``ToolCallDelta``, ``ImageResult``...),
    one at a time; the last is ``Finish`` or ``UpstreamError``. A failure
    before the first event is raised instead (a
    :class:`~protocol.errors.RelayError`: ``AuthError``, ``NoAccountFree``,
    ``UpstreamFailed``, ``UpstreamTimeout``, ``RequestError`` for a file
    that cannot be fetched), after failing over to the other accounts where
    that can help.

    Use it once. ``async with`` it (or call :meth:`aclose`) to end it early
    for sure: the upstream read stops, the account is released and the
    conversation deleted. A ``break`` out of ``async for`` over
    ``relay.chat(...)`` does the same as soon as the iterator is dropped; a
    cancelled wait for the next event ends it at once.
    """

    def __init__(
        self,
        relay: Relay,
        runtime: ProviderRuntime[Any],
        candidates: Sequence[Account],
        request: ChatRequest,
    ) -> None:
        self._relay = relay
        self._runtime = runtime
        self._candidates = candidates
        self._request = request
        #: the model named in the answer (the provider's default when the request named none)
        self.model = request.model or runtime.provider.default_model
        self._send, self._receive = trio.open_memory_channel[_Item](0)
        self._run = _Run()
        self._token: trio.lowlevel.TrioToken | None = None  # set when started
        self._pending: deque[Delta] = deque()
        self._done = False

    # --- what the answer was -----------------------------------------------------------

    @property
    def provider(self) -> str:
        """The provider answering (``step``, ``glm``)."""
        return self._runtime.provider.name

    @property
    def conversation_id(self) -> str:
        """The upstream conversation of the answer ("" until known)."""
        return self._run.outcome.conversation

    @property
    def account(self) -> str:
        """The short hash of the account answering, as the access log shows it ("" until leased)."""
        return self._run.outcome.account

    @property
    def attempts(self) -> int:
        """Accounts tried so far (failover)."""
        return self._run.outcome.attempts

    # --- iterating -------------------------------------------------------------------------

    def __aiter__(self) -> Chat:
        return self

    async def __anext__(self) -> Delta:
        if self._pending:
            return self._pending.popleft()
        if self._done:
            raise StopAsyncIteration
        if self._token is None:
            self._start()
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            # the task ended without a last event: the Relay was closed under it
            self._done = True
            raise ServerShuttingDown("the Relay was closed; the answer is incomplete",
                                     code="server_shutting_down") from None
        except BaseException:
            self._end()  # cancelled (or worse) while waiting: the answer ends here
            raise
        if isinstance(item, Exception):
            self._done = True
            raise item
        if isinstance(item[-1], Finish | UpstreamError):
            self._done = True
        self._pending.extend(item[1:])
        return item[0]

    def _start(self) -> None:
        nursery = self._relay._chats
        if nursery is None:
            raise RuntimeError("the Relay is not open (use it as `async with Relay(...)`)")
        self._token = trio.lowlevel.current_trio_token()
        app = self._relay.app
        nursery.start_soon(
            functools.partial(
                _produce, self._run, self._send, self._runtime, self._candidates,
                self._request, app.settings,
            ),
            name=f"relay.embed chat ({self.provider})",
        )

    # --- ending -----------------------------------------------------------------------------

    def _end(self) -> None:
        """Stop the task (if any) and forget the rest; never blocks."""
        self._done = True
        self._pending.clear()
        self._receive.close()
        self._run.scope.cancel()

    async def aclose(self) -> None:
        """End the answer now, and return once its account is released.

        The conversation's deletion is then under way (by the janitor, or
        done). Closing a finished or never started chat does nothing.
        """
        self._end()
        if self._token is not None:
            await self._run.finished.wait()
        else:
            self._send.close()

    async def __aenter__(self) -> Chat:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # dropped while its task still runs (a `break`): cancel the task, from
        # whichever thread the collector runs in
        token, run = self._token, self._run
        if token is not None and not run.finished.is_set():
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(run.scope.cancel)


async def _produce(
    run: _Run,
    send: trio.MemorySendChannel[_Item],
    runtime: ProviderRuntime[Any],
    candidates: Sequence[Account],
    request: ChatRequest,
    settings: Settings,
) -> None:
    """The task of one chat: lease, answer, hand the batches over; end cleanly however it ends."""
    outcome = run.outcome
    handed = False  # an event reached the caller: no failover from then on

    async def attempt(session: Any) -> None:  # noqa: ANN401 - the provider's session
        nonlocal handed
        async with open_answer(runtime, session, request, outcome) as answer:
            last: list[Delta]
            try:
                async with aclosing(answer.__aiter__()) as batches:
                    async for batch in batches:
                        outcome.conversation = answer.conversation_id
                        if not batch:
                            continue
                        if not handed:
                            error = _leading_error(batch)
                            if error is not None:
                                raise error_from_delta(error)  # with_account: 401/429 fail over
                        if outcome.first_event_s is None:
                            outcome.first_event_s = trio.current_time() - started_at
                        outcome.chunks += 1
                        batch, ended = _through_last_event(batch)
                        await send.send(batch)
                        handed = True
                        if ended:
                            return
                last = [UpstreamError("truncated", "upstream stream ended without an answer")]
            except RelayError as exc:
                if not handed:
                    raise
                log.warning("upstream failed mid-answer: %s", exc)
                last = [delta_from_error(exc)]
            await send.send(last)

    started_at = trio.current_time()
    try:
        with run.scope:
            async with send:
                try:
                    # a kept conversation's follow-up goes to the account that owns it
                    candidates = await runtime.pool.for_conversation(candidates, request)
                    await with_account(runtime, candidates, attempt, outcome,
                                       retryable=lambda: not handed)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the caller left; leaving the contexts above ended the answer
                except Exception as exc:  # the caller's to see
                    try:
                        await send.send(exc)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        log.debug("chat failed after its caller left: %r", exc)
    finally:
        run.finished.set()


def _through_last_event(batch: list[Delta]) -> tuple[list[Delta], bool]:
    """``batch`` up to its Finish or UpstreamError, and whether it had one."""
    for index, delta in enumerate(batch):
        if isinstance(delta, Finish | UpstreamError):
            return batch[: index + 1], True
    return batch, False


class Relay:
    """The chat service in process, without HTTP: ``async with Relay(settings) as relay:``.

    It holds what a relay process holds (the providers, their account
    pools, the upstream connection pool, the janitor that deletes
    conversations after the answers; with ``settings.demo``, the emulators)
    for the duration of the block, and :meth:`chat` answers through them.
    Leaving the block ends the chats still open, waits (bounded) for the
    cleanups, and closes everything.

    Accounts are leased exactly as for requests through the server: the
    per-account stream limits hold (ChatGLM: one stream per account; a
    chat waits up to ``account_wait_timeout`` for a free one), a refused
    login or a busy account moves to the next one, a dead one rests for
    ``account_cooldown``. ``api_keys`` guard the HTTP port only: the
    program that holds a Relay is trusted with its accounts.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        upstream_ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """
        Args:
            settings: the configuration (see :func:`settings`).
            upstream_ssl_context: TLS for upstream calls (tests: a private CA).
        """
        self._settings = settings
        self._ssl_context = upstream_ssl_context
        self._app: App | None = None
        self._chats: trio.Nursery | None = None
        self._running: AbstractAsyncContextManager[None] | None = None

    @property
    def app(self) -> App:
        """The :class:`~relay.app.App` underneath (providers, account pools, janitor).

        Raises:
            RuntimeError: the Relay is not open.
        """
        if self._app is None:
            raise RuntimeError("the Relay is not open (use it as `async with Relay(...)`)")
        return self._app

    @property
    def settings(self) -> Settings:
        """The settings in use: in demo mode, pointed at the emulators."""
        return self._app.settings if self._app is not None else self._settings

    def chat(
        self,
        request: ChatRequest | Mapping[str, Any],
        *,
        credentials: str | Sequence[str] | None = None,
        provider: str | None = None,
    ) -> Chat:
        """One answer to ``request``, as an async iterator of neutral events (:class:`Chat`).

        Args:
            request: a :class:`protocol.openai.ChatRequest`, or an OpenAI chat
                completion body as a dict (``{"model": "glm-4", "messages": [...]}``;
                ``stream`` does not matter: events always come as they arrive).
            credentials: upstream credentials to use instead of the server-side
                accounts (``RELAY_STEP_TOKENS``, ``RELAY_GLM_TOKENS``), as a
                client names them in ``Authorization`` (several: a list, or
                comma-separated); leased and failed over the same way.
            provider: the provider to ask (``"step"``, ``"glm"``) whatever the
                model; by default the one that owns the model name.

        Raises:
            RequestError: the request is malformed (or has too many files).
            AuthError: no credentials given and none configured, or a
                malformed one.
            KeyError: no such provider.
            RuntimeError: the Relay is not open.
        """
        app = self.app
        if self._chats is None:
            raise RuntimeError("the Relay is not open (use it as `async with Relay(...)`)")
        if not isinstance(request, ChatRequest):
            request = parse_chat_request(orjson.dumps(dict(request)))
        check_file_count(request, app.settings.max_files)
        runtime = (app.providers[provider] if provider is not None
                   else app.providers.for_model(request.model))
        return Chat(self, runtime, _accounts(runtime, credentials), request)

    # --- opening and closing ------------------------------------------------------------------

    async def __aenter__(self) -> Relay:
        if self._running is not None:
            raise RuntimeError("a Relay is opened once")
        running = self._run()
        with _one_error():
            await running.__aenter__()
        self._running = running
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        running = self._running
        assert running is not None, "not entered"
        try:
            return bool(await running.__aexit__(exc_type, exc, tb))
        except BaseException as raised:
            leaf = _leaf(raised)
            if leaf is exc:
                return False  # the block's own exception, as it was
            if leaf is raised:
                raise
            raise leaf from None

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[None]:
        async with trio.open_nursery() as services:  # the emulators, the janitor
            try:
                app = await start_app(self._settings, services,
                                      upstream_ssl_context=self._ssl_context)
                pools = [runtime.pool for runtime in app.providers.values()]
                async with app, accounts_connected(pools):
                    await services.start(app.janitor.run)
                    try:
                        async with trio.open_nursery() as chats:
                            self._app, self._chats = app, chats
                            yield
                            chats.cancel_scope.cancel()  # chats still open end here
                    finally:
                        self._chats = None
                        # the conversations' deletions run to their end (each is bounded)
                        app.janitor.close()
                        with trio.CancelScope(shield=True), \
                                trio.move_on_after(app.settings.cleanup_timeout + 1):
                            await app.janitor.wait_idle()
            finally:
                services.cancel_scope.cancel()


def _accounts(
    runtime: ProviderRuntime[Any], credentials: str | Sequence[str] | None
) -> list[Account]:
    """The accounts a chat may lease (as :func:`relay.access.accounts_for`, without HTTP)."""
    name = runtime.provider.name
    if credentials is None:
        if not runtime.server_credentials:
            raise AuthError(
                f"no {name} accounts are configured (RELAY_{name.upper()}_TOKENS) and no "
                "credentials were given", code="missing_credentials",
            )
        return runtime.pool.server_accounts(runtime.server_credentials)
    given = credentials.split(",") if isinstance(credentials, str) else credentials
    names = [c.strip() for c in given if c.strip()]
    if not names:
        raise AuthError("the credentials name no account", code="missing_credentials")
    for credential in names:
        runtime.provider.validate_credential(credential)
    return runtime.pool.client_accounts(names)


# --- exception groups at the boundary ---------------------------------------------------------


def _leaf(exc: BaseException) -> BaseException:
    """The one exception a chain of single-member groups holds (else ``exc``)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _one_error:
    """Raise a group that holds one exception (nested or not) as that exception.

    The nurseries inside :func:`serve` and :class:`Relay` are ours; the
    caller should see a port in use as an OSError, not as groups of groups.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            return
        leaf = _leaf(exc)
        if leaf is not exc:
            raise leaf from None
