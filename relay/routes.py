"""Path -> handler table, and the handlers of every endpoint (DESIGN.md HTTP surface).

:func:`dispatch` reads the body of every request (bounded by
``max_body_bytes``) before calling a handler, so keep-alive works for every
method and a handler can watch for the client going away. Unknown paths get
404 and known paths with the wrong method 405 (with ``Allow``), both as
OpenAI error objects. ``OPTIONS`` answers CORS pre-flight requests, since
browser-based clients (LobeChat, ChatGPT-Next-Web) call the API directly.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
import trio

from protocol.errors import MethodNotAllowed, NotFound, RelayError, RequestError
from protocol.openai import (
    check_file_count,
    error_from_exception,
    models_body,
    parse_chat_request,
)
from providers.glm.client import GlmProvider
from providers.glm.media import parse_image_request, parse_video_request, videos_body
from relay.chat import Outcome, complete, with_account
from relay.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from providers.contract import Provider
    from relay.app import App, ProviderRuntime
    from relay.server import Exchange

log = logging.getLogger("relay.access")

RouteHandler = Callable[["App", "Exchange", bytes], Awaitable[None]]

WELCOME = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trio-llm-relay</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>trio-llm-relay is running</h1>
<p>An OpenAI-compatible relay for StepChat and ChatGLM.
Point LobeChat, ChatGPT-Next-Web, Dify or the <code>openai</code> SDK at
<code>/v1</code> of this address.</p>
<ul>
<li><code>POST /v1/chat/completions</code></li>
<li><code>GET /v1/models</code></li>
<li><code>POST /token/check</code></li>
<li><code>POST /v1/images/generations</code>, <code>POST /v1/videos/generations</code></li>
<li><code>GET /ping</code>, <code>GET /metrics</code></li>
</ul>
</body></html>
"""


async def ping(app: App, ex: Exchange, body: bytes) -> None:
    """``GET /ping``: liveness."""
    await ex.respond(200, b"pong", b"text/plain; charset=utf-8")


async def index(app: App, ex: Exchange, body: bytes) -> None:
    """``GET /``: a short welcome page."""
    await ex.respond(200, WELCOME, b"text/html; charset=utf-8", [(b"expires", b"-1")])


async def models(app: App, ex: Exchange, body: bytes) -> None:
    """``GET /v1/models``: every model id of every provider."""
    app.check_api_key(ex)
    pairs = [
        (model, rt.provider.name)
        for rt in app.providers.values()
        for model in rt.provider.models()
    ]
    await ex.respond(200, models_body(pairs, created=int(time.time())))


async def metrics(app: App, ex: Exchange, body: bytes) -> None:
    """``GET /metrics``: Prometheus text format.

    With ``api_keys`` set it needs one of them, like every other endpoint,
    unless ``metrics_public`` says a scraper may read it without one.
    """
    if not app.settings.metrics_public:
        app.check_api_key(ex)
    await ex.respond(200, app.metrics.render(), METRICS_CONTENT_TYPE)


async def liveness(provider: Provider, token: str) -> dict[str, object]:
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


async def token_check(app: App, ex: Exchange, body: bytes) -> None:
    """``POST /token/check``: ``{"token", "provider"?}`` -> :func:`liveness`, HTTP 200.

    An unreachable upstream is still a 200: the check ran and its answer is
    "unknown" (``live`` null, with the error), distinct from ``false``.
    """
    app.check_api_key(ex)
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
        name = "step" if "@" in token else "glm"
    if not isinstance(name, str) or name not in app.providers:
        raise RequestError(
            f"provider must be one of {', '.join(sorted(app.providers))}", param="provider"
        )
    answer = await liveness(app.providers[name].provider, token.strip())
    await ex.respond(200, orjson.dumps(answer))


async def _chat(app: App, ex: Exchange, body: bytes, runtime: ProviderRuntime | None) -> None:
    request = parse_chat_request(body)
    check_file_count(request, app.settings.max_files)
    if runtime is None:
        runtime = app.provider_for_model(request.model)
    accounts = app.accounts_for(ex, runtime)
    outcome = Outcome()
    ex.note = outcome
    try:
        await complete(ex, runtime, accounts, request, app.settings, outcome)
    finally:
        name = runtime.provider.name
        app.metrics.chunks.labels(name).inc(outcome.chunks)
        if outcome.first_event_s is not None:
            app.metrics.first_event.labels(name).observe(outcome.first_event_s)


async def chat_completions(app: App, ex: Exchange, body: bytes) -> None:
    """``POST /v1/chat/completions``: provider chosen by the model name."""
    await _chat(app, ex, body, None)


