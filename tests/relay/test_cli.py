"""The ``relay`` command line (relay.cli): parser, settings from flags, and real processes.

Parser and settings tests run in-process. The serve tests start
``python -m relay serve --demo --port 0`` as a child process, read its log
until it says where it listens, talk to it with httpcore, then signal it and
expect a clean exit (status 0) within a few seconds.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import re
import resource
import signal
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpcore
import orjson
import pytest
import trio
import trustme

from relay import cli, config
from relay.app import App
from relay.config import FIELDS
from tests.relay.conftest import sse_events, sse_text

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.relay.conftest import RelayFactory

LISTENING = re.compile(rb"listening on (https?)://([0-9.]+):(\d+)\n")
ENV_NAMES = sorted("RELAY_" + name.upper() for name in FIELDS)
PROCESS_TIMEOUT_S = 10  # a child Python process: imports take most of it


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RELAY_* variable of the developer's shell leaks into load_settings."""
    for key in list(os.environ):
        if key.startswith("RELAY_"):
            monkeypatch.delenv(key)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child relay: ours without RELAY_*, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(extra)
    return env


# --- parser -------------------------------------------------------------------------------------


def test_parser_has_the_subcommands() -> None:
    """serve, demo, check-token and settings all parse."""
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).command == "serve"
    assert parser.parse_args(["demo"]).command == "demo"
    assert parser.parse_args(["settings"]).command == "settings"
    check = parser.parse_args(["check-token", "dev@tok", "--provider", "step"])
    assert (check.command, check.token, check.provider) == ("check-token", "dev@tok", "step")
    with pytest.raises(SystemExit):
        parser.parse_args(["frobnicate"])


