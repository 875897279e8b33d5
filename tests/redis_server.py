"""A real ``redis-server`` on a free loopback port, for the shared-state tests.

:func:`redis_server` starts Debian's ``redis-server`` binary (no persistence:
``--save ''``, ``--appendonly no``, its files in a temporary directory) and
stops it on the way out. Where the binary is missing, :data:`MISSING` says
why the tests that need it are skipped.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
MISSING = ("redis-server is not installed (Debian: apt-get install redis-server; .ci/run "
           "installs it): the shared account state tests need a real one")
#: A generous bound on the server's start (it takes milliseconds)
START_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class RedisServer:
    """A running redis-server."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def free_port() -> int:
    """A loopback port nothing listens on (bound once and closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_listening(process: subprocess.Popen[bytes], port: int) -> None:
    """Return once ``port`` accepts connections; raise if the server exits or is slow."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not listen within {START_TIMEOUT_S:g} s")
        time.sleep(0.01)


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """Run a redis-server on 127.0.0.1 until the block ends.

    Args:
        directory: its working directory (it writes nothing there without persistence).

    Raises:
        RuntimeError: it did not start.
    """
    assert REDIS_SERVER is not None, MISSING
    port = free_port()
    process = subprocess.Popen(  # noqa: S603 - the installed redis-server, fixed arguments
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--loglevel", "warning"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(process, port)
        yield RedisServer(process, port)
    finally:
        process.terminate()
        try:
            process.wait(START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