def _forced(name: str) -> RouteHandler:
    async def handler(app: App, ex: Exchange, body: bytes) -> None:
        runtime = app.providers.get(name)
        if runtime is None:
            raise NotFound(f"the {name} provider is not available")
        await _chat(app, ex, body, runtime)

    handler.__doc__ = f"``POST /{name}/v1/chat/completions``: {name} whatever the model."
    return handler


def _glm(app: App) -> tuple[ProviderRuntime, GlmProvider]:
    """The ChatGLM runtime and provider, which the media endpoints need."""
    runtime = app.providers.get("glm")
    if runtime is None or not isinstance(runtime.provider, GlmProvider):
        raise RelayError("media generation needs the ChatGLM provider", status=501,
                         code="not_implemented")
    return runtime, runtime.provider


async def images(app: App, ex: Exchange, body: bytes) -> None:
    """``POST /v1/images/generations``: ChatGLM drawing (PROTOCOLS.md 3.12).

    The drawing runs on a leased GLM account (one stream per account, like
    chat); a ``b64_json`` answer downloads the images after the lease.
    """
    request = parse_image_request(body)
    runtime, glm = _glm(app)
    accounts = app.accounts_for(ex, runtime)
    outcome = Outcome()
    ex.note = outcome
    async with ex.watch_disconnect():
        urls = await with_account(
            runtime, accounts, functools.partial(glm.draw, request=request), outcome
        )
        payload = await glm.images_body(request, urls)
        await ex.respond(200, payload)


async def videos(app: App, ex: Exchange, body: bytes) -> None:
    """``POST /v1/videos/generations``: ChatGLM video generation (PROTOCOLS.md 3.12)."""
    request = parse_video_request(body)
    runtime, glm = _glm(app)
    accounts = app.accounts_for(ex, runtime)
    outcome = Outcome()
    ex.note = outcome
    async with ex.watch_disconnect():
        result = await with_account(
            runtime, accounts, functools.partial(glm.make_video, request=request), outcome
        )
        outcome.conversation = result.conversation_id
        await ex.respond(200, videos_body([result], created=int(time.time())))


ROUTES: dict[str, dict[str, RouteHandler]] = {
    "/": {"GET": index},
    "/ping": {"GET": ping},
    "/metrics": {"GET": metrics},
    "/v1/models": {"GET": models},
    "/token/check": {"POST": token_check},
    "/v1/chat/completions": {"POST": chat_completions},
    "/step/v1/chat/completions": {"POST": _forced("step")},
    "/glm/v1/chat/completions": {"POST": _forced("glm")},
    "/v1/images/generations": {"POST": images},
    "/v1/videos/generations": {"POST": videos},
}

CORS_PREFLIGHT = [
    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
    (b"access-control-allow-headers", b"*"),
    (b"access-control-max-age", b"86400"),
]


def _route_name(path: str) -> str:
    return path if path in ROUTES else "other"


async def dispatch(app: App, ex: Exchange) -> None:
    """Route one request; log it and count it once it is answered."""
    req = ex.request
    path = req.path.rstrip("/") or "/"
    started = trio.current_time()
    try:
        methods = ROUTES.get(path)
        body = await ex.read_body()
        if methods is None:
            raise NotFound(f"unknown path {req.method} {req.path}", code="unknown_path")
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
            extra.append((b"allow", ", ".join(ROUTES[path]).encode()))
        if exc.status == 401:
            extra.append((b"www-authenticate", b"Bearer"))
        await ex.respond(exc.status, error_from_exception(exc), headers=extra)
    finally:
        _log(app, ex, path, trio.current_time() - started)


def _log(app: App, ex: Exchange, path: str, elapsed: float) -> None:
    status = ex.status if ex.started else (499 if ex.conn.gone else 0)
    app.metrics.requests.labels(_route_name(path), str(status)).inc()
    note = ex.note
    # why the response was cut short: the relay stopping ("shutdown"), a client that
    # stopped reading ("send-timeout"), or one that left ("client-gone")
    cut = f" {ex.cut}" if ex.cut else (" client-gone" if ex.conn.gone and not ex.finished else "")
    if note is not None:
        log.info(
            "%s %s %s %.1fms account=%s attempts=%d conversation=%s batches=%d%s",
            ex.request.method, ex.request.path, status or "-", elapsed * 1000,
            note.account or "-", note.attempts, note.conversation or "-", note.chunks, cut,
        )
    else:
        log.info("%s %s %s %.1fms%s", ex.request.method, ex.request.path, status or "-",
                 elapsed * 1000, cut)