def test_serve_help_names_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    """``relay serve --help`` mentions every RELAY_ variable with its real default, and no
    misleading argparse "(default: None)"."""
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["serve", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    missing = [name for name in ENV_NAMES if name not in text]
    assert missing == []
    assert "--keepalive-timeout" in text
    assert "default 8000" in text
    assert "(default: None)" not in text


def test_load_settings_maps_flags(clean_env: None) -> None:
    """Flags become settings: values converted, booleans as --x/--no-x, lists split."""
    args = cli.build_parser().parse_args([
        "serve", "--host", "0.0.0.0", "--port", "9001", "--allow-private-urls",  # noqa: S104
        "--api-keys", "k1,k2", "--header-timeout", "2.5", "--no-demo", "--reasoning", "tags",
    ])
    s = cli.load_settings(args)
    assert (s.host, s.port, s.allow_private_urls) == ("0.0.0.0", 9001, True)  # noqa: S104
    assert s.api_keys == ("k1", "k2")
    assert (s.header_timeout, s.demo, s.reasoning) == (2.5, False, "tags")
    assert s.keepalive_timeout == 60.0  # not given: the default


def test_flags_override_environment_and_file(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--config FILE < RELAY_* < flags, through the real parser."""
    path = tmp_path / "relay.toml"
    path.write_text("port = 1111\nworkers = 3\nlog_format = \"json\"\n", encoding="utf-8")
    monkeypatch.setenv("RELAY_PORT", "2222")
    monkeypatch.setenv("RELAY_WORKERS", "2")
    args = cli.build_parser().parse_args(["serve", "--config", str(path), "--port", "3333"])
    s = cli.load_settings(args)
    assert (s.port, s.workers, s.log_format) == (3333, 2, "json")


def test_demo_command_turns_demo_on(clean_env: None) -> None:
    """``relay demo`` is ``relay serve --demo``."""
    assert cli.load_settings(cli.build_parser().parse_args(["demo"])).demo is True
    assert cli.load_settings(cli.build_parser().parse_args(["serve"])).demo is False


def test_bad_flag_value_exits_2_with_a_message(
    clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flag that does not convert stops the CLI with status 2 and names flag and source."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--port", "eighty"])
    assert exited.value.code == 2
    assert "command line: port" in capsys.readouterr().err


def test_check_token_with_a_bad_config_exits_2(
    clean_env: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """check-token with an unusable config file gives a one-line error and status 2, not a
    traceback."""
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(SystemExit) as exited:
        cli.main(["check-token", "dev@tok", "--config", missing])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("relay: config file")
    assert "missing.toml" in err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """``relay`` alone prints the usage and exits 2."""
    with pytest.raises(SystemExit) as exited:
        cli.main([])
    assert exited.value.code == 2
    assert "serve" in capsys.readouterr().out


def test_settings_command_prints_every_variable() -> None:
    """``python -m relay settings`` lists every RELAY_ variable, one a line, and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "settings"],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, env=child_env(), check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    listed = sorted(line.split()[0] for line in lines if line.startswith("RELAY_"))
    assert listed == ENV_NAMES
    port_line = next(line for line in lines if line.startswith("RELAY_PORT "))
    assert "8000" in port_line


# --- a real process -------------------------------------------------------------------------------


@dataclass
class Child:
    """A ``relay serve`` child process and what it said so far."""

    process: trio.Process
    stderr: bytearray
    scheme: str = ""
    host: str = ""
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    async def read_stderr_until(self, pattern: re.Pattern[bytes]) -> re.Match[bytes]:
        """Read the child's stderr until ``pattern`` matches; the match."""
        assert self.process.stderr is not None
        while (found := pattern.search(self.stderr)) is None:
            chunk = await self.process.stderr.receive_some(65536)
            assert chunk, f"relay exited early:\n{self.stderr.decode(errors='replace')}"
            self.stderr += chunk
        return found

    async def drain_stderr(self) -> None:
        """Read the rest of stderr (until the child closes it)."""
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some(65536):
            self.stderr += chunk


async def reap(process: trio.Process) -> None:
    """Kill ``process`` if it still runs and wait for it, even when cancelled."""
    if process.returncode is None:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


@asynccontextmanager
async def relay_process(
    *args: str, open_files: tuple[int, int | None] | None = None
) -> AsyncIterator[Child]:
    """Start ``python -m relay serve --port 0 <args>``; report where it listens.

    ``open_files``: the child's soft and hard limits of open files at its
    start (None: the hard limit as it is). Killed on the way out if the test
    did not stop it.
    """

    def limit_open_files() -> None:
        if open_files is not None:
            soft, hard = open_files
            if hard is None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "--port", "0", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=child_env(RELAY_LOG_LEVEL="info", RELAY_GRACE_PERIOD="3"),
        preexec_fn=limit_open_files,
    )
    child = Child(process, bytearray())
    try:
        found = await child.read_stderr_until(LISTENING)
        child.scheme, child.host, child.port = (
            found[1].decode(), found[2].decode(), int(found[3]))
        yield child
    finally:
        await reap(process)
        if process.stderr is not None:
            await process.stderr.aclose()


async def stop(child: Child, signum: int) -> int:
    """Send ``signum``, read the remaining log, and return the exit status."""
    child.process.send_signal(signum)
    await child.drain_stderr()
    return await child.process.wait()


async def test_demo_serves_and_sigint_exits_0() -> None:
    """``relay serve --demo --port 0`` logs its address, answers /ping and a streamed demo
    chat, and exits 0 on SIGINT after a graceful shutdown."""
    with trio.fail_after(PROCESS_TIMEOUT_S):
        async with relay_process("--demo") as child, httpcore.AsyncConnectionPool() as pool:
            assert child.scheme == "http"
            assert child.host == "127.0.0.1"
            ping = await pool.request("GET", child.base_url + "/ping")
            chat = await pool.request(
                "POST", child.base_url + "/v1/chat/completions",
                headers=[(b"content-type", b"application/json"),
                         (b"authorization", b"Bearer demo")],
                content=orjson.dumps({"model": "step", "stream": True,
                                      "messages": [{"role": "user", "content": "Hello!"}]}),
            )
            await pool.aclose()  # no idle keep-alive connection for the shutdown to wait on
            status = await stop(child, signal.SIGINT)
    assert ping.content == b"pong"
    assert chat.status == 200
    assert sse_text(chat.content)
    assert sse_events(chat.content)[-1] == b"[DONE]"
    assert status == 0, child.stderr.decode(errors="replace")
    assert b"shutting down" in child.stderr
    assert b"Traceback" not in child.stderr


