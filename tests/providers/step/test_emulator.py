"""Tests of the StepChat emulator, driven over loopback by real HTTP clients.

Most tests use a small raw h11 client over ``trio.open_tcp_stream`` so that
they control the connection (keep-alive, closing mid-stream, reading the
body chunk by chunk); one TLS test uses httpcore, as the relay does. Stream
bodies are decoded with ``protocol.connect.EnvelopeDecoder``.
"""

from __future__ import annotations

import re
import signal
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11
import httpcore
import orjson
import pytest
import trio
import trio.testing
import trustme

from protocol.connect import Envelope, EnvelopeDecoder, encode_envelope
from protocol.errors import RemoteProtocolError
from providers.step.emulator import (
    CREATE_CHAT_PATH,
    DELETE_CHAT_PATH,
    FILE_STATUS_PATH,
    REGISTER_PATH,
    SEND_MESSAGE_PATH,
    STORAGE_PATH,
    StepBehavior,
    StepEmulator,
    StepRecord,
    demo_answer,
    parse_args,
)
from tests.providers.emulator_process import PROCESS_TIMEOUT_S, emulator_process

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

USER_TOKEN = "user-token-1"
DEVICE = "0123456789abcdef0123456789abcdef01234567"
JSON = "application/json"
PROMPT = "user:hello\nassistant:hi!\nsystem:focus\nuser:tell me a joke\nassistant:"


