"""The ``relay`` console script.

``relay serve``   run the relay (``--demo``: with the built-in emulators)
``relay demo``    the same as ``relay serve --demo``
``relay check-token TOKEN``   is an upstream credential alive?
``relay settings``  every setting with its environment variable and default
``relay healthcheck``   GET /ping on this relay's own address (a container's HEALTHCHECK)
``relay --version``   the installed version

Every setting has a ``--flag`` on ``serve``, a ``RELAY_*`` environment
variable and a key in the optional TOML file (``--config``); the precedence
is defaults < file < environment < flags (see :mod:`relay.config`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import http.client
import importlib.metadata
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
import typing
from typing import Any

import trio

from relay import config
from relay.config import ConfigError, Settings

if typing.TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from relay.app import App

log = logging.getLogger("relay")

class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):  # an access line: its fields, not just its text
            entry["msg"] = "access"
            entry.update(access)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: Settings) -> None:
    """Log to stderr as text or JSON lines."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


# --- argument parsing -------------------------------------------------------------------


def _setting_help(f: dataclasses.Field[Any]) -> str:
    default = f.default
    if isinstance(default, tuple):
        default = ",".join(default) or "(none)"
    return f"{f.metadata.get('doc', '')} [env RELAY_{f.name.upper()}, default {default}]"


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=_setting_help(f))
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar="VALUE",
                                help=_setting_help(f))


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="relay",
        description="A fast OpenAI-compatible streaming relay for StepChat and ChatGLM, on trio.",
        epilog="Run 'relay serve --help' for every setting, or 'relay settings' for a table.",
    )
    parser.add_argument("--version", action="version", version=f"relay {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in (
        ("serve", "run the relay"),
        ("demo", "run the relay against the built-in emulators (no account, no internet)"),
    ):
        # (each flag's help states its real default: argparse's own would say None)
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--config", metavar="FILE", help="TOML settings file (or RELAY_CONFIG)")
        _add_setting_flags(p)
    check = sub.add_parser("check-token", help="check whether an upstream credential is alive")
    check.add_argument("token", help="deviceId@Oasis-Token (StepChat) or a refresh token (GLM)")
    check.add_argument("--provider", choices=["step", "glm"], default=None)
    check.add_argument("--config", metavar="FILE")
    sub.add_parser("settings", help="list every setting, its environment variable and default")
    health = sub.add_parser(
        "healthcheck",
        help="GET /ping on this relay's own address; exit 0 if it answers 200, else 1",
        description="Read the settings as 'relay serve' does (file and RELAY_* environment), "
        "then GET a path on the address the relay listens on: 127.0.0.1 (::1) when it "
        "listens on every address, its Unix socket with RELAY_UDS, HTTPS (certificate not "
        "verified) with RELAY_CERTFILE. Exit 0 on a 200, 1 otherwise: a container's "
        "HEALTHCHECK.",
    )
    health.add_argument("--config", metavar="FILE", help="TOML settings file (or RELAY_CONFIG)")
    health.add_argument("--path", default="/ping", help="the path to GET (default /ping)")
    health.add_argument("--timeout", type=float, default=HEALTHCHECK_TIMEOUT_S, metavar="SECONDS",
                        help=f"give up after this long (default {HEALTHCHECK_TIMEOUT_S:g})")
    return parser


def package_version() -> str:
    """The installed distribution's version (``setup.cfg``'s when running from a checkout
    that was never installed)."""
    try:
        return importlib.metadata.version("trio-llm-relay")
    except importlib.metadata.PackageNotFoundError:
        import configparser
        from pathlib import Path

        cfg = configparser.ConfigParser()
        cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg", encoding="utf-8")
        return cfg.get("metadata", "version", fallback="unknown")


def load_settings(args: argparse.Namespace) -> Settings:
    """Settings from the parsed arguments (plus file and environment)."""
    cli = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)}
    if args.command == "demo":
        cli["demo"] = True
    return config.load(cli, config_file=getattr(args, "config", None))


