"""Path -> route table, and the handlers of every endpoint (DESIGN.md HTTP surface).

A :class:`Route` holds a path's handlers by method and the dialect
(:mod:`relay.dialects`) its errors are rendered in. A chat endpoint is
:func:`chat_route` of a dialect: the dialect parses the body and encodes the
answer, :func:`relay.chat.complete` does the rest, so a new client API is
one dialect module plus one line in :data:`ROUTES`. The other endpoints
(models, token check, media, metrics) speak OpenAI.

:func:`dispatch` reads the body of every request (bounded by
``max_body_bytes``) before calling a handler, so keep-alive works for every
method and a handler can watch for the client going away. Unknown paths get
404 (OpenAI's error object) and known paths with the wrong method 405 (with
``Allow``, in the route's dialect); everything a handler raises, and a body
too large (413) or too slow (408), is rendered by the route's dialect too.
``OPTIONS`` answers CORS pre-flight requests, since browser-based clients
(LobeChat, ChatGPT-Next-Web) call the API directly.

Handlers see the application through :class:`Relay` (what
:class:`relay.app.App` provides), and providers only through
``providers/contract.py`` and :class:`relay.registry.Providers`: a chat goes
to the provider that owns its model name, or to ``/<provider>/v1/...``'s;
the media endpoints go to the first provider that makes media.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import unquote

import orjson
import trio

from protocol.errors import MethodNotAllowed, NotFound, RelayError, RequestError
from protocol.openai import check_file_count, models_body
from relay.access import accounts_for, check_api_key
from relay.chat import Outcome, complete, with_account
from relay.dialects.anthropic import ANTHROPIC_MESSAGES
from relay.dialects.openai_chat import OPENAI_CHAT
from relay.dialects.responses import RESPONSES
from relay.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from providers.contract import Leased, Media, MediaAnswer, Provider
    from relay.config import Settings
    from relay.dialects import Dialect
    from relay.metrics import Metrics
    from relay.registry import ProviderRuntime, Providers
    from relay.server import Exchange

log = logging.getLogger("relay.access")

T = TypeVar("T")


class Relay(Protocol):
    """What the handlers use of the application (:class:`relay.app.App`)."""

    settings: Settings
    metrics: Metrics
    providers: Providers

    @property
    def routes(self) -> Mapping[str, Route]:
        """Path -> route (:func:`route_table`)."""
        ...

    async def readiness(self) -> str | None:
        """Why the relay cannot serve now, or None (:meth:`relay.app.App.readiness`)."""
        ...


RouteHandler = Callable[[Relay, "Exchange", bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    """One path: its handlers by method, and the dialect its errors are rendered in."""

    methods: Mapping[str, RouteHandler]
    dialect: Dialect = OPENAI_CHAT

WELCOME = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trio-llm-relay</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>trio-llm-relay is running</h1>
<p>An OpenAI- and Anthropic-compatible relay for StepChat and ChatGLM.
Point LobeChat, ChatGPT-Next-Web, Dify or the <code>openai</code> SDK at
<code>/v1</code> of this address, the <code>anthropic</code> SDK at the address itself.</p>
<ul>
<li><code>POST /v1/chat/completions</code></li>
<li><code>POST /v1/responses</code></li>
<li><code>POST /v1/messages</code>, <code>POST /v1/messages/count_tokens</code></li>
<li><code>GET /v1/models</code>, <code>GET /v1/models/{id}</code></li>
<li><code>POST /token/check</code></li>
<li><code>POST /v1/images/generations</code>, <code>POST /v1/videos/generations</code></li>
<li><code>GET /ping</code>, <code>GET /ready</code>, <code>GET /metrics</code></li>
</ul>
</body></html>
"""


async def ping(app: Relay, ex: Exchange, body: bytes) -> None:
    """``GET /ping``: liveness."""
    await ex.respond(200, b"pong", b"text/plain; charset=utf-8")


async def ready(app: Relay, ex: Exchange, body: bytes) -> None:
    """``GET /ready``: 200 when the relay can serve, else 503 with the reason.

    Not ready while shutting down, without usable server-side accounts in
    pooled mode, or with the shared account state unreachable. ``/ping``
    stays the liveness check (the process answers at all).
    """
    reason = await app.readiness()
    if reason is None:
        await ex.respond(200, b'{"ready":true}')
    else:
        await ex.respond(503, orjson.dumps({"ready": False, "reason": reason}))


async def index(app: Relay, ex: Exchange, body: bytes) -> None:
    """``GET /``: a short welcome page."""
    await ex.respond(200, WELCOME, b"text/html; charset=utf-8", [(b"expires", b"-1")])