def _open_files_limits(pid: int) -> tuple[str, str]:
    """(soft, hard) "Max open files" of a running process, from /proc."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError("no open-files line in /proc/PID/limits")


@pytest.mark.skipif(not os.path.exists("/proc/self/limits"), reason="needs Linux /proc")
async def test_serve_raises_its_open_files_limit_to_the_hard_limit() -> None:
    """Started with a soft limit of 256 (about 128 streams), the relay raises it to the
    hard limit before it listens."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit leaves nothing to raise")
    with trio.fail_after(PROCESS_TIMEOUT_S):
        async with relay_process("--demo", open_files=(256, None)) as child:
            soft_now, hard_now = _open_files_limits(child.process.pid)
            status = await stop(child, signal.SIGTERM)
    assert soft_now == hard_now, (soft_now, hard_now)
    assert status == 0, child.stderr.decode(errors="replace")
    if hard == resource.RLIM_INFINITY or hard >= cli.FEW_OPEN_FILES:
        assert b"open files limited" not in child.stderr


async def test_serve_warns_when_the_hard_limit_is_low() -> None:
    """A hard limit of 300 open files is used whole, and the log says what it allows."""
    with trio.fail_after(PROCESS_TIMEOUT_S):
        async with relay_process("--demo", open_files=(200, 300)) as child:
            status = await stop(child, signal.SIGTERM)
    assert status == 0, child.stderr.decode(errors="replace")
    assert b"open files limited to 300 (hard limit 300): about 150 concurrent streams" in (
        child.stderr
    )


def test_a_low_hard_limit_is_used_whole() -> None:
    """raise_open_files_limit takes the soft limit up to the hard one, never past it."""
    script = (
        "import resource; from relay.cli import raise_open_files_limit as r\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))\n"
        "print(*r(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    done = subprocess.run(  # noqa: S603 (our own interpreter and script)
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
        env=child_env(), check=True,
    )
    assert done.stdout.split() == ["300", "300", "300", "300"]


async def test_sigterm_right_after_listening_exits_0() -> None:
    """SIGTERM sent the moment the log says "listening on" is a graceful stop (status 0),
    not a kill: the signals are caught before the address is reported."""
    with trio.fail_after(PROCESS_TIMEOUT_S):
        async with relay_process("--demo") as child:
            status = await stop(child, signal.SIGTERM)
    assert status == 0, child.stderr.decode(errors="replace")
    assert b"signal %d: shutting down" % signal.SIGTERM in child.stderr



async def test_sigterm_while_the_banner_is_still_being_written_exits_0() -> None:
    """A supervisor that is slow to read stdout holds the demo banner back after "listening
    on" was logged; SIGTERM then is still a graceful stop (status 0), not a kill (-15)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:  # fill the pipe: the child's banner write blocks until we read
        while True:
            os.write(write_fd, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(write_fd, True)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "--demo", "--port", "0"],
        stdin=subprocess.DEVNULL, stdout=write_fd, stderr=subprocess.PIPE, env=child_env(),
    )
    os.close(write_fd)
    child = Child(process, bytearray())
    stdout = trio.lowlevel.FdStream(read_fd)
    banner = bytearray()
    try:
        with trio.fail_after(PROCESS_TIMEOUT_S):
            await child.read_stderr_until(LISTENING)
            process.send_signal(signal.SIGTERM)
            await trio.sleep(0.05)  # let the signal land while the child is blocked
            while chunk := await stdout.receive_some(1 << 20):
                banner += chunk
            await child.drain_stderr()
            status = await process.wait()
    finally:
        await reap(process)
        await stdout.aclose()
        if process.stderr is not None:
            await process.stderr.aclose()
    assert status == 0, child.stderr.decode(errors="replace")
    assert b"Demo mode" in banner


async def _hold_a_request_open(child: Child) -> trio.SocketStream:
    """A connection whose request is in flight: its head, and a body that never comes."""
    stream = await trio.open_tcp_stream(child.host, child.port)
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    return stream


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_second_signal_stops_at_once(signum: int) -> None:
    """During a 600 s grace period with a request in flight, a second SIGTERM or SIGINT
    ends the process at once, killed by that signal, after one warning line (what is cut)
    and without a traceback."""
    with trio.fail_after(PROCESS_TIMEOUT_S):
        async with relay_process("--demo", "--grace-period", "600") as child:
            held = await _hold_a_request_open(child)
            child.process.send_signal(signum)
            await child.read_stderr_until(re.compile(rb"shutting down \(grace 600 s\)"))
            status = await stop(child, signum)
            await held.aclose()
    assert status == -signum, child.stderr.decode(errors="replace")
    assert b"signal %d again: stopping at once; 1 connections cut" % signum in child.stderr
    assert b"Traceback" not in child.stderr


def _held_port() -> socket.socket:
    """A listening socket on a loopback port, so that the port is in use."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["one", "workers"])