# --- serving ----------------------------------------------------------------------------------


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    """Run the relay until SIGINT/SIGTERM, then shut down gracefully."""
    from relay import registry
    from relay.embed import start_app

    # The signals are caught from the start: a supervisor may send SIGTERM as soon as
    # it reads "listening on", and that must be a graceful stop, not the default kill.
    # A second one stops at once (_stop_at_once). A failure (a port in use) comes out
    # alone, not in the nurseries' exception groups, so that main() can print one line.
    with _one_error(), trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            app = await start_app(settings, nursery)  # demo: the emulators first
            if not settings.api_keys and not settings.demo \
                    and registry.has_server_credentials(settings, registry.ENTRIES):
                log.warning("server-side accounts are configured without RELAY_API_KEYS: "
                            "anyone who reaches this port can use them")
            async with app, trio.open_nursery() as serving:
                addresses = await serving.start(
                    functools.partial(app.serve, reuse_port=reuse_port)
                )
                # Everything built so far (modules, settings, the app) lives as long
                # as the process: keep it out of the cyclic collector's way, so that
                # its full collections stay short and do not show up as stream jitter.
                gc.freeze()
                scheme = "https" if settings.certfile else "http"
                for address in addresses:
                    log.info("listening on %s://%s", scheme, address)
                if settings.demo:
                    _print_demo(scheme, addresses[0] if addresses else "")
                async for signum in signals:
                    log.info("signal %d: shutting down (grace %.0f s)", signum,
                             settings.grace_period)
                    app.shutdown()
                    break
                nursery.start_soon(_stop_at_once, signals, app)
                # leaving `serving` waits for app.serve to drain and return
            nursery.cancel_scope.cancel()


async def _stop_at_once(signals: AsyncIterator[int], app: App) -> None:
    """On a second SIGINT/SIGTERM during the graceful stop, die by that signal now.

    Nothing more runs: streams in flight end without a final event, their
    upstream conversations are not deleted, cleanup jobs still queued are
    dropped. The process ends as the signal's default action ends it (a
    supervisor sees it killed by SIGTERM or SIGINT), which is what the
    operator asked for.
    """
    async for signum in signals:
        log.warning("signal %d again: stopping at once; %d connections cut, their upstream "
                    "conversations are left undeleted", signum, app.server.connections)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return


class _one_error:
    """Raise a nursery's group holding a single exception (nested or not) as that exception."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        leaf = exc
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is not exc and leaf is not None:
            raise leaf from None


def _print_demo(scheme: str, address: str) -> None:
    url = f"{scheme}://{address}"
    print(
        "\nDemo mode: answers come from the built-in emulators (no account, no internet).\n"
        "Try it:\n\n"
        f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        "    -d '{\"model\": \"step\", \"stream\": true, "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'\n\n"
        f"  or with the openai SDK: OpenAI(base_url=\"{url}/v1\", api_key=\"demo\")\n\n"
        "  Models: step and glm-4 (the emulated web chats), emu-chat (an emulated\n"
        "  OpenAI-compatible upstream, passed through), and any of them on\n"
        "  /v1/responses (Responses API) or /v1/messages (Anthropic Messages).\n",
        flush=True,
    )


def _run(main: Callable[[Settings], Awaitable[None]], settings: Settings) -> None:
    """``trio.run(main, settings)``; a ConfigError found on the way (a malformed entry of
    a token list, when the app is built) is one line on stderr and exit status 2, as
    other configuration errors are, whether or not a nursery wrapped it in a group."""
    found: list[Exception] = []
    try:
        trio.run(main, settings)
    except* ConfigError as group:
        found.extend(group.exceptions)
    if found:
        print(f"relay: {found[0]}", file=sys.stderr)
        sys.exit(2)


def _worker(settings: Settings) -> None:
    setup_logging(settings)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            _run(functools.partial(serve, reuse_port=True), settings)
    except OSError as exc:  # cannot listen (lost a race the parent's probe passed)
        print(f"relay: {exc}", file=sys.stderr)
        sys.exit(1)


async def _probe_listeners(settings: Settings) -> None:
    """Open the workers' listeners once and close them (raises CannotListen)."""
    from relay.server import open_listeners

    for listener in await open_listeners(settings, reuse_port=True):
        await listener.aclose()


