"""Remove inline citation markers from streamed text, across chunk borders.

Both upstreams put citation markers into answer text: StepChat writes
``<web_3f9a2b>``, ``<url_x>`` or ``<unknown_x>`` (PROTOCOLS.md 2.7), ChatGLM
``【1†source】`` (3.9). The references strip them only in non-stream mode; we
strip them in both. A marker may be cut between two upstream messages, so a
stream stripper must hold back a short tail that could still become one.

Theory of operation: each :meth:`MarkerStripper.feed` joins the held-back
tail with the new text, then looks at the text after the last ``opener``
character. If that tail is short (at most
``max_hold`` characters) and could still grow into a marker (``partial``
matches it whole), it is held back, raw; everything before it goes out at once, with every complete
marker deleted. A marker longer than ``max_hold`` cannot be held whole and
passes through a stream unstripped; both upstreams' markers are far shorter.
So text waits only while it really might be a marker, and never longer than
the next piece of text or :meth:`flush` at the end of the answer. The work
per call is proportional to the new text plus the bounded tail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import re


class MarkerStripper:
    """Strip ``marker`` matches from a text that arrives in pieces."""

    __slots__ = ("_held", "_marker", "_max_hold", "_opener", "_partial")

    def __init__(
        self, marker: re.Pattern[str], partial: re.Pattern[str], opener: str, max_hold: int = 40
    ) -> None:
        """
        Args:
            marker: matches one whole marker.
            partial: fully matches every proper prefix of a marker (it may
                match more; anything it matches is merely held back briefly).
            opener: the character every marker starts with.
            max_hold: the longest tail ever held back, in characters.
        """
        self._marker = marker
        self._partial = partial
        self._opener = opener
        self._max_hold = max_hold
        self._held = ""

    def feed(self, text: str) -> str:
        """Add ``text``; return what can be emitted now, markers removed."""
        if self._held:
            text = self._held + text
            self._held = ""
        elif self._opener not in text:
            return text  # the common case: nothing to strip or hold
        # Decide what to hold on the raw text, then strip only what goes out.
        # A marker never contains a second opener, so no marker crosses the
        # cut: stripping the pieces equals stripping the whole text once,
        # however it was split (the held tail is never stripped twice).
        cut = text.rfind(self._opener)
        if cut >= 0 and len(text) - cut <= self._max_hold and self._partial.fullmatch(text, cut):
            self._held = text[cut:]
            text = text[:cut]
        return self._marker.sub("", text)

    def flush(self) -> str:
        """End of text: return whatever was held back (it was no marker)."""
        held, self._held = self._held, ""
        return self._marker.sub("", held)


def strip_all(marker: re.Pattern[str], text: str) -> str:
    """Remove every marker from a whole text (one left-to-right pass)."""
    return marker.sub("", text)
