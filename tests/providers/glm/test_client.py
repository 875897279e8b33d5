"""Tests of the ChatGLM client (providers/glm/client.py) against the emulator.

The provider is driven directly, without the relay, over the relay's real
transport and fetcher. A recording transport (a fake that forwards to the
real one, not a mock) keeps the headers of every call, so signing and the
stable device id can be checked on the wire.
"""

from __future__ import annotations

import base64
import time
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
import pytest
import trio

from protocol.deltas import Finish, TextDelta, UpstreamError
from protocol.errors import AuthError, UpstreamFailed
from protocol.openai import parse_chat_request
from providers.glm.client import (
    GlmAnswer,
    GlmProvider,
    GlmRefusal,
    GlmSession,
    device_id_for,
)
from providers.glm.emulator import ERR_AUTH, TINY_PNG, GlmBehavior, GlmEmulator
from providers.glm.signing import verify
from relay import config
from relay.fetcher import UrlFetcher
from relay.upstream import HttpTransport, make_pool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from protocol.deltas import Delta
    from providers.contract import Headers, Response, StreamedResponse

TOKEN = "eyJhbGciOiJIUzI1NiJ9.glm-refresh.alice"
OTHER = "eyJhbGciOiJIUzI1NiJ9.glm-refresh.bob"


@dataclass
class Call:
    """One call the provider made."""

    method: bytes
    url: str
    headers: dict[bytes, bytes]


@dataclass
class RecordingTransport:
    """Forwards to a real transport and keeps what was sent."""

    inner: HttpTransport
    calls: list[Call] = field(default_factory=list)

    def _keep(self, method: bytes, url: str, headers: Headers) -> None:
        self.calls.append(Call(method, url, {k.lower(): v for k, v in headers}))

    async def request(self, method: bytes, url: str, headers: Headers, body: bytes = b"", *,
                      limit_s: float | None = None) -> Response:
        self._keep(method, url, headers)
        return await self.inner.request(method, url, headers, body, limit_s=limit_s)

    def stream(self, method: bytes, url: str, headers: Headers, body: bytes = b""
               ) -> AbstractAsyncContextManager[StreamedResponse]:
        self._keep(method, url, headers)
        return self.inner.stream(method, url, headers, body)


@pytest.fixture
async def glm(nursery: trio.Nursery) -> GlmEmulator:
    """An emulator that accepts TOKEN and OTHER."""
    emulator = GlmEmulator(tokens=[TOKEN, OTHER], behavior=GlmBehavior(answer="你好！"))
    await nursery.start(emulator.serve)
    return emulator


@dataclass
class Rig:
    provider: GlmProvider
    transport: RecordingTransport


@pytest.fixture
async def rig(glm: GlmEmulator) -> AsyncIterator[Rig]:
    """A GlmProvider on the relay's transport, pointed at the emulator."""
    settings = config.load({"glm_base_url": glm.base_url, "allow_private_urls": True},
                           environ={})
    pool = make_pool(settings)
    fetcher = UrlFetcher(settings)
    transport = RecordingTransport(HttpTransport(pool, settings, "ChatGLM"))
    provider = GlmProvider(transport, fetcher, base_url=glm.base_url, cleanup_timeout=2.0,
                           video_poll_interval=0.005)
    yield Rig(provider, transport)
    await pool.aclose()
    await fetcher.aclose()


def _request(content: object = "hi", **extra: object) -> bytes:
    return orjson.dumps({"model": "glm-4-plus",
                         "messages": [{"role": "user", "content": content}], **extra})


async def _answer(rig: Rig, session: GlmSession, body: bytes) -> tuple[list[list[Delta]], str]:
    """Every batch of one answer, and the conversation id seen after the first batch."""
    batches: list[list[Delta]] = []
    first_id = ""
    with trio.fail_after(5):
        async with rig.provider.chat(session, parse_chat_request(body)) as answer, aclosing(
            answer.__aiter__()
        ) as stream:
            async for batch in stream:
                if not batches:
                    first_id = answer.conversation_id
                batches.append(batch)
    return batches, first_id


# ---------------------------------------------------------------- sans-IO parts


@pytest.mark.parametrize("credential", ["", "a b", "a,b", "a\x00b", "tab\there", "日本"])
def test_invalid_credentials_are_refused_without_echo(credential: str) -> None:
    """Empty, whitespace, comma, control or non-ASCII credentials are an AuthError."""
    provider = GlmProvider(RecordingTransport(None), None,  # type: ignore[arg-type]
                           base_url="https://chatglm.cn")
    with pytest.raises(AuthError) as info:
        provider.validate_credential(credential)
    assert info.value.status == 401
    assert not credential or credential not in info.value.message