def run_workers(settings: Settings) -> int:
    """Run ``settings.workers`` processes sharing the port (SO_REUSEPORT).

    The parent binds the port once first, so that a port in use is one line
    on stderr and exit status 1, not one traceback per worker.

    The workers' metrics are prometheus-client's multi-process mode: their
    files live in a private temporary directory (``PROMETHEUS_MULTIPROC_DIR``,
    set before they start, so before they import prometheus-client), which
    any worker merges when scraped. A worker that exits is marked dead there
    (its live gauges drop out; its counts stay); the directory is removed
    once every worker has exited.
    """
    try:
        trio.run(_probe_listeners, settings)
    except OSError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    if not settings.redis_url:
        log.warning("%d workers without RELAY_REDIS_URL: account limits are per worker "
                    "(each may open its own stream on a ChatGLM account), and so are "
                    "cool-downs, cached tokens and conversation owners", settings.workers)
    from multiprocessing.connection import wait

    from prometheus_client.multiprocess import mark_process_dead

    from relay.metrics import MULTIPROC_DIR

    directory = tempfile.mkdtemp(prefix="relay-metrics-")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(settings,), daemon=False)
             for _ in range(settings.workers)]

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid:
                proc.terminate() if signum == signal.SIGTERM else _interrupt(proc.pid)

    code = 0
    try:
        before = os.environ.get(MULTIPROC_DIR)
        os.environ[MULTIPROC_DIR] = directory  # a spawned worker starts with this environment
        try:
            for proc in procs:
                proc.start()
        finally:
            if before is None:
                del os.environ[MULTIPROC_DIR]
            else:
                os.environ[MULTIPROC_DIR] = before
        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        running = {proc.sentinel: proc for proc in procs}
        while running:
            for sentinel in wait(list(running)):
                proc = running.pop(typing.cast("int", sentinel))
                proc.join()
                code = code or (proc.exitcode or 0)
                mark_process_dead(proc.pid, directory)  # type: ignore[no-untyped-call]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return code


def _interrupt(pid: int) -> None:
    import os

    os.kill(pid, signal.SIGINT)


#: ``relay check-token`` exit statuses (2 stays argparse's and config errors')
CHECK_LIVE, CHECK_DEAD, CHECK_UNKNOWN = 0, 1, 3


def _check_token(args: argparse.Namespace) -> int:
    """Print what ``/token/check`` would answer; exit 0 live, 1 dead, 3 could not tell."""
    settings = config.load(config_file=args.config)
    setup_logging(settings)

    async def check() -> dict[str, object]:
        from relay.app import App
        from relay.routes import liveness

        async with App(settings) as app:
            name = args.provider or app.providers.guess(args.token) or ""
            runtime = app.providers.get(name)
            if runtime is None:
                print(f"provider {name} is not available", file=sys.stderr)
                return {"live": False}
            return await liveness(runtime.provider, args.token.strip())

    answer = trio.run(check)
    print(json.dumps(answer, ensure_ascii=False))
    live = answer["live"]
    if live is None:
        return CHECK_UNKNOWN
    return CHECK_LIVE if live else CHECK_DEAD


#: ``relay healthcheck``'s default timeout: under the image's HEALTHCHECK --timeout
HEALTHCHECK_TIMEOUT_S = 3.0

#: a wildcard listening address, and the loopback address that reaches it
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 (a lookup, not a bind)


