"""Chat completions end to end: client -> relay -> StepChat emulator, over loopback."""

from __future__ import annotations

import base64
import functools
import logging
import re
import socket
from typing import TYPE_CHECKING, Any

import h11
import openai
import orjson
import pytest
import trio

from protocol.deltas import Delta, Finish, TextDelta
from relay import chat, config
from relay.dialects.openai_chat import ChunkStream
from relay.netio import before_read
from relay.server import ClientConnection, Exchange, Request
from relay.timers import SLACK_S, coarse_timers
from tests.relay.conftest import (
    AUTH,
    GLM_AUTH,
    GLM_TOKEN,
    STEP_CREDENTIAL,
    RelayFactory,
    Running,
    chat_body,
    post,
    send_raw_post,
    sse_events,
    sse_text,
)
from tests.relay.test_fetcher import RecordingProxy

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from providers.glm.emulator import GlmEmulator
    from providers.step.emulator import StepEmulator
    from relay.config import Settings

ANSWER = "阶跃星辰是一家人工智能公司。Hello, world!"
PATH = "/v1/chat/completions"


def _sdk(relay: Running, api_key: str = STEP_CREDENTIAL) -> openai.OpenAI:
    return openai.OpenAI(base_url=relay.base_url + "/v1", api_key=api_key, max_retries=0,
                         timeout=10)


async def test_openai_sdk_streams_the_exact_text(relay: Running, step: StepEmulator) -> None:
    """The official SDK, streaming, receives exactly the text the emulator sent, in order."""
    step.behavior.answer = ANSWER
    step.behavior.chunk_chars = 3

    def run() -> tuple[str, list[str | None]]:
        with _sdk(relay) as client:
            stream = client.chat.completions.create(
                model="step", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            parts, reasons = [], []
            for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    reasons.append(chunk.choices[0].finish_reason)
            return "".join(parts), reasons

    with trio.fail_after(10):
        text, reasons = await trio.to_thread.run_sync(run)
    assert text == ANSWER
    assert reasons[-1] == "stop"
    assert reasons.count("stop") == 1


async def test_openai_sdk_non_stream_gets_the_exact_text(
    relay: Running, step: StepEmulator
) -> None:
    """The SDK without streaming gets one chat.completion with the whole text."""
    step.behavior.answer = ANSWER

    def run() -> tuple[str | None, str, int]:
        with _sdk(relay) as client:
            completion = client.chat.completions.create(
                model="step-v1", messages=[{"role": "user", "content": "hi"}]
            )
            assert completion.usage is not None
            return (completion.choices[0].message.content,
                    completion.choices[0].finish_reason, completion.usage.total_tokens)

    with trio.fail_after(10):
        content, reason, tokens = await trio.to_thread.run_sync(run)
    assert content == ANSWER
    assert reason == "stop"
    assert tokens > 2


async def test_sdk_sees_upstream_failure_as_api_error(relay: Running, step: StepEmulator) -> None:
    """An upstream failure before any text reaches the SDK as an error status, not as text."""
    step.behavior.end_error = ("internal", "boom")

    def run() -> int:
        with _sdk(relay) as client:
            try:
                client.chat.completions.create(
                    model="step", messages=[{"role": "user", "content": "hi"}]
                )
            except openai.APIStatusError as exc:
                return exc.status_code
        return 0

    with trio.fail_after(10):
        status = await trio.to_thread.run_sync(run)
    assert status == 502


async def test_raw_sse_bytes_follow_openai(relay: Running, step: StepEmulator) -> None:
    """A raw HTTP client sees SSE headers, a role chunk, deltas, a finish chunk, usage, [DONE]."""
    step.behavior.answer = ANSWER
    body = chat_body(stream=True, stream_options={"include_usage": True})
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, body)
    headers = {key.lower(): value for key, value in response.headers}
    assert response.status == 200
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache"
    assert headers[b"x-accel-buffering"] == b"no"
    assert headers[b"transfer-encoding"] == b"chunked"
    events = sse_events(response.content)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finishes] == ["stop"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert sse_text(response.content) == ANSWER


async def test_citation_markers_and_search_results(relay: Running, step: StepEmulator) -> None:
    """Markers are stripped in both modes; search hits are listed as the reference does."""
    step.behavior.answer = "StepFun<web_3f9a2b> is an AI company<url_x1>."
    step.behavior.chunk_chars = 4  # markers cut across frames
    step.behavior.search_results = [("StepFun", "https://www.stepfun.com/")]
    with trio.fail_after(5):
        streamed = await post(relay.base_url, PATH, chat_body(stream=True))
        whole = await post(relay.base_url, PATH, chat_body())
    assert sse_text(streamed.content) == (
        "检索 StepFun - https://www.stepfun.com/ ...\n\nStepFun is an AI company."
    )
    content = orjson.loads(whole.content)["choices"][0]["message"]["content"]
    assert content == (
        "StepFun is an AI company.\n\n搜索结果来自：\nStepFun - https://www.stepfun.com/"
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_is_deleted_after_success(
    relay: Running, step: StepEmulator, stream: bool
) -> None:
    """Every conversation the relay creates is deleted after a successful answer."""
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, chat_body(stream=stream))
        assert response.status == 200
        await step.wait_until(lambda r: len(r.chats_deleted) == 1)
    assert step.record.chats_deleted == step.record.chats_created


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_is_deleted_after_upstream_error(
    relay: Running, step: StepEmulator, stream: bool
) -> None:
    """An error end-of-stream after some text still deletes the conversation.

    Not streaming, the error is the response (502). Streaming, the text already
    went out, so the error follows in-band, then [DONE].
    """
    step.behavior.end_error = ("internal", "upstream exploded")
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, chat_body(stream=stream))
        await step.wait_until(lambda r: len(r.chats_deleted) == 1)
    if stream:
        assert response.status == 200
        events = sse_events(response.content)
        assert events[-1] == b"[DONE]"
        error = orjson.loads(events[-2])["error"]
        assert sse_text(response.content) == "Hello world!"
    else:
        assert response.status == 502
        error = orjson.loads(response.content)["error"]
    assert error["code"] == "internal"
    assert "upstream exploded" in error["message"]
    await relay.settled()
    assert step.record.chats_deleted == step.record.chats_created