async def models(app: Relay, ex: Exchange, body: bytes) -> None:
    """``GET /v1/models``: every model id of every provider, owned by the provider's name.

    An upstream with a prefix adds what it lists itself (the prefix put in
    front; :class:`relay.catalog.ModelCatalog`: cached, asked at most once
    at a time, bounded, its last good list when asking fails). The upstreams
    are asked side by side, so the answer waits for the slowest, not the sum.
    """
    check_api_key(app.settings, ex)
    runtimes = list(app.providers.values())
    listed: list[list[str]] = [[] for _ in runtimes]

    async def collect(index: int, runtime: ProviderRuntime[Any]) -> None:
        listed[index] = await runtime.every_model()

    async with trio.open_nursery() as nursery:
        for index, runtime in enumerate(runtimes):
            nursery.start_soon(collect, index, runtime)
    pairs = [(model, rt.provider.name) for rt, ids in zip(runtimes, listed, strict=True)
             for model in ids]
    await ex.respond(200, models_body(pairs, created=int(time.time())))


MODEL_PREFIX = "/v1/models/"
#: the route of ``GET /v1/models/{id}`` in the table (and the metrics' label)
MODEL_ROUTE = MODEL_PREFIX + "{id}"


async def model(app: Relay, ex: Exchange, body: bytes) -> None:
    """``GET /v1/models/{id}``: one model (the SDK's ``models.retrieve``).

    A model is known if a provider lists it or owns its name (agent ids,
    versioned names), except a name under an upstream's prefix that the
    upstream's own list lacks (:meth:`relay.registry.ProviderRuntime.knows`);
    else 404 ``model_not_found``.
    """
    check_api_key(app.settings, ex)
    model_id = unquote(ex.request.path.split("?", 1)[0][len(MODEL_PREFIX):])
    for rt in app.providers.values():
        if await rt.knows(model_id):
            entry = {"id": model_id, "object": "model", "created": int(time.time()),
                     "owned_by": rt.provider.name}
            await ex.respond(200, orjson.dumps(entry))
            return
    raise NotFound(f"The model '{model_id[:200]}' does not exist", code="model_not_found",
                   param="model")


async def metrics(app: Relay, ex: Exchange, body: bytes) -> None:
    """``GET /metrics``: Prometheus text format.

    With ``api_keys`` set it needs one of them, like every other endpoint,
    unless ``metrics_public`` says a scraper may read it without one.
    """
    if not app.settings.metrics_public:
        check_api_key(app.settings, ex)
    await ex.respond(200, app.metrics.render(), METRICS_CONTENT_TYPE)


async def liveness(provider: Provider[Any], token: str) -> dict[str, object]:
    """What ``/token/check`` and ``relay check-token`` answer about ``token``.

    Returns:
        ``{"live": true}``; ``{"live": false}`` when the upstream refused it
        (or it cannot be this provider's credential); ``{"live": null,
        "error": {"message", "type", "param", "code"}}`` when the upstream
        could not tell (unreachable, timed out, failing): that says nothing
        about the token.
    """
    try:
        provider.validate_credential(token)
    except RelayError:
        return {"live": False}
    try:
        live = await provider.check(token)
    except RelayError as exc:
        log.warning("token check: %s could not tell: %s", provider.name, exc.message)
        error = {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}
        return {"live": None, "error": error}
    return {"live": live}


async def token_check(app: Relay, ex: Exchange, body: bytes) -> None:
    """``POST /token/check``: ``{"token", "provider"?}`` -> :func:`liveness`, HTTP 200.

    An unreachable upstream is still a 200: the check ran and its answer is
    "unknown" (``live`` null, with the error), distinct from ``false``.
    """
    check_api_key(app.settings, ex)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError("invalid JSON body") from exc
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    token = data.get("token")
    if not isinstance(token, str) or not token.strip():
        raise RequestError("token must be a non-empty string", param="token")
    name = data.get("provider")
    if name is None:
        name = app.providers.guess(token)
    if not isinstance(name, str) or name not in app.providers:
        raise RequestError(
            f"provider must be one of {', '.join(sorted(app.providers))}", param="provider"
        )
    answer = await liveness(app.providers[name].provider, token.strip())
    await ex.respond(200, orjson.dumps(answer))


