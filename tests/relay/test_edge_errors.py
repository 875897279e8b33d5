"""Input a client controls is a 4xx naming the field, never a 5xx (issue 12, "Safe to expose").

Each test goes through a relay on loopback to the emulators, so what is
asserted is what an OpenAI client sees: the status, and the error object's
``type``, ``param`` and ``code``; and, from the emulator's record, that
nothing was sent upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
import pytest
import trio

from tests.relay.conftest import AUTH, GLM_AUTH, GLM_TOKEN, post

if TYPE_CHECKING:
    from providers.glm.emulator import GlmEmulator
    from providers.step.emulator import StepEmulator
    from tests.relay.conftest import Running

PATH = "/v1/chat/completions"
#: a media type that would split an upstream header in two
CRLF_DATA_URL = "data:a/b\r\nX: 1;base64,aGVsbG8="

PROVIDERS = [("step", AUTH), ("glm-4-plus", GLM_AUTH)]


def _body(content: Any, *, model: str, **extra: Any) -> bytes:
    return orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    )


async def _error(relay: Running, body: bytes, auth: list[tuple[bytes, bytes]]
                 ) -> tuple[int, dict[str, Any]]:
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, body, headers=auth)
    error = orjson.loads(response.content)["error"]
    assert isinstance(error, dict)
    return response.status, error


@pytest.mark.parametrize(("model", "auth"), PROVIDERS, ids=["step", "glm"])
@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url", "image_url": {"url": CRLF_DATA_URL}},
         "messages[0].content[1].image_url.url"),
        ({"type": "image_url", "image_url": CRLF_DATA_URL}, "messages[0].content[1].image_url"),
        ({"type": "image_url", "image_url": {"url": "data:image/p ng;base64,aGVsbG8="}},
         "messages[0].content[1].image_url.url"),
        ({"type": "file", "file_url": {"url": "data:text/plain\x00;base64,aGVsbG8="}},
         "messages[0].content[1].file_url.url"),
        ({"type": "file", "file": {"file_data": "data:text/plain;base64,aGVsbG8=",
                                   "filename": "a\r\nb.txt"}},
         "messages[0].content[1].file.filename"),
        ({"type": "file", "file_url": {"url": "http://127.0.0.1:9/x%0d%0aEvil: 1.png"}},
         "messages[0].content[1].file_url.url"),
    ],
    ids=["crlf-media-type", "string-form", "space-in-media-type", "nul-in-media-type",
         "crlf-filename", "crlf-in-url-file-name"],
)
async def test_header_breaking_file_reference_is_a_400_naming_the_field(
    relay: Running, step: StepEmulator, glm: GlmEmulator, model: str,
    auth: list[tuple[bytes, bytes]], part: dict[str, Any], param: str,
) -> None:
    """A data URL whose media type is not ``type/subtype`` (CR LF, a space, a NUL), or a
    file name with control characters (OpenAI's ``filename``, or an http URL's last
    segment, URL-decoded) would end up in an upstream (multipart) header: it is a 400
    naming the field, for both providers, and nothing reaches the upstream (before:
    500 ``server_error`` for ChatGLM, 502 "Illegal header value" for StepChat)."""
    content = [{"type": "text", "text": "look"}, part]
    status, error = await _error(relay, _body(content, model=model), auth)
    assert status == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] in ("invalid_file_url", "invalid_file_name")
    assert (step.record.chats_created, step.record.uploads) == ([], [])
    assert glm.record.streams == []
    assert glm.record.uploads == []


@pytest.mark.parametrize(("model", "auth"), PROVIDERS, ids=["step", "glm"])
async def test_unknown_role_is_a_400_naming_it(
    relay: Running, glm: GlmEmulator, model: str, auth: list[tuple[bytes, bytes]]
) -> None:
    """A message whose role is none of OpenAI's (here "wizard") is a 400 naming
    ``messages[1].role``; it used to be merged into the prompt as if it were text."""
    body = orjson.dumps({"model": model, "messages": [
        {"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}]})
    status, error = await _error(relay, body, auth)
    assert status == 400
    assert (error["type"], error["param"]) == ("invalid_request_error", "messages[1].role")
    assert glm.record.streams == []


async def test_unknown_glm_conversation_is_a_404(relay: Running, glm: GlmEmulator) -> None:
    """A ``conversation_id`` the site does not know (the emulator answers its
    "conversation not found" envelope) is a 404 naming ``conversation_id`` with code
    ``conversation_not_found``, not a 502; no account is blamed for it."""
    unknown = "0123456789abcdef01234567"  # 24 letters/digits: a valid-looking id
    for stream in (False, True):
        body = _body("hi", model="glm-4-plus", conversation_id=unknown, stream=stream)
        status, error = await _error(relay, body, GLM_AUTH)
        assert status == 404
        assert error == {
            "message": error["message"], "type": "invalid_request_error",
            "param": "conversation_id", "code": "conversation_not_found",
        }
        assert unknown in error["message"]
    assert glm.record.conversations_created == []
    [account] = relay.app.providers["glm"].pool.client_accounts([GLM_TOKEN])
    assert account.failures == 0
