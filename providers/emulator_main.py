"""The process around an emulator: serve until SIGINT or SIGTERM, then exit 0.

Both emulators' ``main()`` (``python -m providers.step.emulator``,
``python -m providers.glm.emulator``) run through :func:`serve_until_signal`,
which the benchmarks and ``relay serve --demo``'s users rely on:

- the signal receiver is open *before* "listening on URL" is printed, so a
  parent that signals as soon as it reads that line is always heard, even
  when it started the child with SIGINT ignored (a background job of a
  non-interactive shell does: Python then installs no KeyboardInterrupt
  handler of its own);
- whatever was allocated to start serving is moved out of the garbage
  collector's reach (``gc.freeze()``), so collections walk only what
  requests allocate and their pauses do not show up as relay latency.
"""

from __future__ import annotations

import gc
import signal
from functools import partial
from typing import TYPE_CHECKING, Protocol

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


class Emulator(Protocol):
    """What :func:`run_emulator` needs of an emulator."""

    @property
    def base_url(self) -> str: ...
    @property
    def serve(self) -> Callable[..., Awaitable[None]]: ...


def run_emulator(emulator: Emulator, host: str, port: int) -> None:
    """Serve ``emulator`` on ``host``/``port`` until SIGINT or SIGTERM (every ``main()``)."""
    serve_until_signal(partial(emulator.serve, host=host, port=port), lambda: emulator.base_url)


def serve_until_signal(
    serve: Callable[..., Awaitable[None]], base_url: Callable[[], str]
) -> None:
    """Run ``serve`` (started with ``nursery.start``) until SIGINT or SIGTERM.

    Args:
        serve: the emulator's serve coroutine function, taking ``task_status``.
        base_url: the URL it listens on, read once it has started.
    """

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve)
                gc.collect()
                gc.freeze()
                print(f"listening on {base_url()}", flush=True)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()

    trio.run(run)