def test_a_port_in_use_is_one_line_and_status_1(extra: list[str]) -> None:
    """``relay serve --port <a port in use>`` (with --workers too) prints one line naming
    the address and the reason, and exits 1."""
    with _held_port() as held:
        port = held.getsockname()[1]
        done = subprocess.run(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "relay", "serve", "--host", "127.0.0.1",
             "--port", str(port), *extra],
            capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, env=child_env(),
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"relay: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_a_unix_socket_path_in_use_is_one_line_and_status_1(tmp_path: Path) -> None:
    """``relay serve --uds PATH`` where PATH is taken (a regular file, which is never
    replaced) prints one line naming the path, and exits 1."""
    path = tmp_path / "taken"
    path.write_text("not a socket")
    done = subprocess.run(  # noqa: S603 (our own interpreter and module)
        [sys.executable, "-m", "relay", "serve", "--uds", str(path)],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, env=child_env(), check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"relay: cannot listen on {path}: address already in use\n"
    assert path.read_text() == "not a socket"


async def test_workers_share_the_port() -> None:
    """``--workers 2`` starts two processes listening on the same port (SO_REUSEPORT set
    before bind), both serving, and SIGTERM stops them with status 0."""
    with _held_port() as spare:
        port = spare.getsockname()[1]
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "--port", str(port), "--workers", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=child_env(RELAY_LOG_LEVEL="info", RELAY_GRACE_PERIOD="3"),
    )
    child = Child(process, bytearray())
    twice = re.compile(rb"(listening on http://127\.0\.0\.1:%d\n[^\n]*){2}" % port, re.S)
    try:
        with trio.fail_after(PROCESS_TIMEOUT_S):
            await child.read_stderr_until(twice)
            async with httpcore.AsyncConnectionPool() as pool:
                ping = await pool.request("GET", f"http://127.0.0.1:{port}/ping")
            status = await stop(child, signal.SIGTERM)
    finally:
        await reap(process)
        if process.stderr is not None:
            await process.stderr.aclose()
    assert ping.content == b"pong"
    assert status == 0, child.stderr.decode(errors="replace")
    assert b"Traceback" not in child.stderr