async def test_chat_is_deleted_after_client_disconnect(
    relay: Running, step: StepEmulator
) -> None:
    """A client that leaves mid-stream cancels the upstream stream; the chat is still deleted."""
    step.behavior.answer = "x" * 600
    step.behavior.chunk_chars = 1
    step.behavior.frame_delay_s = 0.01
    with trio.fail_after(5):
        stream = await send_raw_post(relay, chat_body(stream=True), STEP_CREDENTIAL)
        received = b""
        while b"data: " not in received:
            received += await stream.receive_some(65536)
        await stream.aclose()
        await step.wait_until(lambda r: r.streams_aborted == 1 and len(r.chats_deleted) == 1)
    assert step.record.streams_finished == 0
    assert step.record.chats_deleted == step.record.chats_created
    # the upstream read's stall timeout and the SSE clock are relay.timers
    # entries (120 s and 15 s by default): the cancelled stream leaves neither
    await _no_timer_left()


async def test_a_finished_stream_leaves_no_timer_behind(relay: Running) -> None:
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, chat_body(stream=True))
    assert sse_events(response.content)[-1] == b"[DONE]"
    await _no_timer_left()


async def _no_timer_left() -> None:
    """relay.timers empties (the background DelChat may still be reading its reply).

    Within 1 s: an entry a stream forgot to cancel leaves only when it rings
    (holding the finished writer until then), after the fixture's 2 s commit
    timeout at the earliest.
    """
    for _ in range(100):
        if not len(coarse_timers()):
            return
        await trio.sleep(0.01)
    raise AssertionError(f"{len(coarse_timers())} relay.timers entries left behind")