@dataclass
class Reply:
    """A whole HTTP response as the test client saw it."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return orjson.loads(self.body)


class Client:
    """A minimal HTTP/1.1 client over one TCP connection (raw h11)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def _next(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            assert isinstance(event, h11.Event)
            return event

    async def start(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> h11.Response:
        """Send a request and read the response head."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("host", "127.0.0.1"), ("content-length", str(len(body)))]
        all_headers += list(headers.items())
        data = self.conn.send(h11.Request(method=method, target=path, headers=all_headers))
        data += self.conn.send(h11.Data(data=body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        event = await self._next()
        assert isinstance(event, h11.Response), event
        return event

    async def next_chunk(self) -> bytes | None:
        """The next piece of the current response body as h11 hands it out; None at its end."""
        event = await self._next()
        if isinstance(event, h11.EndOfMessage):
            return None
        assert isinstance(event, h11.Data), event
        return bytes(event.data)

    async def body(self) -> bytes:
        """The rest of the current response body."""
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> Reply:
        """Send a request and read the whole response."""
        head = await self.start(method, path, headers, body)
        body = await self.body()
        names = {k.decode().lower(): v.decode() for k, v in head.headers}
        return Reply(head.status_code, names, body)


@dataclass
class Session:
    """Headers of a registered device."""

    access: str
    refresh: str
    device: str = DEVICE

    def headers(self, content_type: str = "application/json") -> dict[str, str]:
        """The session headers of PROTOCOLS.md 2.3."""
        return {
            "cookie": f"Oasis-Token={self.access}...{self.refresh}; Oasis-Webid={self.device}",
            "oasis-webid": self.device,
            "content-type": content_type,
        }


def json_body(obj: Any) -> bytes:
    """Encode a request body."""
    return orjson.dumps(obj)


def send_body(chat_id: str, text: str = PROMPT, attachments: list[Any] | None = None) -> bytes:
    """The SendMessageStream body: one envelope."""
    info: dict[str, Any] = {"text": text}
    if attachments is not None:
        info["attachments"] = attachments
    return encode_envelope(orjson.dumps({"chatId": chat_id, "messageInfo": info}))


def decode(body: bytes) -> list[Envelope]:
    """All envelopes of a stream body; the decoder must end cleanly."""
    decoder = EnvelopeDecoder()
    envelopes = decoder.feed(body)
    decoder.close()
    return envelopes


def payloads(envelopes: list[Envelope]) -> list[Any]:
    """The JSON payloads of envelopes."""
    return [orjson.loads(env.payload) for env in envelopes]


def texts(envelopes: list[Envelope]) -> list[str]:
    """The texts of the textEvents."""
    return [p["textEvent"]["text"] for p in payloads(envelopes) if "textEvent" in p]


@pytest.fixture
async def emulator(nursery: trio.Nursery) -> StepEmulator:
    """A running emulator that accepts USER_TOKEN only."""
    emu = StepEmulator(tokens=[USER_TOKEN])
    await nursery.start(emu.serve)
    return emu


@pytest.fixture
async def client(emulator: StepEmulator) -> AsyncIterator[Client]:
    """A connected raw client."""
    stream = await trio.open_tcp_stream("127.0.0.1", emulator.port)
    async with stream:
        yield Client(stream)


async def connect(emulator: StepEmulator) -> Client:
    """Another raw client (the caller closes ``client.stream``)."""
    return Client(await trio.open_tcp_stream("127.0.0.1", emulator.port))


async def register(client: Client, device: str = DEVICE) -> Session:
    """RegisterDevice with the user token."""
    reply = await client.request(
        "POST",
        REGISTER_PATH,
        {
            "cookie": f"Oasis-Token={USER_TOKEN}",
            "oasis-webid": device,
            "content-type": "application/json",
        },
        b"{}",
    )
    assert reply.status == 200, reply
    data = reply.json()
    return Session(data["accessToken"]["raw"], data["refreshToken"]["raw"], device)


async def create_chat(client: Client, session: Session) -> str:
    """CreateChat; returns the chat id."""
    reply = await client.request(
        "POST", CREATE_CHAT_PATH, session.headers(), json_body({"chatName": "新会话"})
    )
    assert reply.status == 200, reply
    chat_id = reply.json()["chatId"]
    assert isinstance(chat_id, str)
    return chat_id


async def stream_reply(client: Client, session: Session, chat_id: str, text: str = PROMPT) -> Reply:
    """SendMessageStream read to its end."""
    headers = session.headers("application/connect+json")
    return await client.request("POST", SEND_MESSAGE_PATH, headers, send_body(chat_id, text))


async def read_into(client: Client, received: bytearray) -> None:
    """Append the rest of the current response body to ``received``."""
    while (chunk := await client.next_chunk()) is not None:
        received += chunk


async def ready(client: Client) -> tuple[Session, str]:
    """Register and create a chat."""
    session = await register(client)
    return session, await create_chat(client, session)


# --- round trip and record ---------------------------------------------------


async def test_round_trip_register_create_stream_delete(
    emulator: StepEmulator, client: Client
) -> None:
    """A whole conversation on one keep-alive connection streams the answer and records it all."""
    emulator.behavior.answer = "StepFun is an AI company."
    emulator.behavior.chunk_chars = 5
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        reply = await stream_reply(client, session, chat_id)
        deleted = await client.request(
            "POST", DELETE_CHAT_PATH, session.headers(), json_body({"chatIds": [chat_id]})
        )
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/connect+json"
    assert reply.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in reply.headers
    envelopes = decode(reply.body)
    assert texts(envelopes) == ["StepF", "un is", " an A", "I com", "pany."]
    messages = payloads(envelopes)
    assert "startEvent" in messages[0]
    assert messages[-2] == {"doneEvent": {}}
    assert envelopes[-1] == Envelope(0x02, b"{}")
    assert all(env.flags == 0 for env in envelopes[:-1])
    assert deleted.status == 200
    record = emulator.record
    assert record.registers == 1
    assert record.chats_created == [chat_id]
    assert record.chats_deleted == [chat_id]
    assert record.messages == [{"chatId": chat_id, "messageInfo": {"text": PROMPT}}]
    assert (record.streams_started, record.streams_finished, record.streams_aborted) == (1, 1, 0)
    assert record.active_streams == 0
    assert record.paths == [REGISTER_PATH, CREATE_CHAT_PATH, SEND_MESSAGE_PATH, DELETE_CHAT_PATH]


async def test_register_issues_fresh_unique_tokens(emulator: StepEmulator, client: Client) -> None:
    """Two RegisterDevice calls give different access and refresh strings without '...' inside."""
    with trio.fail_after(5):
        first = await register(client)
        second = await register(client)
    assert first.access != second.access
    assert first.refresh != second.refresh
    assert "..." not in first.access + first.refresh
    assert len(first.access) > 40
    assert emulator.record.registers == 2


async def test_chat_ids_are_increasing_decimal_strings(client: Client) -> None:
    """CreateChat hands out increasing decimal chat ids and echoes the chat name."""
    with trio.fail_after(5):
        session = await register(client)
        reply = await client.request(
            "POST", CREATE_CHAT_PATH, session.headers(), json_body({"chatName": "x"})
        )
        second = await create_chat(client, session)
    first = reply.json()
    assert first["chatName"] == "x"
    assert first["chatId"].isdigit()
    assert second.isdigit()
    assert int(second) > int(first["chatId"])


async def test_default_answer_quotes_last_user_line(emulator: StepEmulator, client: Client) -> None:
    """Without a scripted answer the stream is the demo answer quoting the last user line."""
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        reply = await stream_reply(client, session, chat_id)
    answer = "".join(texts(decode(reply.body)))
    assert answer == demo_answer(PROMPT)
    assert '"tell me a joke"' in answer
    assert all(len(t) <= 6 for t in texts(decode(reply.body)))


def test_demo_answer_without_user_line_quotes_last_line() -> None:
    """A prompt without a 'user:' line is quoted by its last non-empty line, shortened."""
    assert '"plain text"' in demo_answer("first\nplain text\n\n")
    assert "…" in demo_answer("user:" + "x" * 500)


async def test_text_frames_and_search_results(emulator: StepEmulator, client: Client) -> None:
    """Explicit text frames are sent as given, after one pipelineEvent with the search hits."""
    emulator.behavior.text_frames = ["阶跃星辰是<web_3f9a2b>", "一家人工智能公司。", ""]
    emulator.behavior.search_results = [("StepFun", "https://www.stepfun.com/")]
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        reply = await stream_reply(client, session, chat_id)
    messages = payloads(decode(reply.body))
    search = {
        "pipelineEvent": {
            "eventSearch": {"results": [{"title": "StepFun", "url": "https://www.stepfun.com/"}]}
        }
    }
    assert messages[1] == search
    assert texts(decode(reply.body)) == ["阶跃星辰是<web_3f9a2b>", "一家人工智能公司。", ""]


async def test_stamp_frames_carry_increasing_monotonic_times(
    emulator: StepEmulator, client: Client
) -> None:
    """In stamp mode every text is [ts:N] with N non-decreasing, stamp_frames of them."""
    emulator.behavior.stamp = True
    emulator.behavior.stamp_frames = 7
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        reply = await stream_reply(client, session, chat_id)
    stamps = texts(decode(reply.body))
    assert len(stamps) == 7
    values = [int(re.fullmatch(r"\[ts:(\d+)\]", s).group(1)) for s in stamps]  # type: ignore[union-attr]
    assert values == sorted(values)


async def test_frame_delays_space_the_envelopes(emulator: StepEmulator, client: Client) -> None:
    """first_delay_s and frame_delay_s make the stream take at least their sum."""
    emulator.behavior.text_frames = ["a", "b"]
    emulator.behavior.first_delay_s = 0.005
    emulator.behavior.frame_delay_s = 0.002
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        started = trio.current_time()
        reply = await stream_reply(client, session, chat_id)
        elapsed = trio.current_time() - started
    # 1 first delay + a delay before each of the 2 text frames; nothing waits after the last
    assert elapsed >= 0.005 + 2 * 0.002
    assert texts(decode(reply.body)) == ["a", "b"]


async def test_hold_keeps_the_stream_open_after_its_head(
    emulator: StepEmulator, client: Client
) -> None:
    """With ``hold`` set, a stream sends its response head, counts as active and sends no
    frame until the event is set; then it sends its whole answer."""
    emulator.behavior.text_frames = ["a", "b"]
    emulator.behavior.hold = hold = trio.Event()
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        head = await client.start(
            "POST", SEND_MESSAGE_PATH, session.headers("application/connect+json"),
            send_body(chat_id),
        )
        assert head.status_code == 200
        await emulator.wait_until(lambda r: r.active_streams == 1)
        with trio.move_on_after(0.05):  # nothing may arrive while held: a short look is enough
            await client.next_chunk()
            raise AssertionError("a held stream sent a frame")
        hold.set()
        body = await client.body()
    assert texts(decode(body)) == ["a", "b"]
    assert emulator.record.streams_finished == 1


# --- auth --------------------------------------------------------------------


async def test_register_refuses_unknown_token_and_missing_webid(
    emulator: StepEmulator, client: Client
) -> None:
    """RegisterDevice with an unknown token, no cookie or no Oasis-Webid is 401 unauthenticated."""
    cases = [
        {"cookie": "Oasis-Token=someone-else", "oasis-webid": DEVICE},
        {"oasis-webid": DEVICE},
        {"cookie": f"Oasis-Token={USER_TOKEN}"},
    ]
    with trio.fail_after(5):
        replies = [await client.request("POST", REGISTER_PATH, h, b"{}") for h in cases]
    for reply in replies:
        assert reply.status == 401
        assert reply.json()["code"] == "unauthenticated"
        assert reply.json()["message"]
    assert emulator.record.auth_failures == 3
    assert emulator.record.registers == 0


async def test_any_token_is_accepted_without_a_token_list(nursery: trio.Nursery) -> None:
    """An emulator built without tokens accepts any non-empty user token, but not an empty one."""
    emu = StepEmulator()
    await nursery.start(emu.serve)
    client = await connect(emu)
    async with client.stream:
        with trio.fail_after(5):
            good = await client.request(
                "POST", REGISTER_PATH, {"cookie": "Oasis-Token=whatever", "oasis-webid": "d"}, b""
            )
            empty = await client.request(
                "POST", REGISTER_PATH, {"cookie": "Oasis-Token=", "oasis-webid": "d"}, b""
            )
    assert good.status == 200
    assert good.json()["device"] == {"deviceID": "d"}
    assert empty.status == 401


async def test_session_failures_are_401_unauthenticated(
    emulator: StepEmulator, client: Client
) -> None:
    """Missing cookie, Webid mismatch, unissued or swapped tokens, another device: all refused."""
    with trio.fail_after(5):
        session = await register(client)
        other = await register(client, device="another-device")
        good = session.headers()
        cases = [
            {"oasis-webid": DEVICE, "content-type": "application/json"},
            {**good, "oasis-webid": "not-the-cookie-one"},
            {**good, "cookie": f"Oasis-Token=forged...{session.refresh}; Oasis-Webid={DEVICE}"},
            {
                **good,
                "cookie": f"Oasis-Token={session.access}...{other.refresh}; Oasis-Webid={DEVICE}",
            },
            {**good, "cookie": f"Oasis-Token={session.access}; Oasis-Webid={DEVICE}"},
            {
                **good,
                "cookie": f"Oasis-Token={other.access}...{other.refresh}; Oasis-Webid={DEVICE}",
            },
        ]
        replies = [
            await client.request("POST", CREATE_CHAT_PATH, h, json_body({"chatName": "x"}))
            for h in cases
        ]
        fine = await client.request("POST", CREATE_CHAT_PATH, good, json_body({"chatName": "x"}))
    assert [r.status for r in replies] == [401] * len(cases)
    assert {r.json()["code"] for r in replies} == {"unauthenticated"}
    assert emulator.record.auth_failures == len(cases)
    assert emulator.record.chats_created == [fine.json()["chatId"]]


async def test_expired_access_tokens_are_refused_until_reregistered(
    emulator: StepEmulator, client: Client
) -> None:
    """After expire_access_tokens every call, streams included, is 401; re-registering works."""
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        emulator.expire_access_tokens()
        create = await client.request(
            "POST", CREATE_CHAT_PATH, session.headers(), json_body({"chatName": "x"})
        )
        stream = await stream_reply(client, session, chat_id)
        fresh = await register(client)
        again = await stream_reply(client, fresh, chat_id)
    assert create.status == 401
    assert stream.status == 401
    assert stream.headers["content-type"] == "application/json"
    assert stream.json()["code"] == "unauthenticated"
    assert "expired" in stream.json()["message"]
    assert again.status == 200
    assert emulator.record.auth_failures == 2


async def test_access_ttl_limits_token_lifetime(emulator: StepEmulator, client: Client) -> None:
    """A zero access_ttl_s issues tokens that are already expired."""
    emulator.behavior.access_ttl_s = 0.0
    with trio.fail_after(5):
        session = await register(client)
        reply = await client.request(
            "POST", CREATE_CHAT_PATH, session.headers(), json_body({"chatName": "x"})
        )
    assert reply.status == 401


# --- chats -------------------------------------------------------------------


async def test_unknown_or_deleted_chat_is_a_stream_error(
    emulator: StepEmulator, client: Client
) -> None:
    """Streaming into an unknown or deleted chat: HTTP 200 with only a not_found end-of-stream."""
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        unknown = await stream_reply(client, session, "12345")
        await client.request(
            "POST", DELETE_CHAT_PATH, session.headers(), json_body({"chatIds": [chat_id]})
        )
        deleted = await stream_reply(client, session, chat_id)
    for reply in (unknown, deleted):
        assert reply.status == 200
        assert reply.headers["content-type"] == "application/connect+json"
        envelopes = decode(reply.body)
        assert len(envelopes) == 1
        assert envelopes[0].end_stream
        assert orjson.loads(envelopes[0].payload)["error"]["code"] == "not_found"
    assert emulator.record.streams_started == 0


async def test_delete_chat_records_once_and_refuses_unknown(
    emulator: StepEmulator, client: Client
) -> None:
    """Deleting twice is recorded once; an unknown id is 404 not_found and deletes nothing."""
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        other = await create_chat(client, session)
        body = json_body({"chatIds": [chat_id]})
        first = await client.request("POST", DELETE_CHAT_PATH, session.headers(), body)
        second = await client.request("POST", DELETE_CHAT_PATH, session.headers(), body)
        unknown = await client.request(
            "POST", DELETE_CHAT_PATH, session.headers(), json_body({"chatIds": [other, "999"]})
        )
    assert (first.status, second.status) == (200, 200)
    assert unknown.status == 404
    assert unknown.json()["code"] == "not_found"
    assert emulator.record.chats_deleted == [chat_id]


async def test_create_error_answers_unary_connect_error(
    emulator: StepEmulator, client: Client
) -> None:
    """create_error makes CreateChat answer that status and Connect error, creating nothing."""
    emulator.behavior.create_error = (503, "unavailable", "try later")
    with trio.fail_after(5):
        session = await register(client)
        reply = await client.request(
            "POST", CREATE_CHAT_PATH, session.headers(), json_body({"chatName": "x"})
        )
    assert reply.status == 503
    assert reply.json() == {"code": "unavailable", "message": "try later"}
    assert emulator.record.chats_created == []


# --- stream request validation -----------------------------------------------


async def test_stream_requires_connect_content_type_and_one_envelope(
    emulator: StepEmulator, client: Client
) -> None:
    """A JSON content type is 415; two envelopes or non-JSON payload give invalid_argument."""
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        one = send_body(chat_id)
        wrong_type = await client.request("POST", SEND_MESSAGE_PATH, session.headers(), one)
        headers = session.headers("application/connect+json")
        two = await client.request("POST", SEND_MESSAGE_PATH, headers, one + one)
        not_json = await client.request(
            "POST", SEND_MESSAGE_PATH, headers, encode_envelope(b"nope")
        )
    assert wrong_type.status == 415
    for reply in (two, not_json):
        (envelope,) = decode(reply.body)
        assert envelope.end_stream
        assert orjson.loads(envelope.payload)["error"]["code"] == "invalid_argument"
    assert emulator.record.messages == []


async def test_unknown_attachment_is_invalid_argument(client: Client) -> None:
    """An attachment id that was never uploaded ends the stream with invalid_argument."""
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        body = send_body(chat_id, attachments=[{"attachmentId": "404", "name": "a.pdf"}])
        reply = await client.request(
            "POST", SEND_MESSAGE_PATH, session.headers("application/connect+json"), body
        )
    (envelope,) = decode(reply.body)
    assert orjson.loads(envelope.payload)["error"]["code"] == "invalid_argument"


# --- misbehaviour knobs ------------------------------------------------------


async def test_write_size_one_and_pack_all_give_the_same_envelopes(
    emulator: StepEmulator, client: Client
) -> None:
    """Byte-by-byte writes, 7-byte writes and one packed write all decode to the same envelopes."""
    emulator.behavior.answer = "Hello, 世界! A split answer."
    emulator.behavior.search_results = [("t", "https://e.example/")]
    bodies = []
    with trio.fail_after(5):
        session = await register(client)
        for write_size, pack_all in [(None, False), (1, False), (7, False), (None, True)]:
            emulator.behavior.write_size = write_size
            emulator.behavior.pack_all = pack_all
            chat_id = await create_chat(client, session)
            reply = await stream_reply(client, session, chat_id)
            stable = [p for p in payloads(decode(reply.body)) if "startEvent" not in p]
            bodies.append([p for p in stable if "messageEvent" not in p])
    assert bodies[0] == bodies[1] == bodies[2] == bodies[3]
    assert emulator.record.streams_finished == 4


class RecordingStream(trio.abc.Stream):
    """Wraps a stream and remembers the size of every ``send_all``.

    TCP coalesces small writes, so write boundaries cannot be seen on the
    wire; this test double stands in for the socket under the emulator.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Record the write's size and pass it on."""
        self.writes.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Pass through."""
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Pass through."""
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        """Pass through."""
        await self.inner.aclose()


async def test_write_boundaries_follow_write_size_and_pack_all(nursery: trio.Nursery) -> None:
    """One write per envelope by default; write_size=1: bytes; 7: 7-byte pieces; pack_all: one."""
    emulator = StepEmulator(behavior=StepBehavior(answer="0123456789abcdef", chunk_chars=4))
    client_end, server_end = trio.testing.memory_stream_pair()
    recording = RecordingStream(server_end)
    nursery.start_soon(emulator.handle_connection, recording)
    client = Client(client_end)
    writes: dict[str, list[int]] = {}
    bodies: dict[str, bytes] = {}
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        for name, write_size, pack_all in [
            ("default", None, False),
            ("bytes", 1, False),
            ("sevens", 7, False),
            ("packed", None, True),
        ]:
            emulator.behavior.write_size = write_size
            emulator.behavior.pack_all = pack_all
            recording.writes.clear()
            reply = await stream_reply(client, session, chat_id)
            writes[name] = list(recording.writes)
            bodies[name] = reply.body
    envelopes = decode(bodies["default"])
    # head, start, 4 texts, messageEvent, done, end-of-stream, terminator
    assert len(envelopes) == 8
    assert len(writes["default"]) == 1 + len(envelopes) + 1
    total = sum(writes["default"])
    assert writes["bytes"] == [1] * total
    assert writes["sevens"][:-1] == [7] * (len(writes["sevens"]) - 1)
    assert sum(writes["sevens"]) == total
    assert writes["packed"] == [total]
    assert {len(decode(body)) for body in bodies.values()} == {8}


async def test_drop_after_ends_the_body_early(emulator: StepEmulator, client: Client) -> None:
    """drop_after=2 closes the connection after two text frames without ending the chunked body."""
    emulator.behavior.text_frames = ["a", "b", "c", "d"]
    emulator.behavior.drop_after = 2
    received = bytearray()
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        await client.start(
            "POST",
            SEND_MESSAGE_PATH,
            session.headers("application/connect+json"),
            send_body(chat_id),
        )
        with pytest.raises(h11.RemoteProtocolError):
            await read_into(client, received)
        await emulator.wait_until(lambda r: r.streams_finished == 1)
    envelopes = EnvelopeDecoder().feed(bytes(received))
    assert texts(envelopes) == ["a", "b"]
    assert not any(env.end_stream for env in envelopes)
    assert emulator.record.active_streams == 0


async def test_stall_after_goes_silent_until_the_client_leaves(emulator: StepEmulator) -> None:
    """stall_after=1 sends one text frame, then nothing; closing the client records an abort."""
    emulator.behavior.text_frames = ["a", "b", "c"]
    emulator.behavior.stall_after = 1
    client = await connect(emulator)
    decoder = EnvelopeDecoder()
    got: list[Envelope] = []
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        await client.start(
            "POST",
            SEND_MESSAGE_PATH,
            session.headers("application/connect+json"),
            send_body(chat_id),
        )
        while texts(got) != ["a"]:
            chunk = await client.next_chunk()
            assert chunk is not None
            got += decoder.feed(chunk)
        with trio.move_on_after(0.05) as silent:
            await client.next_chunk()
        assert silent.cancelled_caught
        assert emulator.record.active_streams == 1
        await client.stream.aclose()
        await emulator.wait_until(lambda r: r.streams_aborted == 1)
    assert emulator.record.active_streams == 0
    assert emulator.record.streams_finished == 0


async def test_client_leaving_mid_stream_is_recorded_as_aborted(emulator: StepEmulator) -> None:
    """A client that closes after the first envelope of a slow stream is recorded as aborted."""
    emulator.behavior.text_frames = [str(i) for i in range(1000)]
    emulator.behavior.frame_delay_s = 0.001
    client = await connect(emulator)
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        await client.start(
            "POST",
            SEND_MESSAGE_PATH,
            session.headers("application/connect+json"),
            send_body(chat_id),
        )
        assert await client.next_chunk()
        await client.stream.aclose()
        await emulator.wait_until(lambda r: r.streams_aborted == 1 and r.active_streams == 0)
    assert emulator.record.streams_finished == 0


async def test_malformed_after_sends_a_non_json_envelope(
    emulator: StepEmulator, client: Client
) -> None:
    """malformed_after=1 sends one good text frame, then an envelope that is not JSON, then ends."""
    emulator.behavior.text_frames = ["a", "b"]
    emulator.behavior.malformed_after = 1
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        reply = await stream_reply(client, session, chat_id)
    envelopes = decode(reply.body)
    assert texts(envelopes[:-1]) == ["a"]
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(envelopes[-1].payload)
    assert envelopes[-1].flags == 0


async def test_oversized_after_declares_600_megabytes(
    emulator: StepEmulator, client: Client
) -> None:
    """oversized_after=0 sends an envelope header declaring 600 MB, which a decoder refuses."""
    emulator.behavior.oversized_after = 0
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        reply = await stream_reply(client, session, chat_id)
    with pytest.raises(RemoteProtocolError):
        decode(reply.body)
    start_event = 5 + int.from_bytes(reply.body[1:5], "big")
    assert reply.body.index(b"\x00" + (600 * 1024 * 1024).to_bytes(4, "big")) == start_event


async def test_end_error_replaces_done(emulator: StepEmulator, client: Client) -> None:
    """end_error ends the stream with an error end-of-stream and no doneEvent."""
    emulator.behavior.text_frames = ["a"]
    emulator.behavior.end_error = ("internal", "boom")
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        reply = await stream_reply(client, session, chat_id)
    envelopes = decode(reply.body)
    assert envelopes[-1].end_stream
    assert orjson.loads(envelopes[-1].payload) == {"error": {"code": "internal", "message": "boom"}}
    assert {"doneEvent": {}} not in payloads(envelopes)
    assert texts(envelopes) == ["a"]


async def test_omit_done_and_omit_end(emulator: StepEmulator, client: Client) -> None:
    """omit_done drops doneEvent but keeps the end; omit_end keeps doneEvent and drops the end."""
    emulator.behavior.text_frames = ["a"]
    with trio.fail_after(5):
        session = await register(client)
        emulator.behavior.omit_done = True
        no_done = await stream_reply(client, session, await create_chat(client, session))
        emulator.behavior.omit_done = False
        emulator.behavior.omit_end = True
        no_end = await stream_reply(client, session, await create_chat(client, session))
    first = decode(no_done.body)
    assert {"doneEvent": {}} not in payloads(first)
    assert first[-1] == Envelope(0x02, b"{}")
    second = decode(no_end.body)
    assert payloads(second)[-1] == {"doneEvent": {}}
    assert not any(env.end_stream for env in second)


async def test_busy_is_resource_exhausted(emulator: StepEmulator, client: Client) -> None:
    """busy answers SendMessageStream with only a resource_exhausted end-of-stream."""
    emulator.behavior.busy = True
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        reply = await stream_reply(client, session, chat_id)
    (envelope,) = decode(reply.body)
    assert envelope.end_stream
    assert orjson.loads(envelope.payload)["error"]["code"] == "resource_exhausted"
    assert emulator.record.streams_started == 0
    assert len(emulator.record.messages) == 1


async def test_stream_http_error_is_a_unary_error(emulator: StepEmulator, client: Client) -> None:
    """stream_http_error makes SendMessageStream answer a JSON Connect error with that status."""
    emulator.behavior.stream_http_error = (429, "resource_exhausted", "slow down")
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        reply = await stream_reply(client, session, chat_id)
    assert reply.status == 429
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["content-length"] == str(len(reply.body))
    assert reply.json() == {"code": "resource_exhausted", "message": "slow down"}


# --- uploads -------------------------------------------------------------------


async def test_upload_and_status_polling(emulator: StepEmulator, client: Client) -> None:
    """PUT storage records the file; GetFileStatus says wait twice, then the final status."""
    name = "报告 v1+final.pdf"
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        headers = {**session.headers("application/pdf"), "stepchat-meta-size": "5"}
        target = f"{STORAGE_PATH}?file_name={urllib.parse.quote(name)}"
        put = await client.request("PUT", target, headers, b"%PDF-")
        file_id = put.json()["id"]
        polls = [
            (
                await client.request(
                    "POST", FILE_STATUS_PATH, session.headers(), json_body({"id": file_id})
                )
            ).json()
            for _ in range(3)
        ]
        attached = send_body(chat_id, attachments=[{"attachmentId": file_id, "name": name}])
        reply = await client.request(
            "POST", SEND_MESSAGE_PATH, session.headers("application/connect+json"), attached
        )
    (upload,) = emulator.record.uploads
    assert (upload.file_id, upload.name, upload.content_type, upload.data) == (
        file_id,
        name,
        "application/pdf",
        b"%PDF-",
    )
    assert upload.headers["stepchat-meta-size"] == "5"
    assert polls == [
        {"fileStatus": 0, "needFurtherCall": True},
        {"fileStatus": 0, "needFurtherCall": True},
        {"fileStatus": 1, "needFurtherCall": False},
    ]
    assert emulator.record.status_polls == 3
    assert payloads(decode(reply.body))[-2] == {"doneEvent": {}}


async def test_file_status_failure_and_unknown_file(emulator: StepEmulator, client: Client) -> None:
    """file_status_final=404 with no waits fails at once; an unknown file id is 404 not_found."""
    emulator.behavior.file_status_polls = 0
    emulator.behavior.file_status_final = 404
    with trio.fail_after(5):
        session = await register(client)
        put = await client.request(
            "PUT", f"{STORAGE_PATH}?file_name=a.txt", session.headers("text/plain"), b"x"
        )
        status = await client.request(
            "POST", FILE_STATUS_PATH, session.headers(), json_body({"id": put.json()["id"]})
        )
        unknown = await client.request(
            "POST", FILE_STATUS_PATH, session.headers(), json_body({"id": "nope"})
        )
        nameless = await client.request("PUT", STORAGE_PATH, session.headers("text/plain"), b"x")
    assert status.json() == {"fileStatus": 404, "needFurtherCall": False}
    assert unknown.status == 404
    assert unknown.json()["code"] == "not_found"
    assert nameless.status == 400
    assert len(emulator.record.uploads) == 1


# --- HTTP surface --------------------------------------------------------------


async def test_unknown_path_and_wrong_method(emulator: StepEmulator, client: Client) -> None:
    """An unknown path is 404 and a GET of a procedure is 405, both Connect error JSON."""
    with trio.fail_after(5):
        missing = await client.request("POST", "/api/nothing", {})
        wrong = await client.request("GET", CREATE_CHAT_PATH, {})
    assert missing.status == 404
    assert missing.json()["code"] == "not_found"
    assert wrong.status == 405
    assert wrong.json()["code"] == "unimplemented"
    assert emulator.record.paths == ["/api/nothing", CREATE_CHAT_PATH]


async def test_keep_alive_serves_two_streams_on_one_connection(
    emulator: StepEmulator, client: Client
) -> None:
    """Two streams and a delete run on one connection, each complete."""
    emulator.behavior.answer = "ok"
    with trio.fail_after(5):
        session, chat_id = await ready(client)
        first = await stream_reply(client, session, chat_id)
        second = await stream_reply(client, session, chat_id)
    assert texts(decode(first.body)) == texts(decode(second.body)) == ["ok"]
    assert emulator.record.streams_finished == 2


async def test_chunked_request_body_is_accepted(emulator: StepEmulator) -> None:
    """A request body sent with chunked transfer encoding is read whole."""
    stream = await trio.open_tcp_stream("127.0.0.1", emulator.port)
    async with stream:
        client = Client(stream)
        with trio.fail_after(5):
            session = await register(client)
            conn = client.conn
            conn.start_next_cycle()
            headers = [("host", "x"), ("transfer-encoding", "chunked"), *session.headers().items()]
            data = conn.send(h11.Request(method="POST", target=CREATE_CHAT_PATH, headers=headers))
            for piece in (b'{"chatName"', b': "chunked"}'):
                data += conn.send(h11.Data(data=piece)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            event = await client._next()
            body = await client.body()
    assert isinstance(event, h11.Response)
    assert event.status_code == 200
    assert orjson.loads(body)["chatName"] == "chunked"


async def test_garbage_request_gets_400_and_server_survives(emulator: StepEmulator) -> None:
    """Bytes that are not HTTP get a 400 and a close; the emulator keeps serving."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", emulator.port)
        async with stream:
            await stream.send_all(b"\x00\x01 nonsense\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
        client = await connect(emulator)
        async with client.stream:
            await register(client)
    assert answer.startswith(b"HTTP/1.1 400")
    assert emulator.record.registers == 1


async def test_many_concurrent_streams(emulator: StepEmulator) -> None:
    """Fifty concurrent streams on fifty connections all complete with the full answer."""
    emulator.behavior.answer = "concurrent answer text"
    results: list[str] = []

    async def one() -> None:
        client = await connect(emulator)
        async with client.stream:
            session, chat_id = await ready(client)
            reply = await stream_reply(client, session, chat_id)
            results.append("".join(texts(decode(reply.body))))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
    assert results == ["concurrent answer text"] * 50
    assert emulator.record.streams_finished == 50
    assert emulator.record.active_streams == 0


async def test_wait_until_times_out(emulator: StepEmulator) -> None:
    """wait_until raises TooSlowError when the predicate never holds."""
    with pytest.raises(trio.TooSlowError):
        await emulator.wait_until(lambda r: r.registers > 0, timeout=0.01)


def test_record_starts_empty() -> None:
    """A fresh record has no calls and no streams."""
    assert StepRecord() == StepEmulator().record
    assert StepEmulator().record.paths == []


# --- TLS with httpcore -----------------------------------------------------------


async def test_tls_with_httpcore_keep_alive(nursery: trio.Nursery) -> None:
    """Over TLS (trustme CA, verification on) httpcore runs two streams on one pooled connection."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    emu = StepEmulator(tokens=[USER_TOKEN], behavior=StepBehavior(answer="secure"))
    await nursery.start(
        lambda task_status: emu.serve(ssl_context=server_context, task_status=task_status)
    )
    assert emu.base_url.startswith("https://127.0.0.1:")
    with trio.fail_after(5):
        async with httpcore.AsyncConnectionPool(ssl_context=client_context) as pool:
            reg = await pool.request(
                "POST",
                emu.base_url + REGISTER_PATH,
                headers={
                    "cookie": f"Oasis-Token={USER_TOKEN}",
                    "oasis-webid": DEVICE,
                    "content-type": "application/json",
                },
                content=b"{}",
            )
            data = orjson.loads(reg.content)
            session = Session(data["accessToken"]["raw"], data["refreshToken"]["raw"])
            created = await pool.request(
                "POST",
                emu.base_url + CREATE_CHAT_PATH,
                headers=list(session.headers().items()),
                content=json_body({"chatName": "x"}),
            )
            chat_id = orjson.loads(created.content)["chatId"]
            answers = []
            for _ in range(2):
                async with pool.stream(
                    "POST",
                    emu.base_url + SEND_MESSAGE_PATH,
                    headers=list(session.headers("application/connect+json").items()),
                    content=send_body(chat_id),
                ) as response:
                    decoder = EnvelopeDecoder()
                    envelopes = [
                        env
                        async for chunk in response.aiter_stream()
                        for env in decoder.feed(chunk)
                    ]
                    decoder.close()
                answers.append("".join(texts(envelopes)))
            connections = len(pool.connections)
    assert answers == ["secure", "secure"]
    assert connections == 1
    assert emu.record.streams_finished == 2


# --- command line ------------------------------------------------------------------


def test_parse_args_builds_behavior() -> None:
    """The CLI options land in the host, port, tokens and behaviour."""
    options = parse_args(
        [
            "--port",
            "9001",
            "--host",
            "localhost",
            "--stamp",
            "--frames",
            "50",
            "--frame-delay-s",
            "0.01",
            "--stall-after",
            "3",
            "--answer",
            "hi",
            "--token",
            "t1",
        ]
    )
    assert (options.host, options.port, options.tokens) == ("localhost", 9001, ("t1",))
    behavior = options.behavior
    assert behavior.stamp
    assert behavior.stamp_frames == 50
    assert (behavior.frame_delay_s, behavior.stall_after, behavior.answer) == (0.01, 3, "hi")
    defaults = parse_args([])
    assert (defaults.host, defaults.port, defaults.tokens) == ("127.0.0.1", 8001, None)
    assert defaults.behavior == StepBehavior()


def test_parse_args_rejects_bad_numbers() -> None:
    """A non-numeric port makes argparse exit with status 2."""
    with pytest.raises(SystemExit) as info:
        parse_args(["--port", "eighty"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("signum", "started_with"),
    [
        (signal.SIGINT, signal.SIG_DFL),
        (signal.SIGINT, signal.SIG_IGN),
        (signal.SIGTERM, signal.SIG_DFL),
    ],
    ids=["sigint", "sigint-started-ignored", "sigterm"],
)
async def test_main_serves_until_sigint(signum: int, started_with: signal.Handlers) -> None:
    """`python -m providers.step.emulator --port 0` prints its URL, serves, exits 0 on SIGINT.

    Also when it was started with SIGINT ignored, as a background job of a
    non-interactive shell is (Python then leaves SIGINT ignored, and trio's
    KeyboardInterrupt never comes), and on SIGTERM. The child is reaped
    whatever happens, so a failure here cannot leak into a later test.
    """
    with trio.fail_after(PROCESS_TIMEOUT_S):
        async with emulator_process(
            "providers.step.emulator", "--answer", "cli", sigint=started_with
        ) as child:
            host, port = child.base_url.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                client = Client(stream)
                reply = await client.request(
                    "POST",
                    REGISTER_PATH,
                    {"cookie": "Oasis-Token=t", "oasis-webid": "d", "content-type": JSON},
                    b"{}",
                )
            code = await child.stop(signum)
    assert reply.status == 200
    assert code == 0
