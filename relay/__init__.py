"""trio-llm-relay, embedded in a trio program (the README's "Embedding it in a trio program").

Serve the relay over HTTP in your own nursery, as a sidecar::

    settings = relay.settings(port=0, glm_tokens=["<refresh token>"])
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(relay.serve, settings)
        ...  # clients reach http://{addresses[0]}/v1
        nursery.cancel_scope.cancel()  # a graceful stop

or ask it in process, without HTTP, with the same account leasing,
failover, limits, answer shaping and conversation cleanup::

    async with relay.Relay(settings) as service:
        async for event in service.chat({"model": "glm-4", "messages": [...]}):
            if isinstance(event, relay.TextDelta):
                print(event.text, end="")

- :func:`settings` builds the :class:`Settings` in code; the ``RELAY_*``
  environment is read only with ``from_environ=True``. ``demo=True``
  starts the built-in StepChat and ChatGLM emulators in process (no
  account, no internet), for :func:`serve` and :class:`Relay` alike.
- :func:`serve` reports the bound addresses through ``nursery.start`` and
  stops gracefully when cancelled.
- :class:`Relay` is the chat service as an async context manager;
  :meth:`Relay.chat` gives a :class:`Chat`, an async iterator of the
  neutral events (:class:`TextDelta`, :class:`ReasoningDelta`,
  :class:`Citation`, :class:`ToolCallDelta`, :class:`ImageResult`,
  :class:`VideoResult`, then :class:`Finish` or :class:`UpstreamError`).
  A failure before the first event is raised as a :class:`RelayError`.

The names are loaded on first use, so that ``import relay`` (and the
``relay`` command) stays light; :mod:`relay.embed` holds the code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protocol.deltas import (
        Citation,
        Delta,
        Finish,
        ImageResult,
        ReasoningDelta,
        TextDelta,
        ToolCallDelta,
        UpstreamError,
        VideoResult,
    )
    from protocol.errors import RelayError
    from protocol.openai import ChatRequest
    from relay.config import ConfigError, Settings
    from relay.embed import Chat, Relay, serve, settings, start_app

__all__ = [
    "Chat",
    "ChatRequest",
    "Citation",
    "ConfigError",
    "Delta",
    "Finish",
    "ImageResult",
    "ReasoningDelta",
    "Relay",
    "RelayError",
    "Settings",
    "TextDelta",
    "ToolCallDelta",
    "UpstreamError",
    "VideoResult",
    "serve",
    "settings",
    "start_app",
]

#: where each exported name lives
_HOME = {
    **dict.fromkeys(
        ("Citation", "Delta", "Finish", "ImageResult", "ReasoningDelta", "TextDelta",
         "ToolCallDelta", "UpstreamError", "VideoResult"),
        "protocol.deltas",
    ),
    "RelayError": "protocol.errors",
    "ChatRequest": "protocol.openai",
    "ConfigError": "relay.config",
    "Settings": "relay.config",
    **dict.fromkeys(("Chat", "Relay", "serve", "settings", "start_app"), "relay.embed"),
}


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'relay' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