async def test_truncated_stream_is_an_error_not_an_answer(
    relay: Running, step: StepEmulator
) -> None:
    """An upstream that drops the connection mid-answer gives an in-band error, never a 'stop'."""
    step.behavior.answer = "abcdefghij"
    step.behavior.chunk_chars = 2
    step.behavior.drop_after = 2
    with trio.fail_after(5):
        streamed = await post(relay.base_url, PATH, chat_body(stream=True))
        whole = await post(relay.base_url, PATH, chat_body())
    events = sse_events(streamed.content)
    assert events[-1] == b"[DONE]"
    error = orjson.loads(events[-2])
    assert "error" in error
    assert b'"finish_reason":"stop"' not in streamed.content
    assert sse_text(streamed.content) == "abcd"
    assert whole.status == 502


async def test_missing_and_malformed_credentials_get_401(relay: Running) -> None:
    """No Authorization, or a credential without '@', is a 401 with an OpenAI error."""
    with trio.fail_after(5):
        missing = await post(relay.base_url, PATH, chat_body(), headers=[])
        malformed = await post(
            relay.base_url, PATH, chat_body(), headers=[(b"authorization", b"Bearer nope")]
        )
    for response in (missing, malformed):
        assert response.status == 401
        assert orjson.loads(response.content)["error"]["type"] == "authentication_error"
    assert b"nope" not in malformed.content


async def test_refused_token_gets_401(relay: Running, step: StepEmulator) -> None:
    """A token the upstream refuses at login is a 401 for the client."""
    with trio.fail_after(5):
        response = await post(
            relay.base_url, PATH, chat_body(), headers=[(b"authorization", b"Bearer d@unknown")]
        )
    assert response.status == 401
    assert step.record.chats_created == []


async def test_failover_to_the_next_account(relay: Running, step: StepEmulator) -> None:
    """With a refused account first in the list, the request is served by the next one."""
    header = [(b"authorization", b"Bearer d1@unknown,d2@t1")]
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, chat_body(), headers=header)
    assert response.status == 200
    assert len(step.record.chats_created) == 1


async def test_expired_access_token_is_refreshed(relay: Running, step: StepEmulator) -> None:
    """When the upstream expires the access token, the relay logs in again and succeeds."""
    with trio.fail_after(5):
        first = await post(relay.base_url, PATH, chat_body())
        # the first chat deleted before the token expires (the answer can reach the
        # client before its delete is even queued, so wait for the emulator's record)
        await step.wait_until(lambda r: len(r.chats_deleted) == 1)
        step.expire_access_tokens()
        second = await post(relay.base_url, PATH, chat_body())
    assert (first.status, second.status) == (200, 200)
    assert step.record.registers == 2


async def test_token_refresh_is_single_flight(relay: Running, step: StepEmulator) -> None:
    """Ten concurrent requests with one new credential cause exactly one login."""
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await post(relay.base_url, PATH, chat_body())).status)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
    assert statuses == [200] * 10
    assert step.record.registers == 1


async def test_accounts_share_the_load(relay_factory: RelayFactory, step: StepEmulator) -> None:
    """With one stream per account, two concurrent streams go to two different accounts."""
    relay = await relay_factory(step_max_streams=1)
    step.behavior.answer = "slow answer"
    step.behavior.chunk_chars = 2
    step.behavior.frame_delay_s = 0.02
    header = [(b"authorization", b"Bearer d1@t1,d2@t2")]
    statuses: list[int] = []

    async def one() -> None:
        response = await post(relay.base_url, PATH, chat_body(stream=True), headers=header)
        statuses.append(response.status)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
    assert statuses == [200, 200]
    assert step.record.registers == 2  # both accounts were used


