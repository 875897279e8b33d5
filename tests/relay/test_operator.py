"""The operator's side (issue 12): token checks that tell a dead token from an
unreachable site, and token lists checked when the relay starts.

``POST /token/check`` answers HTTP 200 with ``{"live": true}``, ``{"live":
false}`` (the upstream refused the credential, or it cannot be one), or
``{"live": null, "error": {...}}`` (the upstream could not be asked).
``relay check-token`` prints the same JSON and exits 0, 1 or 3.
"""

from __future__ import annotations

import json
import os
import socket
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import trio

from relay import cli, config
from relay.app import App
from relay.config import ConfigError
from tests.relay.conftest import GLM_TOKEN, STEP_CREDENTIAL, post

if TYPE_CHECKING:
    from tests.relay.conftest import RelayFactory


def _closed_port() -> int:
    """A loopback port nobody listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RELAY_* variable of the developer's shell leaks into the settings."""
    for key in list(os.environ):
        if key.startswith("RELAY_"):
            monkeypatch.delenv(key)


async def _check(base_url: str, token: str, provider: str) -> tuple[int, Any]:
    with trio.fail_after(5):
        response = await post(base_url, "/token/check",
                              orjson.dumps({"token": token, "provider": provider}), headers=[])
    return response.status, orjson.loads(response.content)


@pytest.mark.parametrize(("provider", "token"), [("step", STEP_CREDENTIAL), ("glm", GLM_TOKEN)])
async def test_token_check_with_an_unreachable_upstream_is_live_null(
    relay_factory: RelayFactory, provider: str, token: str
) -> None:
    """/token/check against an upstream that refuses connections answers 200 with
    ``live`` null and an OpenAI-shaped error, not ``live: false`` (before: false, as for a
    dead token)."""
    dead = f"http://127.0.0.1:{_closed_port()}"
    relay = await relay_factory(step_base_url=dead, glm_base_url=dead)
    status, answer = await _check(relay.base_url, token, provider)
    assert status == 200
    assert answer["live"] is None
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "upstream_error"
    assert token not in answer["error"]["message"]


@pytest.mark.parametrize(
    ("provider", "live", "dead"), [("step", STEP_CREDENTIAL, "d@unknown"),
                                   ("glm", GLM_TOKEN, "glm-unknown")]
)
async def test_token_check_live_and_dead_are_booleans(
    relay_factory: RelayFactory, provider: str, live: str, dead: str
) -> None:
    """A reachable upstream gives exactly ``{"live": true}`` or ``{"live": false}``."""
    relay = await relay_factory()
    assert await _check(relay.base_url, live, provider) == (200, {"live": True})
    assert await _check(relay.base_url, dead, provider) == (200, {"live": False})


def test_check_token_cli_exit_statuses(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``relay check-token`` exits 3 (and prints live null with the error) when the
    upstream cannot be reached, and 1 for a credential that cannot be one (before: 1 for
    both)."""
    monkeypatch.setenv("RELAY_GLM_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(SystemExit) as exited:
        cli.main(["check-token", "some-refresh-token", "--provider", "glm"])
    assert exited.value.code == cli.CHECK_UNKNOWN == 3
    printed = json.loads(capsys.readouterr().out)
    assert printed["live"] is None
    assert printed["error"]["type"] == "upstream_error"
    with pytest.raises(SystemExit) as exited:
        cli.main(["check-token", "two words", "--provider", "glm"])
    assert exited.value.code == cli.CHECK_DEAD == 1
    assert json.loads(capsys.readouterr().out) == {"live": False}


@pytest.mark.parametrize(
    ("setting", "entries", "position"),
    [
        ("step_tokens", ("dev@tok", "no-at-sign", "dev@other"), 2),
        ("glm_tokens", ("good-one", "bad token\x7f"), 2),
        ("glm_tokens", ("日本",), 1),
    ],
)
def test_malformed_server_token_fails_at_start(
    setting: str, entries: tuple[str, ...], position: int
) -> None:
    """A malformed entry of RELAY_STEP_TOKENS or RELAY_GLM_TOKENS stops the app from being
    built (before: found by the first request that leased it), naming the setting and the
    entry's position, never the entry."""
    settings = config.load({setting: entries}, environ={})
    with pytest.raises(ConfigError) as info:
        App(settings)
    message = str(info.value)
    assert message.startswith(f"RELAY_{setting.upper()}: entry {position} of {len(entries)}")
    for entry in entries:
        assert entry not in message


def test_relay_serve_with_a_malformed_token_exits_2_with_one_line(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``relay serve`` with a malformed token entry prints one ``relay: ...`` line naming
    the setting and position and exits 2, as other configuration errors do, before it
    listens."""
    monkeypatch.setenv("RELAY_STEP_TOKENS", "dev@ok,not-a-credential")
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--port", "0", "--api-keys", "k"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("relay: ")]
    assert line.startswith("relay: RELAY_STEP_TOKENS: entry 2 of 2 is malformed")
    assert "not-a-credential" not in err
    assert "listening" not in err
