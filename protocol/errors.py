"""The one exception tree of the relay.

Every exception we raise derives from :class:`RelayError`. Each class carries
what an OpenAI client will see when it escapes a request handler: the HTTP
``status`` and the OpenAI error ``kind`` (the ``type`` field of the error
object), as h11's ``ProtocolError.error_status_hint`` does. An instance may
override both, and may name the request parameter (``param``) and a short
machine-readable ``code``.

Remote or local, as h11 splits them: :class:`RemoteProtocolError` means a peer
(an upstream, or a client) sent bytes that break a wire format;
:class:`LocalProtocolError` means we were about to emit something illegal,
which is a bug.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""

    status: int = 500
    kind: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status


class RequestError(RelayError):
    """The client's request is malformed or names something invalid."""

    status, kind = 400, "invalid_request_error"


class NotFound(RequestError):
    """Unknown path or resource."""

    status = 404


class MethodNotAllowed(RequestError):
    """Known path, wrong method."""

    status = 405


class PayloadTooLarge(RequestError):
    """The request body is over the configured limit."""

    status = 413


class RequestTimeout(RequestError):
    """The request (its body) did not arrive in time."""

    status = 408


class AuthError(RelayError):
    """Missing or wrong credentials: the relay's own key, or an upstream account's."""

    status, kind = 401, "authentication_error"


class NoAccountFree(RelayError):
    """Every account is busy or cooling down, and waiting for one timed out."""

    status, kind = 429, "rate_limit_error"


class RateLimited(NoAccountFree):
    """The upstream rate-limited the account in use (an API key's 429).

    Unlike a web chat's busy account, which is free again when its other
    stream ends, a rate-limited key stays limited for a while: the relay
    rests it (``RELAY_ACCOUNT_COOLDOWN``) and moves on to another.
    """


class UpstreamFailed(RelayError):
    """The upstream service failed or answered something we cannot use."""

    status, kind = 502, "upstream_error"


class UpstreamTimeout(UpstreamFailed):
    """The upstream did not answer in time."""

    status = 504


class ServerShuttingDown(RelayError):
    """The relay is stopping and cut the request short (503, code ``server_shutting_down``)."""

    status = 503


class ProtocolError(RelayError):
    """Bytes that break a wire format."""


class RemoteProtocolError(ProtocolError):
    """A peer (usually the upstream) sent bytes that break a wire format."""

    status, kind = 502, "upstream_error"


class LocalProtocolError(ProtocolError):
    """We were about to emit something illegal: a bug in the relay."""