async def test_busy_account_waits_then_429(relay_factory: RelayFactory, step: StepEmulator) -> None:
    """A single account at its stream limit makes the next request wait, then 429."""
    relay = await relay_factory(step_max_streams=1, account_wait_timeout=0.2)
    step.behavior.answer = "x" * 40
    step.behavior.chunk_chars = 1
    step.behavior.frame_delay_s = 0.02
    results: dict[str, int] = {}

    async def slow() -> None:
        results["slow"] = (await post(relay.base_url, PATH, chat_body(stream=True))).status

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await step.wait_until(lambda r: r.streams_started == 1)
            rejected = await post(relay.base_url, PATH, chat_body())
    assert results["slow"] == 200
    assert rejected.status == 429
    assert orjson.loads(rejected.content)["error"]["type"] == "rate_limit_error"


async def test_api_keys_guard_the_server_pool(
    relay_factory: RelayFactory, step: StepEmulator
) -> None:
    """With RELAY_API_KEYS, only those keys are accepted and the server-side pool is used."""
    relay = await relay_factory(api_keys="k1,k2", step_tokens="d9@t3")
    with trio.fail_after(5):
        wrong = await post(relay.base_url, PATH, chat_body(), headers=AUTH)
        right = await post(
            relay.base_url, PATH, chat_body(), headers=[(b"authorization", b"Bearer k2")]
        )
    assert wrong.status == 401
    assert right.status == 200


async def test_data_url_file_is_uploaded_and_attached(
    relay: Running, step: StepEmulator
) -> None:
    """A base64 data URL in the last message is uploaded to storage and attached by id."""
    pdf = b"%PDF-1.4 tiny test document"
    url = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
    body = orjson.dumps({
        "model": "step",
        "messages": [{"role": "user", "content": [
            {"type": "file", "file_url": {"url": url}},
            {"type": "text", "text": "summarise this"},
        ]}],
    })
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, body)
    assert response.status == 200
    [upload] = step.record.uploads
    assert upload.data == pdf
    assert upload.content_type == "application/pdf"
    assert upload.name.endswith(".pdf")
    [message] = step.record.messages
    [attachment] = message["messageInfo"]["attachments"]
    assert attachment["attachmentId"] == upload.file_id
    assert attachment["size"] == str(len(pdf))


async def test_private_file_url_is_refused(relay: Running, step: StepEmulator) -> None:
    """A file URL pointing at loopback is refused with 400 (no server-side request forgery)."""
    body = orjson.dumps({
        "model": "step",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": step.base_url + "/secret.png"}},
        ]}],
    })
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, body)
    assert response.status == 400
    assert orjson.loads(response.content)["error"]["code"] == "forbidden_file_url"
    assert step.record.chats_created == []


async def test_bad_request_bodies_get_400_with_param(relay: Running) -> None:
    """Invalid JSON and missing messages are 400s naming the parameter."""
    with trio.fail_after(5):
        invalid = await post(relay.base_url, PATH, b"{not json")
        empty = await post(relay.base_url, PATH, orjson.dumps({"model": "step", "messages": []}))
    assert invalid.status == 400
    assert empty.status == 400
    assert orjson.loads(empty.content)["error"]["param"] == "messages"


async def test_silent_upstream_gets_committed_and_kept_alive(
    relay_factory: RelayFactory, step: StepEmulator
) -> None:
    """A silent upstream: the 200 is committed after commit_timeout, then SSE comments flow."""
    relay = await relay_factory(commit_timeout=0.05, sse_keepalive=0.05)
    step.behavior.first_delay_s = 0.4
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, chat_body(stream=True))
    assert response.status == 200
    assert b": keep-alive" in response.content
    assert sse_text(response.content) == "Hello world!"
    assert sse_events(response.content)[-1] == b"[DONE]"


