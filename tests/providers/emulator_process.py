"""An emulator run as its own process (``python -m providers.X.emulator``), for the main() tests.

:func:`emulator_process` starts the module, reads its stdout until it says
``listening on <base url>``, and on the way out kills the child (if the test
did not stop it) and waits for it with the wait shielded: a test whose
deadline has already expired must still reap its child. An unreaped child
is not just a stray process; its ``Popen`` warns "subprocess ... is still
running" when it is collected, and under ``filterwarnings = error`` that
fails whichever later test happens to be running then.

``sigint`` sets how the child starts out treating SIGINT. A process started
as a background job of a non-interactive shell (``pytest ... &`` in a
script) starts with SIGINT ignored, and Python then leaves it ignored; the
tests pass ``signal.SIG_IGN`` to check the emulator stops on SIGINT anyway,
and ``signal.SIG_DFL`` to be independent of how pytest itself was started.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

LISTENING = re.compile(rb"listening on (http://127\.0\.0\.1:\d+(?:/v1)?)\n")
#: A child Python process: its imports take most of it, more on a loaded machine.
PROCESS_TIMEOUT_S = 20


@dataclass
class EmulatorProcess:
    """A running emulator child and the base URL it printed."""

    process: trio.Process
    base_url: str

    async def stop(self, signum: int) -> int:
        """Send ``signum`` and return the exit status once the child is gone."""
        self.process.send_signal(signum)
        return await self.process.wait()


@asynccontextmanager
async def emulator_process(
    module: str, *args: str, sigint: signal.Handlers = signal.SIG_DFL
) -> AsyncIterator[EmulatorProcess]:
    """Run ``python -m module --port 0 *args`` until it prints where it listens.

    Args:
        module: ``providers.step.emulator``, ``providers.glm.emulator`` or
            ``providers.openai.emulator`` (whose base URL ends in ``/v1``).
        args: more command-line arguments.
        sigint: the SIGINT disposition the child starts with.

    Yields:
        The child and its base URL. On exit the child is killed if still
        running, and always reaped.
    """

    def set_sigint() -> None:
        signal.signal(signal.SIGINT, sigint)

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", module, "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        preexec_fn=set_sigint,
    )
    stdout = process.stdout
    assert stdout is not None
    try:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stdout.receive_some(1024)
            assert chunk, f"the emulator exited before printing its address: {line!r}"
            line += chunk
        match = LISTENING.fullmatch(line)
        assert match is not None, line
        yield EmulatorProcess(process, match.group(1).decode())
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await stdout.aclose()
