"""One frozen :class:`Settings` object, built from defaults < TOML file < environment < CLI.

Every setting is a field of :class:`Settings`. Its environment variable is
``RELAY_<NAME>`` (upper case), its key in the optional TOML file is the same
name in lower case, and its CLI flag (for the ones ``relay serve`` exposes) is
``--name-with-dashes``. Only this module reads the environment.

Values from the environment and the CLI arrive as strings and are converted
by the field's type: booleans accept ``1/true/yes/on`` and ``0/false/no/off``,
lists are comma-separated (``RELAY_API_KEYS=k1,k2``), floats and ints as
usual. A value that does not convert is a :class:`ConfigError` naming its
source, raised before anything starts listening.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

if typing.TYPE_CHECKING:
    from collections.abc import Mapping

ENV_PREFIX = "RELAY_"

KIB = 1024
MIB = 1024 * KIB


class ConfigError(Exception):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True, slots=True)
class OpenAIUpstream:
    """One OpenAI-compatible upstream (``RELAY_OPENAI_UPSTREAMS``, ``[[openai_upstreams]]``).

    Attributes:
        name: names the provider (routes ``/<name>/v1/...``, logs, metrics).
        base_url: the upstream's OpenAI base URL, ``/v1`` included
            (``https://api.deepseek.com/v1``); a private or loopback address is
            allowed: the operator wrote it.
        api_keys: the operator's keys, rotated like accounts.
        models: model names served as they are called upstream.
        prefix: or every model under this prefix, sent upstream without it.
    """

    name: str
    base_url: str
    api_keys: tuple[str, ...] = field(repr=False)
    models: tuple[str, ...] = ()
    prefix: str = ""


def _opt(default: object, doc: str, **kw: object) -> Any:  # noqa: ANN401 - dataclass field
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the relay. See the README's configuration table."""

    # --- listening -------------------------------------------------------
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "TCP port to listen on")
    uds: str | None = _opt(None, "listen on this Unix socket path instead of TCP")
    workers: int = _opt(1, "number of worker processes (SO_REUSEPORT)")
    certfile: str | None = _opt(None, "TLS certificate chain (PEM); enables HTTPS with keyfile")
    keyfile: str | None = _opt(None, "TLS private key (PEM)")
    demo: bool = _opt(False, "serve the built-in StepChat and ChatGLM emulators (no account)")

    # --- access and accounts --------------------------------------------
    api_keys: tuple[str, ...] = _opt(
        (), "keys clients must present; when set, upstream accounts come from the token pools"
    )
    step_tokens: tuple[str, ...] = _opt(
        (), "StepChat accounts, deviceId@Oasis-Token, comma-separated"
    )
    glm_tokens: tuple[str, ...] = _opt((), "ChatGLM refresh tokens, comma-separated")
    step_base_url: str = _opt("https://yuewen.cn", "StepChat base URL")
    glm_base_url: str = _opt("https://chatglm.cn", "ChatGLM base URL")
    glm_sign_secret: str = _opt(
        "8a1317a7468aa3ad86e997d08f3f31cb", "ChatGLM request-signing secret (the site changes it)"
    )
    glm_system_tag: str = _opt("<|system|>", "role tag for system messages in merged GLM prompts")
    default_provider: str = _opt(
        "step", "provider for model names that name none: step, glm or an openai_upstreams name"
    )
    reasoning: Literal["field", "tags"] = _opt(
        "field", "reasoning as reasoning_content (field) or inline <think> tags (tags)"
    )
    step_max_streams: int = _opt(0, "concurrent streams per StepChat account (0: no limit)")
    glm_max_streams: int = _opt(1, "concurrent streams per ChatGLM account")
    account_wait_timeout: float = _opt(
        30.0, "seconds a request waits for a free account before 429"
    )
    account_cooldown: float = _opt(60.0, "seconds an account rests after an auth failure")
    token_refresh_margin: float = _opt(
        60.0, "refresh access tokens this many seconds before they expire"
    )
    openai_upstreams: tuple[OpenAIUpstream, ...] = _opt(
        (), "OpenAI-compatible upstreams: a JSON list of {name, base_url, api_keys, models or "
        "prefix} ([[openai_upstreams]] tables in the TOML file)"
    )
    redis_url: str | None = _opt(
        None, "Redis (redis://, rediss:// or unix://) holding account state for every worker "
        "and instance; unset: in-process"
    )
    redis_lease_expiry: float = _opt(
        30.0, "with Redis: seconds an account lease outlives an instance that died holding it"
    )
    redis_lease_renew: float = _opt(
        10.0, "with Redis: seconds between renewals of the leases of running streams"
    )

    # --- limits ------------------------------------------------------------
    max_body_bytes: int = _opt(64 * MIB, "largest request body accepted (413 above)")
    max_header_bytes: int = _opt(64 * KIB, "largest request head accepted (431 above)")
    file_max_bytes: int = _opt(100 * MIB, "largest file fetched from a URL or data URL")
    max_files: int = _opt(10, "file and image parts one request may carry (400 above)")
    files_max_bytes: int = _opt(
        100 * MIB, "all files of one request together, fetched or decoded (400 above)"
    )
    allow_private_urls: bool = _opt(
        False, "let file URLs point at loopback, private and link-local addresses"
    )

    # --- timeouts (seconds) ---------------------------------------------------
    connect_timeout: float = _opt(10.0, "upstream connect timeout")
    first_byte_timeout: float = _opt(120.0, "request sent to first upstream stream data")
    stall_timeout: float = _opt(120.0, "longest silence inside an upstream stream")
    request_timeout: float = _opt(15.0, "upstream unary calls (token, create, delete, status)")
    upload_timeout: float = _opt(60.0, "fetching and uploading one file")
    header_timeout: float = _opt(10.0, "a client's request head must arrive within this")
    keepalive_timeout: float = _opt(60.0, "idle client connections are closed after this")
    body_timeout: float = _opt(30.0, "a whole request body must arrive within this (408 above)")
    send_timeout: float = _opt(
        30.0, "a send to the client that makes no progress for this long ends the response"
    )
    commit_timeout: float = _opt(
        5.0, "how long a stream waits for the first upstream event before sending 200"
    )
    sse_keepalive: float = _opt(15.0, "SSE comment interval while the upstream is silent")
    cleanup_timeout: float = _opt(10.0, "bound on deleting an upstream conversation")
    grace_period: float = _opt(10.0, "on SIGTERM, how long streams in flight may finish")
    step_file_settle: float = _opt(
        1.0, "pause after a StepChat upload is processed (the reference waits 5 s)"
    )
    video_timeout: float = _opt(600.0, "longest wait for a ChatGLM video")
    video_poll_interval: float = _opt(1.0, "seconds between ChatGLM video status polls")

    # --- operations ---------------------------------------------------------------
    upstream_proxy: str | None = _opt(None, "HTTP proxy URL for upstream calls")
    metrics_public: bool = _opt(
        False, "serve /metrics without an API key even when api_keys is set"
    )
    log_format: Literal["text", "json"] = _opt("text", "log line format")
    log_level: str = _opt("info", "debug, info, warning or error")

    def with_changes(self, **changes: object) -> Settings:
        """A copy with some fields replaced (validated like the rest)."""
        return build(self, changes, source="override")


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


