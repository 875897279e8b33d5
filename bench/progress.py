"""How a benchmark run reports progress, without depending on a terminal library.

The runners call :class:`Progress` methods; ``bench.report`` draws them with
rich, tests pass :class:`NoProgress`.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Where runs report progress."""

    def begin(self, description: str, total: int) -> None:
        """A run of ``total`` streams starts (0: the total is not known)."""

    def advance(self) -> None:
        """One stream of the current run ended."""

    def end(self) -> None:
        """The current run ended."""


class NoProgress:
    """A :class:`Progress` that shows nothing."""

    def begin(self, description: str, total: int) -> None:
        """Ignore."""

    def advance(self) -> None:
        """Ignore."""

    def end(self) -> None:
        """Ignore."""