def test_jwt_credentials_are_accepted() -> None:
    """A JWT-shaped refresh token passes validation."""
    provider = GlmProvider(RecordingTransport(None), None,  # type: ignore[arg-type]
                           base_url="https://chatglm.cn")
    provider.validate_credential(TOKEN)  # no exception
    assert provider.models()[0] == "glm-3-turbo"


def test_device_id_is_stable_per_account() -> None:
    """The device id is 32 hex digits, the same for a token, different across tokens."""
    first = device_id_for(TOKEN)
    assert first == device_id_for(TOKEN)
    assert first != device_id_for(OTHER)
    assert len(first) == 32
    assert int(first, 16) >= 0
    assert TOKEN not in first


# ---------------------------------------------------------------- login and signing


async def test_login_and_check(rig: Rig, glm: GlmEmulator) -> None:
    """Login gives a session with the account's device id; check says live or not."""
    with trio.fail_after(5):
        session = await rig.provider.login(TOKEN)
        assert await rig.provider.check(TOKEN)
        assert not await rig.provider.check("unknown-token")
    assert session.device_id == device_id_for(TOKEN)
    assert session.refresh_token == TOKEN
    assert session.access_token.startswith("glm-emulator-access-")
    assert TOKEN not in repr(session)
    assert glm.record.refreshes == 2


async def test_expired_refresh_token_is_auth_error(rig: Rig, glm: GlmEmulator) -> None:
    """40102 at refresh is an AuthError with code refresh_token_expired."""
    glm.expire_refresh_token(TOKEN)
    with trio.fail_after(5), pytest.raises(AuthError) as info:
        await rig.provider.login(TOKEN)
    assert info.value.code == "refresh_token_expired"


async def test_every_call_is_signed_with_a_stable_device_id(rig: Rig, glm: GlmEmulator) -> None:
    """Refresh, upload, stream and delete all carry a valid signature and the same device id."""
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                   + base64.b64encode(TINY_PNG).decode()}},
               {"type": "text", "text": "看图"}]
    with trio.fail_after(5):
        session = await rig.provider.login(TOKEN)
        await _answer(rig, session, _request(content))
    paths = [call.url.removeprefix(glm.base_url) for call in rig.transport.calls]
    assert paths == [
        "/chatglm/user-api/user/refresh",
        "/chatglm/backend-api/assistant/file_upload",
        "/chatglm/backend-api/assistant/stream",
        "/chatglm/backend-api/assistant/conversation/delete",
    ]
    now_ms = int(time.time() * 1000)
    request_ids = set()
    for call in rig.transport.calls:
        h = call.headers
        assert verify(h[b"x-timestamp"].decode(), h[b"x-nonce"].decode(), h[b"x-sign"].decode(),
                      now_ms=now_ms)
        assert h[b"x-device-id"] == device_id_for(TOKEN).encode()
        request_ids.add(h[b"x-request-id"])
    assert len(request_ids) == 4
    stream = rig.transport.calls[2].headers
    assert stream[b"accept"] == b"text/event-stream"
    assert stream[b"referer"] == f"{glm.base_url}/main/alltoolsdetail".encode()
    assert glm.record.bad_signatures == 0


async def test_uploads_can_go_unsigned_like_the_reference(glm: GlmEmulator) -> None:
    """With sign_every_call off the upload carries no signature, as the reference sends it."""
    settings = config.load({"glm_base_url": glm.base_url}, environ={})
    pool = make_pool(settings)
    fetcher = UrlFetcher(settings)
    transport = RecordingTransport(HttpTransport(pool, settings, "ChatGLM"))
    provider = GlmProvider(transport, fetcher, base_url=glm.base_url, sign_every_call=False)
    content = [{"type": "file", "file_url": {"url": "data:text/plain;base64,aGk="}},
               {"type": "text", "text": "读一下"}]
    try:
        with trio.fail_after(5):
            session = await provider.login(TOKEN)
            await _answer(Rig(provider, transport), session, _request(content))
    finally:
        await pool.aclose()
        await fetcher.aclose()
    upload = transport.calls[1]
    assert upload.url.endswith("/file_upload")
    assert b"x-sign" not in upload.headers
    assert b"x-sign" in transport.calls[2].headers
    assert [u.data for u in glm.record.uploads] == [b"hi"]


# ---------------------------------------------------------------- chat