#: An upstream's name: it becomes a path segment and a metrics label.
UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Names of the built-in providers, which an upstream may not take.
BUILT_IN_PROVIDERS = ("step", "glm")
_UPSTREAM_KEYS = ("name", "base_url", "api_keys", "models", "prefix")
#: What an API key may hold: it goes into an Authorization header.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


def _strings(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"{what} must be a list of strings")
    if not all(isinstance(item, str) and item.strip() for item in value):
        raise ValueError(f"{what} must be a list of non-empty strings")
    return tuple(item.strip() for item in value)


def _upstream(value: object, position: int) -> OpenAIUpstream:
    """One upstream from its table (TOML) or object (JSON).

    Raises:
        ValueError: naming the entry (``entry N``) and the field at fault; never a key.
    """
    if isinstance(value, OpenAIUpstream):
        return value
    at = f"entry {position}"
    if not isinstance(value, dict):
        raise ValueError(f"{at} must be a table (an object) with name, base_url, api_keys "
                         "and models or prefix")
    unknown = sorted(set(value) - set(_UPSTREAM_KEYS))
    if unknown:
        raise ValueError(f"{at}: unknown field {unknown[0]!r}")
    name = value.get("name")
    if not isinstance(name, str) or UPSTREAM_NAME.fullmatch(name) is None:
        raise ValueError(f"{at}: name must be 1-64 letters, digits, '.', '_' or '-', "
                         "beginning with a letter or digit")
    at = f"entry {position} ({name})"
    if name.lower() in BUILT_IN_PROVIDERS:
        raise ValueError(f"{at}: the name {name!r} is a built-in provider's")
    base_url = value.get("base_url")
    if not isinstance(base_url, str) or not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?",
                                                         base_url):
        raise ValueError(f"{at}: base_url must be an http:// or https:// URL")
    if "@" in base_url.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError(f"{at}: base_url must not hold credentials (put the key in api_keys)")
    keys = _strings(value.get("api_keys"), f"{at}: api_keys")
    if not keys:
        raise ValueError(f"{at}: api_keys must name at least one key")
    if not all(_KEY_CHARS.fullmatch(key) for key in keys):
        raise ValueError(f"{at}: an API key may hold printable ASCII only, no spaces")
    models = _strings(value.get("models", []), f"{at}: models")
    prefix = value.get("prefix", "")
    if not isinstance(prefix, str) or prefix != prefix.strip():
        raise ValueError(f"{at}: prefix must be a string without surrounding spaces")
    if not models and not prefix:
        raise ValueError(f"{at}: give models (a list of names) or a prefix")
    return OpenAIUpstream(name, base_url.rstrip("/"), keys, models, prefix)