# --- --version, a closed pipe, healthcheck ------------------------------------------------------


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``relay --version`` prints ``relay <version>`` (the installed distribution's) and
    exits 0."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"relay {importlib.metadata.version('trio-llm-relay')}\n"


def test_version_of_a_checkout_that_was_never_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without installed metadata the version is setup.cfg's."""

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    cfg = configparser.ConfigParser()
    cfg.read(Path(cli.__file__).resolve().parent.parent / "setup.cfg")
    assert cli.package_version() == cfg["metadata"]["version"]


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("argv", [["settings"], ["--version"], ["serve", "--help"]])
def test_output_into_a_closed_pipe_ends_quietly(argv: list[str], buffered: bool) -> None:
    """``relay settings | head -1`` with the reader gone before the output is written:
    nothing on stderr (no BrokenPipeError traceback, no "Exception ignored" at the
    interpreter's exit), whether stdout is buffered or not (PYTHONUNBUFFERED). The status
    is 1 where the output was cut; argparse's own output (--version, --help) ignores a
    failed write and may exit 0."""
    env = child_env()
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the child writes: every write fails with EPIPE
    try:
        done = subprocess.run(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "relay", *argv], stdin=subprocess.DEVNULL,
            stdout=write_end, stderr=subprocess.PIPE, timeout=PROCESS_TIMEOUT_S,
            env=env, check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == b""
    assert done.returncode == 1 if argv == ["settings"] else done.returncode in (0, 1)


def test_a_reader_that_stops_after_one_line() -> None:
    """``relay settings`` into a reader that takes one line and closes: no traceback,
    whether the rest was written before the close (status 0) or not (status 1)."""
    with subprocess.Popen(
        [sys.executable, "-m", "relay", "settings"], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        first = process.stdout.readline()
        process.stdout.close()
        errors = process.stderr.read()
        status = process.wait(timeout=PROCESS_TIMEOUT_S)
    assert first.startswith(b"RELAY_")
    assert errors == b""
    assert status in (0, 1)


async def run_healthcheck(
    monkeypatch: pytest.MonkeyPatch, *args: str, **env: str
) -> int:
    """``relay healthcheck ARGS`` in a thread (it blocks) with these RELAY_* variables and
    no other; its exit status."""
    for key in list(os.environ):
        if key.startswith("RELAY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def run() -> int:
        try:
            cli.main(["healthcheck", *args])
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    with trio.fail_after(PROCESS_TIMEOUT_S):
        return await trio.to_thread.run_sync(run)


async def test_healthcheck_gets_ping_on_the_port_of_the_settings(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With RELAY_HOST=0.0.0.0 (the image's) and RELAY_PORT, the health check asks
    127.0.0.1 on that port for /ping: status 0 and one line."""
    relay = await relay_factory()
    status = await run_healthcheck(monkeypatch, RELAY_HOST="0.0.0.0",  # noqa: S104
                                   RELAY_PORT=str(relay.port))
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == f"GET http://127.0.0.1:{relay.port}/ping: 200\n"


async def test_healthcheck_speaks_https_when_the_relay_does(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    """With RELAY_CERTFILE the health check uses HTTPS (the certificate, the relay's own,
    is not verified: it is reached by an address it may not name)."""
    cert = trustme.CA().issue_cert("relay.example")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    relay = await relay_factory(certfile=str(certfile), keyfile=str(keyfile))
    status = await run_healthcheck(monkeypatch, RELAY_PORT=str(relay.port),
                                   RELAY_CERTFILE=str(certfile), RELAY_KEYFILE=str(keyfile))
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == f"GET https://127.0.0.1:{relay.port}/ping: 200\n"


async def test_healthcheck_over_the_unix_socket(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    """With RELAY_UDS the health check goes through the socket."""
    path = str(tmp_path / "relay.sock")
    app = App(config.load({"uds": path, "grace_period": 1.0}, environ={}))
    await nursery.start(app.serve)
    try:
        status = await run_healthcheck(monkeypatch, RELAY_UDS=path)
    finally:
        app.shutdown()
        with trio.move_on_after(5):
            await app.stopped.wait()
        await app.aclose()
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == f"GET http+unix://{path}/ping: 200\n"


async def test_healthcheck_fails_with_status_1_and_one_line(
    relay_factory: RelayFactory, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nothing listening, an answer other than 200, a malformed setting: status 1 (Docker's
    "unhealthy"; 2 is reserved) and one line on stderr, never a traceback."""
    with _held_port() as spare:
        free = spare.getsockname()[1]
    refused = await run_healthcheck(monkeypatch, RELAY_PORT=str(free))
    refused_err = capsys.readouterr().err
    relay = await relay_factory()
    missing = await run_healthcheck(monkeypatch, "--path", "/nowhere",
                                    RELAY_PORT=str(relay.port))
    missing_err = capsys.readouterr().err
    malformed = await run_healthcheck(monkeypatch, RELAY_PORT="eighty")
    malformed_err = capsys.readouterr().err
    assert (refused, missing, malformed) == (1, 1, 1)
    assert refused_err.startswith(f"relay healthcheck: GET http://127.0.0.1:{free}/ping: ")
    assert missing_err == (f"relay healthcheck: GET http://127.0.0.1:{relay.port}/nowhere: "
                           "status 404\n")
    assert malformed_err.startswith("relay healthcheck: ")
    assert "RELAY_PORT" in malformed_err or "port" in malformed_err
    for err in (refused_err, missing_err, malformed_err):
        assert err.count("\n") == 1, err