async def _chat(
    app: Relay, ex: Exchange, body: bytes, *, dialect: Dialect, provider: str | None
) -> None:
    """``POST``: a chat answer in ``dialect``, from ``provider`` or the model's provider."""
    runtime = None if provider is None else app.providers[provider]
    request = dialect.parse(body)
    check_file_count(request, app.settings.max_files)
    if runtime is None:
        runtime = app.providers.for_model(request.model)
    accounts = accounts_for(app.settings, ex, runtime)
    name = runtime.provider.name
    outcome = Outcome(gap_observer=app.metrics.chunk_gap.labels(name).observe)
    ex.note = outcome
    streams = app.metrics.active_streams.labels(name)
    if request.stream:
        streams.inc()
    try:
        await complete(ex, dialect, runtime, accounts, request, app.settings, outcome, body)
    except RelayError as exc:
        if exc.status >= 500 or exc.status == 429:
            app.metrics.upstream_errors.labels(name, exc.code or exc.kind).inc()
        raise
    finally:
        if request.stream:
            streams.dec()
        app.metrics.chunks.labels(name).inc(outcome.chunks)
        if outcome.first_event_s is not None:
            app.metrics.first_token.labels(name).observe(outcome.first_event_s)
        if outcome.end in ("upstream_error", "timeout") and ex.started:
            app.metrics.upstream_errors.labels(name, outcome.end).inc()


async def count_tokens(app: Relay, ex: Exchange, body: bytes) -> None:
    """``POST /v1/messages/count_tokens``: Anthropic's ``{"input_tokens": N}``, estimated."""
    check_api_key(app.settings, ex)
    await ex.respond(200, ANTHROPIC_MESSAGES.count_tokens(body))


def chat_route(dialect: Dialect, provider: str | None = None) -> Route:
    """A chat endpoint (``POST``) that speaks ``dialect``: one routing line per dialect.

    Args:
        dialect: parses the body, encodes the answer, renders the errors.
        provider: the provider that answers whatever the model (the
            ``/<provider>/v1/...`` routes); None: the one that owns the model.
    """
    # a partial, not a closure: no coroutine frame of its own per stream (issue 13)
    return Route({"POST": partial(_chat, dialect=dialect, provider=provider)}, dialect)


def _media(app: Relay) -> tuple[ProviderRuntime[Any], Media[Any]]:
    """The provider that makes images and videos, and its media interface."""
    runtime = app.providers.with_media()
    media = None if runtime is None else runtime.provider.media
    if runtime is None or media is None:
        raise RelayError("no provider of this relay makes images or videos", status=501,
                         code="not_implemented")
    return runtime, media


async def _generate(
    app: Relay,
    ex: Exchange,
    make: Callable[[Media[Any], Leased[Any]], Awaitable[MediaAnswer]],
) -> None:
    """Answer a media request; ``make`` leases accounts through ``leased``, as chat does."""
    runtime, media = _media(app)
    outcome = Outcome()

    async def leased(call: Callable[[Any], Awaitable[T]]) -> T:
        accounts = accounts_for(app.settings, ex, runtime)
        ex.note = outcome
        return await with_account(runtime, accounts, call, outcome)

    async with ex.watch_disconnect():
        answer = await make(media, leased)
        outcome.conversation = answer.conversation
        await ex.respond(200, answer.body)


async def images(app: Relay, ex: Exchange, body: bytes) -> None:
    """``POST /v1/images/generations``: drawing (ChatGLM: PROTOCOLS.md 3.12)."""
    await _generate(app, ex, lambda media, leased: media.images(body, leased))


async def videos(app: Relay, ex: Exchange, body: bytes) -> None:
    """``POST /v1/videos/generations``: video generation (ChatGLM: PROTOCOLS.md 3.12)."""
    await _generate(app, ex, lambda media, leased: media.videos(body, leased))


ROUTES: dict[str, Route] = {
    "/": Route({"GET": index}),
    "/ping": Route({"GET": ping}),
    "/ready": Route({"GET": ready}),
    "/metrics": Route({"GET": metrics}),
    "/v1/models": Route({"GET": models}),
    MODEL_ROUTE: Route({"GET": model}),
    "/token/check": Route({"POST": token_check}),
    "/v1/chat/completions": chat_route(OPENAI_CHAT),
    "/v1/responses": chat_route(RESPONSES),
    "/v1/messages": chat_route(ANTHROPIC_MESSAGES),
    "/v1/messages/count_tokens": Route({"POST": count_tokens}, ANTHROPIC_MESSAGES),
    "/v1/images/generations": Route({"POST": images}),
    "/v1/videos/generations": Route({"POST": videos}),
}

CORS_PREFLIGHT = [
    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
    (b"access-control-allow-headers", b"*"),
    (b"access-control-max-age", b"86400"),
]


