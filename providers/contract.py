"""What the relay hands a provider, and what a provider hands back.

The dependency direction is one way (relay -> providers -> protocol), so a
provider's ``client.py`` cannot import ``relay.upstream``. Instead the relay
passes in objects that satisfy the protocols here:

- :class:`Transport`: unary HTTP calls and streamed responses to the
  upstream, over the relay's shared httpcore pool, with httpcore's errors
  already turned into :mod:`protocol.errors` classes;
- :class:`Fetcher`: downloads a file a client named by URL (with the
  server-side request forgery guard and size limits applied) or decodes a
  data URL; a :class:`FileBatch` holds one request's files to one budget.

- :class:`Background`: runs a cleanup job (deleting an upstream
  conversation) after the answer, off the request's path, so a keep-alive
  client's next request does not wait one upstream round trip for it.

Three optional protocols a provider may satisfy besides :class:`Provider`:
:class:`SessionCodec` turns its sessions into JSON and back, which shared
account state (Redis, ``RELAY_REDIS_URL``) needs to cache them for every
instance; :class:`ConversationKeeper` says which answers leave their upstream
conversation for the client to continue, so that the relay can send the
follow-up to the account that owns it; :class:`Passthrough` answers a
client's OpenAI chat completions body with the upstream's own bytes (an
OpenAI-compatible upstream: no decode and re-encode per chunk), and
:class:`ModelLister` asks the upstream which models it serves.

Model lists: :meth:`Provider.models` is plain ``def`` and answers from what
the provider knows by itself (its own names, an operator's configured list),
because the relay reads it per request (the metrics' model label). What only
the upstream knows, the models behind a configured prefix, comes from
:meth:`ModelLister.upstream_models`, an upstream call the relay caches
(``relay/catalog.py``) and bounds; StepChat and ChatGLM do not offer it.

A provider whose upstream calls tools, follows a JSON format, stops at stop
sequences and counts tokens itself says so with
:attr:`Provider.native_agents`: the relay then neither renders tools into the
prompt nor shapes the answer.

A provider in turn satisfies :class:`Provider`: it says which model names
are its own (:meth:`Provider.owns_model`), what its credentials look like,
and which models ``/v1/models`` lists. The relay logs an account in through
:meth:`Provider.login` (it caches the session itself, single-flight), then
opens a :class:`ChatStream` with :meth:`Provider.chat`. Leaving the ``chat``
context deletes the upstream conversation, whatever happened: at once, or
through :func:`after_answer` as a background job. A provider that makes
images and videos offers :class:`Media` too (:attr:`Provider.media`).

``Provider`` is generic in its session type: what ``login`` returns is what
``chat`` takes, so a provider never checks the session it is given. The
relay holds providers of different session types side by side, and that
mixed collection (``relay/registry.py``) is the one place typed ``Any``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from protocol.deltas import Delta
    from protocol.errors import RelayError
    from protocol.openai import ChatRequest

Headers = Sequence[tuple[bytes, bytes]]

#: A cleanup job: bounded, shielded and never raising (the provider's own duty).
Job = Callable[[], Awaitable[None]]

#: What a provider's login returns and its calls take (an access token, say).
SessionT = TypeVar("SessionT")
SessionT_co = TypeVar("SessionT_co", covariant=True)
SessionT_contra = TypeVar("SessionT_contra", contravariant=True)
T = TypeVar("T")


class Background(Protocol):
    """Where cleanup jobs run once the answer is out (the relay's janitor)."""

    def defer(self, job: Job) -> bool:
        """Take ``job`` to run soon in the background.

        Returns:
            False if it cannot be taken (not running, or shutting down): the
            caller then runs it itself.
        """
        ...


async def after_answer(background: Background | None, job: Job) -> None:
    """Run a cleanup ``job`` in ``background``, or now if there is none to take it."""
    if background is None or not background.defer(job):
        await job()


@dataclass(frozen=True, slots=True)
class Response:
    """A whole (unary) upstream response."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first header called ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class StreamedResponse(Protocol):
    """An upstream response whose body is read as it arrives."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None:
        """The first header called ``name`` (case-insensitive)."""
        ...

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """Body bytes as each read delivers them (first-byte and stall timeouts applied).

        Raises:
            UpstreamTimeout: no data within the first-byte or stall timeout.
            UpstreamFailed: the connection broke.
        """
        ...

    async def read(self, limit: int = ...) -> bytes:
        """The rest of the body, at most ``limit`` bytes (an error body, usually)."""
        ...


class Transport(Protocol):
    """HTTP calls to one upstream service."""

    async def request(
        self,
        method: bytes,
        url: str,
        headers: Headers,
        body: bytes = b"",
        *,
        limit_s: float | None = None,
    ) -> Response:
        """One unary call; the whole body is read (bounded).

        Raises:
            UpstreamTimeout, UpstreamFailed: the call failed on the network.
        """
        ...

    def stream(
        self, method: bytes, url: str, headers: Headers, body: bytes = b""
    ) -> AbstractAsyncContextManager[StreamedResponse]:
        """A call whose response body is streamed; closed when the context ends."""
        ...


@dataclass(frozen=True, slots=True)
class FetchedFile:
    """A file a client named, ready to upload."""

    name: str
    mime: str
    data: bytes


class FileBatch(Protocol):
    """The files of one request: their fetches share one byte budget."""

    async def fetch(self, url: str) -> FetchedFile:
        """As :meth:`Fetcher.fetch`; also RequestError (``files_too_large``) once the
        request's files together are over the relay's limit (found as bytes arrive)."""
        ...


class Fetcher(Protocol):
    """Resolves file references from chat messages into bytes."""

    async def fetch(self, url: str) -> FetchedFile:
        """Download an http(s) URL or decode a data URL (one file, alone).

        Raises:
            RequestError: the URL is malformed, forbidden (private address),
                unreachable, answers an error status, or is over the size limit.
        """
        ...

    def batch(self) -> FileBatch:
        """A new request's files (see :func:`providers.files.each_file`)."""
        ...


class ChatStream(Protocol):
    """One upstream answer, as lists of deltas (one list per upstream read)."""

    @property
    def conversation_id(self) -> str:
        """The upstream conversation id ("" until known)."""
        ...

    def __aiter__(self) -> AsyncGenerator[list[Delta], None]:
        """Deltas as they arrive. The last list ends with Finish or UpstreamError.

        Callers that may stop early wrap it in ``contextlib.aclosing``.
        """
        ...


@dataclass(frozen=True, slots=True)
class MediaAnswer:
    """A media endpoint's whole answer."""

    #: the JSON body of the 200
    body: bytes
    #: the upstream conversation it used, for the access log ("" if none)
    conversation: str = ""


class Leased(Protocol[SessionT_co]):
    """Runs work on a leased account: the relay's failover, lent to a media flow."""

    async def __call__(self, call: Callable[[SessionT_co], Awaitable[T]]) -> T:
        """``call(session)`` on an account of the request's, as chat runs.

        Raises:
            AuthError: the request's credentials are missing or wrong.
            NoAccountFree: no account was free in time.
            RelayError: ``call``'s failure (after failover, for 401 and 429).
        """
        ...


class Media(Protocol[SessionT_contra]):
    """Image and video generation, which some providers offer (:attr:`Provider.media`)."""

    async def images(self, body: bytes, leased: Leased[SessionT_contra]) -> MediaAnswer:
        """``POST /v1/images/generations``: OpenAI's images response for ``body``.

        Raises:
            RequestError: the body is invalid, or the prompt was refused.
            RelayError: what ``leased`` or the upstream raised.
        """
        ...

    async def videos(self, body: bytes, leased: Leased[SessionT_contra]) -> MediaAnswer:
        """``POST /v1/videos/generations``: the video made for ``body``.

        Raises:
            RequestError: the body is invalid.
            RelayError: what ``leased`` or the upstream raised.
        """
        ...


class Provider(Protocol[SessionT]):
    """One upstream service; ``SessionT`` is what :meth:`login` gives :meth:`chat`."""

    #: routes ``/<name>/v1/...`` and names the provider in logs and metrics
    name: str
    #: how long a login session stays valid, in seconds
    session_ttl: float
    #: rendering of one search hit in streamed content
    citation_line: str
    #: the model an answer names when the request named none
    default_model: str
    #: the upstream does tools, JSON formats, stop sequences and token limits
    #: itself: the request goes as it is and the answer comes back unshaped
    native_agents: bool
    #: a refused session (401, 403) may have expired and a fresh login may mend
    #: it (access tokens); False where the session is the credential itself
    #: (API keys): a refused one is rested at once
    renews_sessions: bool

    @property
    def media(self) -> Media[SessionT] | None:
        """Image and video generation, or None if this provider has none."""
        ...

    def models(self) -> list[str]:
        """Every model id /v1/models lists for this provider."""
        ...

    def owns_model(self, model: str) -> bool:
        """Whether ``model`` names this provider (``/v1/chat/completions`` routes by it)."""
        ...

    def looks_like(self, credential: str) -> bool:
        """Whether ``credential`` has this provider's form: ``/token/check``'s guess."""
        ...

    def validate_credential(self, credential: str) -> None:
        """Raise AuthError if ``credential`` cannot be this provider's."""
        ...

    async def login(self, credential: str) -> SessionT:
        """Exchange a long-lived credential for a session (access token).

        Raises:
            AuthError: the credential was refused.
            UpstreamFailed, UpstreamTimeout: the upstream failed.
        """
        ...

    async def check(self, credential: str) -> bool:
        """Liveness of a credential, uncached (``/token/check``, ``relay check-token``).

        Returns:
            True if the upstream took it, False if it refused it (an
            :class:`~protocol.errors.AuthError`, or a malformed credential).

        Raises:
            RelayError: any other failure (UpstreamFailed, UpstreamTimeout,
                RemoteProtocolError): the upstream could not tell, which is
                not the same as a dead credential.
        """
        ...

    def chat(
        self, session: SessionT, request: ChatRequest
    ) -> AbstractAsyncContextManager[ChatStream]:
        """Open an answer; leaving the context deletes the upstream conversation.

        Raises (on entering):
            AuthError: the session was refused (the caller evicts it).
            RequestError: a file could not be fetched.
            UpstreamFailed, UpstreamTimeout, NoAccountFree: upstream trouble.
        """
        ...


@runtime_checkable
class SessionCodec(Protocol[SessionT]):
    """Sessions as JSON text: what shared account state stores (``RELAY_REDIS_URL``).

    A session holds secrets (an access token, and what the provider needs to
    log in again), so the text does too: it goes to a private Redis, never
    to a log.
    """

    def dump_session(self, session: SessionT) -> str:
        """The session as JSON text; equal sessions give equal text."""
        ...

    def load_session(self, data: str) -> SessionT:
        """The session :meth:`dump_session` wrote.

        Raises:
            ValueError: ``data`` is not such a session (the caller logs in again).
        """
        ...


@runtime_checkable
class ConversationKeeper(Protocol):
    """A provider that may leave an upstream conversation for the client to continue.

    Such a conversation belongs to the account that created it: a follow-up
    sent with another account's session is refused. The relay remembers the
    owner of every kept conversation and leases that account for the
    follow-up (``relay/accounts.py``).
    """

    def keeps_conversation(self, request: ChatRequest) -> bool:
        """Whether the answer to ``request`` leaves its conversation upstream."""
        ...

    def continued_conversation(self, request: ChatRequest) -> str | None:
        """The upstream conversation ``request`` continues, if it names a valid one."""
        ...


class RawAnswer(Protocol):
    """An upstream answer already in the client's wire format (:class:`Passthrough`).

    Attributes:
        status: the upstream's HTTP status (not 401, 403 or 429: those are raised).
        content_type: its ``Content-Type``.
        streamed: the body is a server-sent event stream (status 200).
        done: the stream's last event was given by :meth:`events`.
    """

    status: int
    content_type: bytes
    streamed: bool
    done: bool

    def leading_error(self, data: bytes) -> RelayError | None:
        """The error the upstream reported in-band as the first event of ``data``, or None.

        ``data`` is the first block :meth:`events` gave. The relay asks before
        it has sent anything to the client: such an error then becomes an HTTP
        error with its status (and another key is tried for a 401, 403 or
        429), instead of a 200 whose stream holds only the error. Pure (no
        I/O); the block is still the caller's to send when this says None.
        """
        ...

    def events(self) -> AsyncGenerator[bytes, None]:
        """The stream's whole events, as each upstream read completes some, ready to send.

        Ends after the stream's last event (an end the upstream left out is
        added).

        Raises:
            UpstreamTimeout, UpstreamFailed: the upstream was too slow or broke.
            RemoteProtocolError: it ended inside an event.
        """
        ...

    async def body(self) -> bytes:
        """The whole body of an answer that is not streamed (an error's, too), ready to send.

        Raises:
            UpstreamTimeout, UpstreamFailed: the upstream was too slow or broke.
        """
        ...


@runtime_checkable
class Passthrough(Protocol[SessionT_contra]):
    """A provider that answers OpenAI chat completions with the upstream's own bytes."""

    def passthrough(
        self, session: SessionT_contra, body: bytes, request: ChatRequest
    ) -> AbstractAsyncContextManager[RawAnswer]:
        """Send the client's ``body`` (parsed as ``request``) upstream; the answer as it is.

        Only the model name changes, both ways (the upstream's name up, the
        served one back), and the relay's extension fields are left out.

        Raises (on entering):
            AuthError, NoAccountFree: the upstream refused the key (401, 403)
                or it is rate-limited (429): the relay tries another key.
            UpstreamFailed, UpstreamTimeout: the upstream could not be reached.
        """
        ...


@runtime_checkable
class ModelLister(Protocol):
    """A provider whose upstream says which models it serves (an OpenAI ``GET /models``).

    The relay lists them in ``/v1/models`` beside :meth:`Provider.models`,
    through a cache of its own (``relay/catalog.py``: a time to live, one
    call in flight, a time limit, the last good list kept on failure).
    """

    async def upstream_models(self, credential: str) -> list[str]:
        """The served names of the models the upstream lists now: one call with ``credential``.

        Returns:
            The names a client would use (an upstream's prefix put in front);
            ``[]`` without a call when the provider serves nothing the
            upstream would have to tell.

        Raises:
            RelayError: the call failed, the upstream answered an error
                (its status kept: 401 and 403 for a refused key), or its
                answer held no model list. Unbounded in time: the caller
                bounds it.
        """
        ...