class _HealthConnection(http.client.HTTPConnection):
    """HTTP or HTTPS over TCP or a Unix socket (http.client has no Unix sockets)."""

    def __init__(self, host: str, port: int, *, uds: str | None,
                 context: ssl.SSLContext | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._uds = uds
        self._context = context

    def connect(self) -> None:
        sock: socket.socket
        if self._uds:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self._uds)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((self.host, self.port), self.timeout)
        if self._context is not None:
            sock = self._context.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


def _healthcheck(args: argparse.Namespace) -> int:
    """GET ``args.path`` from the relay these settings describe: 0 on a 200, else 1.

    Docker reads 0 as healthy and 1 as unhealthy (2 is reserved), so every failure,
    a bad setting included, is 1; the one line printed ends up in ``docker inspect``.
    """
    try:
        settings = config.load(config_file=args.config)
    except ConfigError as exc:
        print(f"relay healthcheck: {exc}", file=sys.stderr)
        return 1
    context: ssl.SSLContext | None = None
    if settings.certfile:
        # our own certificate, reached by a loopback address it does not name
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    scheme = "https" if context else "http"
    if settings.uds:
        host, port, where = "localhost", 0, f"{scheme}+unix://{settings.uds}"
    else:
        host, port = _LOOPBACK.get(settings.host, settings.host), settings.port
        where = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    url = where + args.path
    conn = _HealthConnection(host, port, uds=settings.uds, context=context,
                             timeout=args.timeout)
    try:
        conn.request("GET", args.path, headers={"User-Agent": "relay-healthcheck"})
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        print(f"relay healthcheck: GET {url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status != 200:
        print(f"relay healthcheck: GET {url}: status {status}", file=sys.stderr)
        return 1
    print(f"GET {url}: {status}")
    return 0


def _print_settings() -> int:
    for f in dataclasses.fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        print(f"RELAY_{f.name.upper():<26} {default!s:<22} {f.metadata.get('doc', '')}")
    return 0


#: Fewer open files than this after raising the limit is worth a warning:
#: every stream holds two (the client's connection and the upstream's)
FEW_OPEN_FILES = 4096


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit of open files to the hard limit, as servers do.

    Many systems start processes with a soft limit of 1,024, which a relay
    reaches at about 500 concurrent streams; the hard limit is usually far
    higher, and any process may raise its soft limit up to it. Workers
    inherit the raised limit.

    Returns:
        ``(soft, hard)`` after the change (unchanged where not supported).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft, hard


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``relay`` console script.

    Output piped into a reader that stops early (``relay settings | head -1``)
    ends quietly with status 1, as Python's documentation recommends, rather
    than in a BrokenPipeError traceback.
    """
    try:
        try:
            _main(argv)
        finally:
            # what is still buffered is written here, where its failure is caught,
            # not at the interpreter's exit
            sys.stdout.flush()
    except BrokenPipeError:
        # stdout's reader is gone: point the descriptor at /dev/null so that
        # the interpreter's own flush at exit has nowhere to fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


def _main(argv: Sequence[str] | None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    if args.command == "settings":
        sys.exit(_print_settings())
    if args.command == "healthcheck":
        sys.exit(_healthcheck(args))
    try:
        if args.command == "check-token":
            sys.exit(_check_token(args))
        settings = load_settings(args)
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(settings)
    soft, hard = raise_open_files_limit()
    if 0 < soft < FEW_OPEN_FILES:
        log.warning("open files limited to %d (hard limit %d): about %d concurrent streams; "
                    "raise it with ulimit -n or LimitNOFILE=", soft, hard, soft // 2)
    else:
        log.debug("open files limit: %d", soft)
    if settings.workers > 1 and not settings.demo and not settings.uds:
        sys.exit(run_workers(settings))
    started = time.monotonic()
    try:
        _run(serve, settings)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        sys.exit(1)
    log.info("stopped after %.0f s", time.monotonic() - started)