def route_table(providers: Iterable[str]) -> dict[str, Route]:
    """:data:`ROUTES` plus each provider's ``/<name>/v1/chat/completions``, ``.../responses``
    and ``.../messages`` (the provider forced, whatever the model is called).

    The table is the application's own (:attr:`relay.app.App.routes`): a
    route added to it is served from the next request on.
    """
    table = dict(ROUTES)
    for name in providers:
        table[f"/{name}/v1/chat/completions"] = chat_route(OPENAI_CHAT, name)
        table[f"/{name}/v1/responses"] = chat_route(RESPONSES, name)
        table[f"/{name}/v1/messages"] = chat_route(ANTHROPIC_MESSAGES, name)
    return table


async def dispatch(app: Relay, ex: Exchange) -> None:
    """Route one request; log it and count it once it is answered."""
    req = ex.request
    path = req.path.rstrip("/") or "/"
    if path.startswith(MODEL_PREFIX):
        path = MODEL_ROUTE  # one route, and one metrics label, for every model id
    started = trio.current_time()
    try:
        route = app.routes.get(path)
        if route is not None:
            ex.errors = route.dialect.error
        body = await ex.read_body()
        if route is None:
            raise NotFound(f"unknown path {req.method} {req.path}", code="unknown_path")
        methods = route.methods
        if req.method == "OPTIONS":
            allow = ", ".join([*methods, "OPTIONS"]).encode()
            await ex.respond(204, b"", None, [*CORS_PREFLIGHT, (b"allow", allow)])
            return
        handler = methods.get(req.method)
        if handler is None and req.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            raise MethodNotAllowed(
                f"{req.method} is not allowed on {path}; use {', '.join(methods)}",
                code="method_not_allowed",
            )
        await handler(app, ex, body)
    except RelayError as exc:
        if ex.started or ex.conn.gone:
            raise
        extra = []
        if isinstance(exc, MethodNotAllowed):
            extra.append((b"allow", ", ".join(app.routes[path].methods).encode()))
        await ex.respond_error(exc, extra)
    finally:
        _log(app, ex, path, trio.current_time() - started)


def _log(app: Relay, ex: Exchange, path: str, elapsed: float) -> None:
    """Count the request and write its access line (fields in JSON mode: ``access``)."""
    status = ex.status if ex.started else (499 if ex.conn.gone else 0)
    route = path if path in app.routes else "other"
    note = ex.note if isinstance(ex.note, Outcome) else None
    provider = note.provider if note is not None else ""
    model = _model_label(app, note)
    app.metrics.requests.labels(route, provider, model, str(status)).inc()
    app.metrics.duration.labels(route, provider).observe(elapsed)
    request = ex.request
    fields: dict[str, object] = {
        "request_id": request.request_id,
        "method": request.method,
        "path": request.path,
        "status": status or None,
        "client": request.client,
        "duration_ms": round(elapsed * 1000, 1),
        "bytes_out": ex.sent_bytes,
        "end": _end_reason(ex, status, note),
        # the server cut the response short: "shutdown", or "send-timeout" (a client
        # that stopped reading)
        "cut": ex.cut,
    }
    if note is not None:
        fields.update(
            provider=note.provider or None,
            model=note.model or None,
            stream=note.stream,
            account=note.account or None,  # a short hash of the credential, never the token
            attempts=note.attempts,
            conversation=note.conversation or None,
            batches=note.chunks,
            ttft_ms=None if note.first_event_s is None else round(note.first_event_s * 1000, 1),
            prompt_tokens=note.prompt_tokens or None,
            completion_tokens=note.completion_tokens or None,
        )
    text = " ".join(f"{key}={value}" for key, value in fields.items()
                    if value is not None and key not in ("method", "path", "status"))
    log.info("%s %s %s %s", request.method, request.path, status or "-", text,
             extra={"access": fields})


def _end_reason(ex: Exchange, status: int, note: Outcome | None) -> str:
    """Why the request ended (the access line's ``end``)."""
    if ex.cut == "shutdown":
        return "shutdown"
    if ex.cut == "send-timeout":
        return "timeout"
    if ex.conn.gone and not ex.finished:
        return "client_gone"
    if note is not None and note.end:
        return note.end
    if status in (408, 504):
        return "timeout"
    if status >= 500:
        return "upstream_error" if note is not None else "error"
    if status >= 400:
        return "rejected"
    return "done"


def _model_label(app: Relay, note: Outcome | None) -> str:
    """The metrics' model label: a model a provider lists, else ``other`` (bounded)."""
    if note is None or not note.model:
        return ""
    runtime = app.providers.get(note.provider)
    if runtime is None:
        return "other"
    return note.model if runtime.lists(note.model) else "other"