async def test_conversation_id_is_known_after_the_first_batch(
    rig: Rig, glm: GlmEmulator
) -> None:
    """The answer names its conversation once the first snapshot arrived; it is deleted after."""
    with trio.fail_after(5):
        session = await rig.provider.login(TOKEN)
        batches, first_id = await _answer(rig, session, _request())
    [created] = glm.record.conversations_created
    assert first_id == created
    text = "".join(d.text for batch in batches for d in batch if isinstance(d, TextDelta))
    assert text == "你好！"
    assert batches[-1][-1] == Finish("stop")
    assert glm.record.conversations_deleted == [created]


async def test_auth_failure_of_the_stream_raises_auth_error(rig: Rig, glm: GlmEmulator) -> None:
    """An expired access token at the stream call raises AuthError on entering chat."""
    with trio.fail_after(5):
        session = await rig.provider.login(TOKEN)
        glm.expire_access_tokens()
        with pytest.raises(AuthError):
            await _answer(rig, session, _request())
    assert glm.record.auth_failures == 1
    assert glm.record.conversations_created == []


async def test_http_401_stream_answer_is_auth_error(rig: Rig, glm: GlmEmulator) -> None:
    """A non-SSE HTTP 401 answer of the stream endpoint raises AuthError."""
    glm.behavior.stream_error = (401, {"code": ERR_AUTH, "message": "unauthorized"})
    with trio.fail_after(5):
        session = await rig.provider.login(TOKEN)
        with pytest.raises(AuthError):
            await _answer(rig, session, _request())


async def test_busy_account_is_a_leading_429(rig: Rig, glm: GlmEmulator) -> None:
    """A busy account's JSON answer becomes a refusal whose only batch is a 429 error."""
    glm.behavior.stream_error = (200, {"code": 10002, "message": "当前有对话正在进行中"})
    with trio.fail_after(5):
        session = await rig.provider.login(TOKEN)
        async with rig.provider.chat(session, parse_chat_request(_request())) as answer:
            assert isinstance(answer, GlmRefusal)
            batches = [batch async for batch in answer]
    [[error]] = batches
    assert isinstance(error, UpstreamError)
    assert (error.status, error.code) == (429, "account_busy")


async def test_stream_answer_type(rig: Rig) -> None:
    """A normal answer is a GlmAnswer (a ChatStream)."""
    with trio.fail_after(5):
        session = await rig.provider.login(TOKEN)
        async with rig.provider.chat(session, parse_chat_request(_request())) as answer:
            assert isinstance(answer, GlmAnswer)
            assert answer.conversation_id == ""  # nothing read yet


# ---------------------------------------------------------------- cleanup and liveness


async def _answer_then_expire(rig: Rig, glm: GlmEmulator, session: GlmSession) -> None:
    """One whole answer; the site expires the access tokens before the delete is sent."""
    request = parse_chat_request(_request())
    with trio.fail_after(5):
        async with rig.provider.chat(session, request) as answer, aclosing(
            answer.__aiter__()
        ) as stream:
            async for _ in stream:
                pass
            glm.expire_access_tokens()  # between the answer and its delete


async def test_delete_after_the_access_token_expired_logs_in_again(
    rig: Rig, glm: GlmEmulator
) -> None:
    """The access token expires between an answer and the delete of its conversation:
    the delete meets a 401, the provider refreshes with the session's refresh token and
    deletes on the second attempt (before: it gave up, the conversation stayed)."""
    session = await rig.provider.login(TOKEN)
    await _answer_then_expire(rig, glm, session)
    assert glm.record.conversations_deleted == glm.record.conversations_created
    assert len(glm.record.conversations_created) == 1
    assert glm.record.refreshes == 2


async def test_delete_gives_up_quietly_when_the_refresh_token_expired_too(
    rig: Rig, glm: GlmEmulator
) -> None:
    """If the refresh token has expired as well (40102), the cleanup logs and gives up
    within its bound, raising nothing: the answer was already delivered."""
    session = await rig.provider.login(TOKEN)
    glm.expire_refresh_token(TOKEN)
    await _answer_then_expire(rig, glm, session)
    assert glm.record.conversations_deleted == []
    assert glm.record.refreshes == 1


async def test_check_tells_an_unreachable_site_from_a_dead_token(rig: Rig) -> None:
    """check() is True or False only when the site answered; an unreachable site
    (connection refused) raises UpstreamFailed instead of saying False."""
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = config.load({"glm_base_url": f"http://127.0.0.1:{port}"}, environ={})
    pool = make_pool(settings)
    provider = GlmProvider(HttpTransport(pool, settings, "ChatGLM"), None,  # type: ignore[arg-type]
                           base_url=f"http://127.0.0.1:{port}")
    try:
        with trio.fail_after(5), pytest.raises(UpstreamFailed):
            await provider.check(TOKEN)
        assert await provider.check("a b") is False  # cannot be a token: dead without asking
    finally:
        await pool.aclose()