async def test_silence_between_events_is_kept_alive_too(
    relay_factory: RelayFactory, step: StepEmulator
) -> None:
    """Keep-alive comments also fill a pause mid-answer, between text events, in order."""
    relay = await relay_factory(commit_timeout=0.05, sse_keepalive=0.05)
    step.behavior.text_frames = ["a", "b", "c"]
    step.behavior.frame_delay_s = 0.3
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, chat_body(stream=True))
    body = response.content
    first_text = body.index(b'"content":"a"')
    second_text = body.index(b'"content":"b"')
    assert body.count(b": keep-alive", first_text, second_text) >= 2
    assert sse_text(body) == "abc"
    assert sse_events(body)[-1] == b"[DONE]"


async def test_models_lists_step_models(relay: Running) -> None:
    """/v1/models lists the StepChat model ids in OpenAI's list shape."""
    def run() -> list[str]:
        with _sdk(relay) as client:
            return [m.id for m in client.models.list()]

    ids = await trio.to_thread.run_sync(functools.partial(run))
    assert {"step", "step-v1", "step-v1-vision"} <= set(ids)


async def test_token_check(relay: Running) -> None:
    """/token/check says live for a good credential and not for a refused one."""
    with trio.fail_after(5):
        good = await post(relay.base_url, "/token/check",
                          orjson.dumps({"token": STEP_CREDENTIAL}), headers=[])
        bad = await post(relay.base_url, "/token/check",
                         orjson.dumps({"token": "d@unknown"}), headers=[])
        malformed = await post(relay.base_url, "/token/check", b"[]", headers=[])
    assert orjson.loads(good.content) == {"live": True}
    assert orjson.loads(bad.content) == {"live": False}
    assert malformed.status == 400


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_connection_is_reused_across_requests(
    relay: Running, step: StepEmulator, stream: bool
) -> None:
    """The answer ends a few bytes before the upstream body does (the end-of-stream
    envelope); the relay reads those too, even though its client closes the connection
    as soon as it has the answer, so the next request reuses the same upstream
    connection instead of opening a new one."""
    pool = relay.app._pool
    seen = []
    with trio.fail_after(5):
        for n in (1, 2, 3):
            response = await post(relay.base_url, PATH, chat_body(stream=stream))
            assert response.status == 200
            await step.wait_until(lambda r, n=n: len(r.chats_deleted) == n)
            seen.append(list(pool.connections))
    assert len(seen[0]) == 1
    assert seen[1] == seen[0]
    assert seen[2] == seen[0]


@pytest.mark.parametrize("frame_delay_s", [0.0, 0.002])
async def test_paced_and_back_to_back_frames_give_the_same_stream(
    relay: Running, step: StepEmulator, frame_delay_s: float
) -> None:
    """Frames that come back to back arrive in one upstream read and leave in one write;
    paced frames leave one by one. Either way the client gets every piece of the answer,
    in order, then [DONE]."""
    step.behavior.answer = ANSWER
    step.behavior.chunk_chars = 2
    step.behavior.frame_delay_s = frame_delay_s
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, chat_body(stream=True))
    assert response.status == 200
    assert sse_text(response.content) == ANSWER
    assert sse_events(response.content)[-1] == b"[DONE]"


@pytest.mark.parametrize("proxied", [False, True])
async def test_events_leave_before_the_upstream_is_read_again(
    relay_factory: RelayFactory, step: StepEmulator, nursery: trio.Nursery, proxied: bool
) -> None:
    """The events of one upstream read are written before the next read waits: with the
    upstream silent after two text frames, the client has both (through an upstream
    proxy too, whose connections are httpcore's own pool on the relay's sockets)."""
    overrides: dict[str, Any] = {}
    if proxied:
        proxy = RecordingProxy()
        await nursery.start(proxy.serve)
        overrides["upstream_proxy"] = proxy.url
    relay = await relay_factory(**overrides)
    step.behavior.text_frames = ["first", "second", "never"]
    step.behavior.stall_after = 2
    with trio.fail_after(5):
        client = await send_raw_post(relay, chat_body(stream=True), STEP_CREDENTIAL)
        received = b""
        while b'"content":"second"' not in received:
            received += await client.receive_some(65536)
        await client.aclose()
    assert b'"content":"first"' in received
    if proxied:
        assert proxy.seen