def parse_upstreams(value: object) -> tuple[OpenAIUpstream, ...]:
    """``openai_upstreams`` from JSON text (environment, CLI), TOML tables, or objects.

    Raises:
        ValueError: not a list of valid upstreams, or two share a name.
    """
    if isinstance(value, str):
        if not value.strip():
            return ()
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"must be a JSON list of upstreams: {exc}") from None
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list of upstreams")
    upstreams = tuple(_upstream(item, position) for position, item in enumerate(value, 1))
    names = [u.name.lower() for u in upstreams]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two upstreams are named {name!r}")
    return upstreams


def _convert(name: str, value: Any, source: str) -> object:  # noqa: ANN401 - TOML/env values
    """Convert ``value`` (a string, or a TOML value) to the type of field ``name``."""
    if name == "openai_upstreams":
        try:
            return parse_upstreams(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {name}: {exc}") from exc
    if name == "default_provider":
        # the web chats' names in any case, as when this was a fixed choice; an
        # upstream's name as it is configured (checked in _validate)
        text = str(value).strip()
        return text.lower() if text.lower() in ("step", "glm") else text
    hint = typing.get_type_hints(Settings)[name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if optional:
        if value is None or value == "":
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if typing.get_origin(hint) is Literal:
            allowed = typing.get_args(hint)
            text = str(value).strip().lower()
            if text not in allowed:
                raise ValueError(f"must be one of {', '.join(allowed)}")
            return text
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("must be true or false")
        if hint is int:
            if isinstance(value, bool | float):  # TOML 1.5 must not become 1
                raise ValueError("must be an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("must be a number")
            number = float(value)
            if number != number or number < 0:
                raise ValueError("must be a non-negative number")
            return number
        if typing.get_origin(hint) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip() for item in items if str(item).strip())
        if hint is str:
            if not isinstance(value, str):
                raise ValueError("must be a string")
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name}: {exc}") from exc
    raise ConfigError(f"{source}: {name}: unsupported setting type {hint!r}")


def build(
    base: Settings, values: Mapping[str, object], *, source: str, validate: bool = True
) -> Settings:
    """Return ``base`` with ``values`` applied (names are field names).

    Args:
        base: the settings to start from.
        values: field names and raw values (strings, or TOML values).
        source: where the values come from, for error messages.
        validate: check the result as a whole (:func:`load` does it once, at
            the end, so that related settings may come from different sources).

    Raises:
        ConfigError: an unknown name, a value that does not convert, or (with
            ``validate``) one that cannot be used.
    """
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name not in FIELDS:
            raise ConfigError(f"{source}: unknown setting {name!r}")
        changes[name] = _convert(name, value, source)
    settings = dataclasses.replace(base, **changes)
    if validate:
        _validate(settings, dict.fromkeys(changes, source))
    return settings


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _validate(s: Settings, origin: Mapping[str, str]) -> None:
    """Check the values that convert but cannot be used together or at all.

    Raises:
        ConfigError: naming the source (``origin[name]``) of the setting at fault.
    """

    def fail(name: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{origin.get(name, 'default')}: {name}: {message}")

    if not 0 <= s.port <= 65535:
        fail("port", f"{s.port} is out of range (0-65535)")
    if s.workers < 1:
        fail("workers", "must be at least 1")
    if bool(s.certfile) != bool(s.keyfile):
        fail("certfile" if s.certfile else "keyfile", "certfile and keyfile go together")
    for name in ("step_base_url", "glm_base_url"):
        url = getattr(s, name)
        if not url.startswith(("http://", "https://")):
            fail(name, f"must be an http:// or https:// URL, not {url!r}")
    for name in ("max_body_bytes", "max_header_bytes"):
        if getattr(s, name) < 1024:
            fail(name, "must be at least 1024")
    if s.glm_max_streams < 1:
        fail("glm_max_streams", "must be at least 1")
    if s.max_files < 0:
        fail("max_files", "must be at least 0")
    for name in ("file_max_bytes", "files_max_bytes"):
        if getattr(s, name) < 1:
            fail(name, "must be at least 1")
    if s.step_max_streams < 0:
        fail("step_max_streams", "must be at least 0")
    if s.redis_url is not None and not s.redis_url.startswith(REDIS_SCHEMES):
        # not echoed: the URL may carry a password
        fail("redis_url", f"must begin with {', '.join(REDIS_SCHEMES)}")
    if not 0 < s.redis_lease_renew < s.redis_lease_expiry:
        fail("redis_lease_renew", "must be above 0 and below redis_lease_expiry")
    providers = ("step", "glm", *(upstream.name for upstream in s.openai_upstreams))
    if s.default_provider not in providers:
        fail("default_provider", f"must be one of {', '.join(providers)}, "
             f"not {s.default_provider[:40]!r}")
    if s.log_level.lower() not in LOG_LEVELS:
        fail("log_level", f"must be one of {', '.join(LOG_LEVELS)}")


def from_toml(path: str) -> dict[str, Any]:
    """Read a TOML config file: top-level keys are setting names in lower case."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    return data


def from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``RELAY_*`` variables that name a setting."""
    out = {}
    for name in FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            out[name] = environ[key]
    return out


def load(
    cli: Mapping[str, object] | None = None,
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings: defaults < TOML file < environment < CLI.

    Args:
        cli: values given on the command line (None values are skipped).
        config_file: a TOML file; ``RELAY_CONFIG`` names one when this is None.
        environ: the environment (``os.environ`` when None).

    Raises:
        ConfigError: an unknown name, a value that does not convert, or one
            that cannot be used; the message names the source at fault.
    """
    env = os.environ if environ is None else environ
    layers: list[tuple[Mapping[str, object], str]] = []
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        layers.append((from_toml(path), f"config file {path}"))
    layers.append((from_environ(env), "environment"))
    if cli:
        layers.append(({k: v for k, v in cli.items() if v is not None}, "command line"))
    settings = Settings()
    origin: dict[str, str] = {}
    for values, source in layers:
        # validated once, below: certfile may come from the file and keyfile from
        # the environment, and an intermediate layer must not be judged alone
        settings = build(settings, values, source=source, validate=False)
        origin.update(dict.fromkeys(values, source))
    _validate(settings, origin)
    return settings