async def test_chat_deleted_when_client_leaves_while_it_is_being_created(
    relay: Running, step: StepEmulator
) -> None:
    """CreateChat was sent but its answer (the chat id) had not come back when the
    client left: the relay still reads the id (bounded) and deletes the chat."""
    step.behavior.create_delay_s = 0.3
    body = chat_body(stream=True)
    with trio.fail_after(5):
        client = await send_raw_post(relay, body, STEP_CREDENTIAL)
        await trio.sleep(0.1)  # CreateChat is on its way
        await client.aclose()
        await step.wait_until(lambda r: len(r.chats_created) == 1)
        await step.wait_until(lambda r: r.chats_deleted == r.chats_created)
    assert step.record.streams_finished == 0


async def test_a_client_that_stops_reading_is_cut_at_send_timeout(
    relay_factory: RelayFactory, glm: GlmEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A client with a tiny receive buffer that never reads a long ChatGLM stream holds it
    only until a write makes no progress for send_timeout: then the upstream stream is
    closed, the conversation deleted, the account (one stream at a time) released, so a
    second request on it is answered instead of waiting for a 429; the access log says
    send-timeout."""
    caplog.set_level(logging.INFO, logger="relay.access")
    relay = await relay_factory(send_timeout=0.3, glm_max_streams=1, account_wait_timeout=30.0)
    # ~3 MB of answer: more than the client's receive buffer and the relay's send buffer
    glm.behavior.answer = "x" * 3_000_000
    glm.behavior.chunk_chars = 300_000
    body = orjson.dumps({"model": "glm-4-plus", "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    with trio.fail_after(20):
        await sock.connect((relay.host, relay.port))
        async with trio.SocketStream(sock) as stuck:
            await stuck.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nAuthorization: Bearer " + GLM_TOKEN.encode()
                + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            await glm.wait_until(lambda r: r.active_streams == 1, timeout=20)
            glm.behavior.answer = "second"
            await glm.wait_until(lambda r: len(r.conversations_deleted) == 1, timeout=20)
            assert glm.record.active_streams == 0
            second = await post(relay.base_url, PATH, orjson.dumps({
                "model": "glm-4-plus", "messages": [{"role": "user", "content": "again"}]}),
                headers=GLM_AUTH)
    assert second.status == 200, second.content
    assert orjson.loads(second.content)["choices"][0]["message"]["content"] == "second"
    assert glm.record.streams_aborted == 1
    await relay.settled()
    assert glm.record.conversations_deleted == glm.record.conversations_created
    access = [r.getMessage() for r in caplog.records if r.name == "relay.access"]
    assert any(" end=timeout " in line and " cut=send-timeout" in line for line in access), access


# --- the SSE writer, on its own --------------------------------------------------------
#
# A real Exchange over a stream that records every write (its time and bytes), an
# upstream that hands out its batches read by read (before each read it runs
# relay.netio's before_read hook, as the pool's sockets do), and trio's autojump
# clock: the times below are exact, nothing waits on a real clock.


class _Wire(trio.abc.Stream):
    """The client's side: records each ``send_all``; :attr:`hold` makes writes wait."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []
        self.hold: trio.Event | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.hold is not None:
            await self.hold.wait()
        self.writes.append((trio.current_time(), bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _Upstream:
    """An answer as a list of reads: (seconds the read waits, the batches it gives)."""

    conversation_id = ""

    def __init__(self, reads: list[tuple[float, list[list[Delta]]]]) -> None:
        self.reads = reads
        self.reads_done = 0

    async def __aiter__(self) -> AsyncGenerator[list[Delta], None]:
        for wait, batches in self.reads:
            hook = before_read.get()
            if hook is not None:
                await hook()
            await trio.sleep(wait)
            self.reads_done += 1
            for batch in batches:
                yield batch


def _exchange(wire: _Wire, **overrides: Any) -> tuple[Exchange, Settings]:
    settings = config.load({"commit_timeout": 5.0, "sse_keepalive": 15.0, **overrides},
                           environ={})
    conn = ClientConnection(wire, settings, "test")
    conn.feed(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(conn.h11.next_event(), h11.Request)
    assert isinstance(conn.h11.next_event(), h11.EndOfMessage)
    request = Request("POST", "/v1/chat/completions", "/v1/chat/completions", "", [],
                      b"1.1", "test")
    return Exchange(conn, request, settings, body_read=True), settings


async def _serve(wire: _Wire, upstream: _Upstream, **overrides: Any) -> Exchange:
    ex, settings = _exchange(wire, **overrides)
    encoder = ChunkStream(completion_id="chatcmpl-1", model="step", created=0)
    await chat._serve_stream(ex, upstream, encoder, settings, chat.Outcome(), 0.0)
    return ex


def _texts(write: bytes) -> list[str]:
    """The content of each text event in one write, in order."""
    texts = []
    for event in re.findall(rb"data: (\{.*?\})\n\n", write):
        choices = orjson.loads(event)["choices"]
        if choices and choices[0]["delta"].get("content"):
            texts.append(choices[0]["delta"]["content"])
    return texts


def _text(text: str) -> list[Delta]:
    return [TextDelta(text)]


STOP: list[Delta] = [Finish("stop")]


async def test_the_first_event_leaves_with_the_head_in_one_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The 200 waits for the first event, which then leaves at once with the head and the
    role chunk, in one write, before the upstream is read again."""
    wire = _Wire()
    await _serve(wire, _Upstream([(1.0, [_text("a")]), (3.0, [_text("b"), STOP])]))
    (at, first), *_ = wire.writes
    assert at == 1.0
    assert first.startswith(b"HTTP/1.1 200 ")
    assert b'"delta":{"role":"assistant","content":""}' in first
    assert _texts(first) == ["a"]


async def test_the_events_of_one_read_leave_in_one_write_before_the_next_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Batches that one upstream read gave (one per HTTP chunk) are written together,
    before the next read waits; nothing is kept past that read."""
    wire = _Wire()
    upstream = _Upstream([
        (0.0, [_text("a")]),
        (1.0, [_text("b"), _text("c"), _text("d")]),
        (1.0, [_text("e")]),
        (1.0, [STOP]),
    ])
    ex = await _serve(wire, upstream)
    assert [(at, _texts(data)) for at, data in wire.writes] == [
        (0.0, ["a"]), (1.0, ["b", "c", "d"]), (2.0, ["e"]), (3.0, []),
    ]
    assert wire.writes[-1][1].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert ex.finished


async def test_a_burst_leaves_in_slices_first_event_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A read of many batches (an upstream that sent them all at once) is not decoded
    whole before anything leaves: the first event goes with the head, the rest in
    slices of SLICE_BATCHES, in order."""
    wire = _Wire()
    texts = [f"t{i}" for i in range(200)]
    await _serve(wire, _Upstream([(0.0, [_text(t) for t in texts]), (0.0, [STOP])]))
    slices = [_texts(data) for _, data in wire.writes]
    assert slices[0] == ["t0"]
    assert all(len(part) <= chat.SLICE_BATCHES for part in slices)
    assert len(slices) == 2 + -(-199 // chat.SLICE_BATCHES)  # + the end
    assert [t for part in slices for t in part] == texts


async def test_a_silent_upstream_is_committed_then_kept_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No event for commit_timeout: the head and the role chunk go out alone; then a
    comment after every sse_keepalive of silence (relay.timers: up to its slack late,
    never early), until the events come."""
    wire = _Wire()
    await _serve(wire, _Upstream([(40.0, [_text("a")]), (0.0, [STOP])]))
    keepalive = b": keep-alive\n\n"
    times = [at for at, _ in wire.writes]
    assert len(times) == 5
    for at, due in zip(times[:3], (5.0, 20.0, 35.0), strict=True):
        assert due <= at <= due + SLACK_S
    assert times[3:] == [40.0, 40.0]
    head, first_comment, second_comment, event, _ = (data for _, data in wire.writes)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert _texts(head) == []
    assert first_comment.endswith(keepalive + b"\r\n")
    assert second_comment.endswith(keepalive + b"\r\n")
    assert _texts(event) == ["a"]
    assert keepalive not in event


async def test_flowing_events_get_no_keepalive_and_a_pause_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Comments fill silence only: events every 0.5 s with sse_keepalive 2 s get none;
    a 5 s pause between two of them gets two."""
    wire = _Wire()
    reads = [(0.5, [_text(str(i))]) for i in range(10)]
    reads += [(5.0, [_text("late")]), (0.0, [STOP])]
    await _serve(wire, _Upstream(reads), sse_keepalive=2.0)
    body = b"".join(data for _, data in wire.writes)
    late = body.index(b'"content":"late"')
    assert body.count(b": keep-alive") == 2
    assert body.index(b": keep-alive") > body.index(b'"content":"9"')
    assert body.rindex(b": keep-alive") < late


async def test_paced_events_wake_no_other_task(autojump_clock: trio.testing.MockClock) -> None:
    """One task reads, encodes and writes: a stream of events 10 ms apart starts no task
    and runs none besides the reader (the keep-alive clock is a relay.timers entry,
    looked at only when silence could be due)."""

    class Steps(trio.abc.Instrument):
        def __init__(self, reader: trio.lowlevel.Task) -> None:
            self.reader = reader
            self.spawned = 0
            self.others: set[str] = set()

        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            self.spawned += 1

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task is not self.reader:
                self.others.add(task.name)

    wire = _Wire()
    upstream = _Upstream([(0.01, [_text(str(i))]) for i in range(100)] + [(0.0, [STOP])])
    coarse_timers()  # the timers' task, started before we count
    steps = Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        await _serve(wire, upstream)
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert len(wire.writes) == 101
    assert steps.spawned == 0
    assert steps.others <= {"relay.timers"}


async def test_a_slow_client_slows_the_upstream_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While a write waits for the client, the upstream is not read: nothing queues
    up in the relay. The clock does not write into the waiting write either."""
    wire = _Wire()
    upstream = _Upstream([(0.1, [_text(str(i))]) for i in range(5)] + [(0.1, [STOP])])
    async with trio.open_nursery() as nursery:
        ex, settings = _exchange(wire, sse_keepalive=1.0)
        encoder = ChunkStream(completion_id="chatcmpl-1", model="step", created=0)
        wire.hold = trio.Event()
        nursery.start_soon(chat._serve_stream, ex, upstream, encoder, settings,
                           chat.Outcome(), 0.0)
        await trio.sleep(30)  # 30 keep-alive periods; the first write waits all along
        assert upstream.reads_done == 1
        assert wire.writes == []
        wire.hold.set()
        wire.hold = None
    body = b"".join(data for _, data in wire.writes)
    assert [t for _, data in wire.writes for t in _texts(data)] == ["0", "1", "2", "3", "4"]
    assert b": keep-alive" not in body
    assert upstream.reads_done == 6


async def test_last_words_without_a_queue_are_the_error_and_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """What a stopped stream ends with: an error event (server_shutting_down), [DONE]."""
    ex, settings = _exchange(_Wire())
    encoder = ChunkStream(completion_id="chatcmpl-1", model="step", created=0)
    writer = chat.SSEWriter(ex, encoder, settings)
    assert ex.last_words is not None
    words = ex.last_words()
    error_event, done = words.split(b"\n\n", 1)
    assert orjson.loads(error_event.removeprefix(b"data: "))["error"]["code"] == (
        "server_shutting_down")
    assert done == b"data: [DONE]\n\n"
    assert not writer.committed
