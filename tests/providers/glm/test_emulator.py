"""Tests of the fake chatglm.cn (providers/glm/emulator.py and emulator_script.py).

The snapshot script is checked with plain functions and hypothesis; the
server is driven over loopback by httpcore (signed as a client would sign,
with providers.glm.signing) and, where the test must control the socket
(half-read streams, stalls, dropped connections), by a raw h11 client.
"""

from __future__ import annotations

import itertools
import signal
import ssl
import time
from typing import TYPE_CHECKING, Any

import h11
import httpcore
import orjson
import pytest
import trio
import trustme
from hypothesis import example, given, settings
from hypothesis import strategies as st

from providers.glm.emulator import (
    DELETE_PATH,
    ERR_AUTH,
    ERR_BUSY,
    ERR_NOT_FOUND,
    ERR_PARAM,
    ERR_SIGN,
    REFRESH_PATH,
    STREAM_PATH,
    TINY_PNG,
    UPLOAD_PATH,
    VIDEO_CHAT_PATH,
    VIDEO_COMPOSITE_PATH,
    VIDEO_STATUS_PREFIX,
    VIDEO_UPLOAD_PATH,
    FormPart,
    GlmBehavior,
    GlmEmulator,
    GlmRecord,
    account_key,
    emulator_from_args,
    parse_multipart,
)
from providers.glm.emulator_script import (
    ScriptSpec,
    cite,
    grow,
    last_parts,
    prompt_last_line,
    snapshot_events,
)
from providers.glm.signing import sign
from tests.providers.emulator_process import PROCESS_TIMEOUT_S, emulator_process

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

TOKENS = ("rt-alice", "rt-bob")
CHAT_ASSISTANT = "65940acff94777010aa6b796"
DRAWING_ASSISTANT = "65a232c082ff90a2ad2f15e2"
Headers = list[tuple[bytes, bytes]]


# ---------------------------------------------------------------- helpers


def counter_ids() -> Callable[[], str]:
    """Deterministic logic ids for the sans-IO script tests."""
    count = iter(range(1_000_000))
    return lambda: f"part-{next(count)}"


def signed(token: str | None = None, *, signature: bool = True) -> Headers:
    """The headers of a signed JSON call, as a client builds them (3.4, 3.5)."""
    headers: Headers = [(b"Content-Type", b"application/json")]
    if signature:
        headers += sign(int(time.time() * 1000)).headers()
    if token is not None:
        headers.append((b"Authorization", f"Bearer {token}".encode()))
    return headers


def sse_data(raw: bytes) -> list[bytes]:
    """The data of every SSE event in ``raw`` (one data line per event here)."""
    text = raw.replace(b"\r\n", b"\n")
    out = []
    for block in text.split(b"\n\n"):
        lines = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
        if lines:
            out.append(b"\n".join(lines))
    return out


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """Every SSE event of ``raw`` parsed as JSON."""
    return [orjson.loads(data) for data in sse_data(raw)]


def items(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The final item of every part of type ``kind``, in order."""
    return [
        item
        for part in last_parts(events).values()
        for item in part["content"]
        if item["type"] == kind
    ]


def answer_of(events: list[dict[str, Any]]) -> str:
    """The answer text a snapshot-keyed client reads back."""
    return "".join(item["text"] for item in items(events, "text"))


def normalized(events: list[dict[str, Any]]) -> list[Any]:
    """Events with logic and conversation ids replaced by stable stand-ins."""
    names: dict[str, str] = {}
    out = []
    for event in events:
        event = dict(event, conversation_id="C")
        parts = []
        for part in event["parts"]:
            names.setdefault(part["logic_id"], f"L{len(names)}")
            parts.append(dict(part, logic_id=names[part["logic_id"]]))
        out.append(dict(event, parts=parts))
    return out


def chat_body(
    text: str = "hello emulator",
    *,
    conversation_id: str = "",
    chat_mode: str | None = None,
    assistant_id: str = CHAT_ASSISTANT,
) -> dict[str, Any]:
    """A 3.7 stream request body."""
    meta: dict[str, Any] = {"is_networking": True, "platform": "pc"}
    if chat_mode is not None:
        meta["chat_mode"] = chat_mode
    return {
        "assistant_id": assistant_id,
        "conversation_id": conversation_id,
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
        "meta_data": meta,
    }


async def call(
    pool: httpcore.AsyncConnectionPool,
    emu: GlmEmulator,
    path: str,
    token: str | None,
    body: dict[str, Any] | None = None,
    *,
    method: str = "POST",
    signature: bool = True,
) -> dict[str, Any]:
    """A unary call; returns the JSON envelope (always HTTP 200 at the site)."""
    content = orjson.dumps(body if body is not None else {}) if method == "POST" else b""
    response = await pool.request(
        method,
        emu.base_url + path,
        headers=signed(token, signature=signature),
        content=content,
    )
    assert response.status == 200
    result = orjson.loads(response.content)
    assert isinstance(result, dict)
    return result


async def login(
    pool: httpcore.AsyncConnectionPool, emu: GlmEmulator, token: str = TOKENS[0]
) -> str:
    """Refresh ``token`` and return the access token."""
    envelope = await call(pool, emu, REFRESH_PATH, token)
    access = envelope["result"]["access_token"]
    assert isinstance(access, str)
    return access


async def chat(
    pool: httpcore.AsyncConnectionPool,
    emu: GlmEmulator,
    access: str,
    body: dict[str, Any] | None = None,
) -> httpcore.Response:
    """One whole stream request."""
    return await pool.request(
        "POST",
        emu.base_url + STREAM_PATH,
        headers=signed(access),
        content=orjson.dumps(body if body is not None else chat_body()),
    )


async def upload(
    pool: httpcore.AsyncConnectionPool,
    emu: GlmEmulator,
    access: str,
    disposition: str,
    data: bytes,
    content_type: str | None,
    *,
    path: str = UPLOAD_PATH,
    headers: Headers | None = None,
) -> dict[str, Any]:
    """A multipart upload with one part, built by hand as a client must."""
    boundary = "----relay-test-boundary-7f3a"
    head = f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    form = head.encode() + b"\r\n" + data + f"\r\n--{boundary}--\r\n".encode()
    extra = headers if headers is not None else []
    response = await pool.request(
        "POST",
        emu.base_url + path,
        headers=[
            (b"Content-Type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"Authorization", f"Bearer {access}".encode()),
            *extra,
        ],
        content=form,
    )
    result = orjson.loads(response.content)
    assert isinstance(result, dict)
    return result


class RawStream:
    """A stream request on its own TCP connection, read through a client h11."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.body = b""

    @classmethod
    async def open(
        cls, emu: GlmEmulator, access: str, body: dict[str, Any], *, http_10: bool = False
    ) -> RawStream:
        stream = await trio.open_tcp_stream("127.0.0.1", emu.port)
        conn = h11.Connection(h11.CLIENT)
        payload = orjson.dumps(body)
        headers = [(b"Host", b"127.0.0.1"), (b"Content-Length", str(len(payload)).encode())]
        headers += signed(access)
        request = h11.Request(method="POST", target=STREAM_PATH, headers=headers)
        wire = conn.send(request) or b""
        wire += (conn.send(h11.Data(data=payload)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        if http_10:  # h11 only speaks 1.1; it still parses the answer
            lines = [b"POST " + STREAM_PATH.encode() + b" HTTP/1.0"]
            lines += [name + b": " + value for name, value in headers]
            wire = b"\r\n".join(lines) + b"\r\n\r\n" + payload
        await stream.send_all(wire)
        return cls(stream, conn)

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(bytes(await self.stream.receive_some(65536)))

    async def read_events(self, count: int) -> list[dict[str, Any]]:
        """Read until ``count`` whole events arrived; return them."""
        while len(sse_data(self.body)) < count or not self.body.endswith(b"\n\n"):
            event = await self._next_event()
            if isinstance(event, h11.Data):
                self.body += event.data
            elif not isinstance(event, h11.Response):
                raise AssertionError(f"stream ended early with {event!r}")
        return sse_events(self.body)

    async def read_to_end(self) -> str:
        """Read the rest; "complete" for a whole response, "eof" if cut short."""
        try:
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    self.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return "complete"
        except h11.RemoteProtocolError:
            return "eof"

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
async def emu(nursery: trio.Nursery) -> AsyncIterator[GlmEmulator]:
    emulator = GlmEmulator(tokens=TOKENS)
    await nursery.start(emulator.serve)
    yield emulator
    assert emulator.record.handler_errors == []


@pytest.fixture
async def pool() -> AsyncIterator[httpcore.AsyncConnectionPool]:
    async with httpcore.AsyncConnectionPool() as connection_pool:
        yield connection_pool


# ---------------------------------------------------------------- sans-IO: the script


@given(text=st.text(max_size=60), step=st.integers(-2, 9))
def test_grow_yields_cumulative_prefixes_ending_in_the_text(text: str, step: int) -> None:
    """For any text and step, grow() gives prefixes step characters apart, ending in the text."""
    prefixes = list(grow(text, step))
    assert prefixes[-1] == text
    width = max(1, step)
    for i, prefix in enumerate(prefixes[:-1]):
        assert prefix == text[: (i + 1) * width]
    assert len(prefixes) == max(1, -(-len(text) // width))


def test_cite_puts_a_marker_before_each_sentence_end() -> None:
    """Sentences get cycling markers before their punctuation; dots inside words do not."""
    assert (
        cite("智谱是一家AI公司。它在北京！", 2)
        == "智谱是一家AI公司【1†source】。它在北京【2†source】！"
    )
    assert cite("See chatglm.cn now. Version 3.5 is out. Done", 2) == (
        "See chatglm.cn now【1†source】. Version 3.5 is out【2†source】. Done"
    )
    assert cite("no sentence end", 3) == "no sentence end【1†source】"
    assert cite("A. B. C.", 2) == "A【1†source】. B【2†source】. C【1†source】."
    assert cite("Really?! Yes.", 1) == "Really【1†source】?! Yes【1†source】."
    assert cite("anything", 0) == "anything"


def test_prompt_last_line_skips_role_tags_and_survives_bad_bodies() -> None:
    """The demo answer quotes what the user wrote, not the merged prompt's role tags."""
    merged = "<|user|>\n你好\n<|assistant|>\n你好！\n<|user|>\n再见\n<|assistant|>\n"
    assert prompt_last_line(chat_body(merged)) == "再见"
    assert prompt_last_line({"messages": [{"role": "user", "content": "a\nb\n\n"}]}) == "b"
    assert prompt_last_line({"messages": "nope"}) == ""
    assert prompt_last_line({"messages": [{"content": 5}]}) == ""


def full_spec(layout: str, answer: str = "答案。Done.", step: int = 3) -> ScriptSpec:
    return ScriptSpec(
        conversation_id="c" * 24,
        answer=answer,
        chunk_chars=step,
        think="想一想",
        search_results=(("智谱", "https://www.zhipuai.cn/"),),
        code="print(1)",
        execution_output="1",
        images=("https://img.example/a.png",),
        layout="cumulative" if layout == "cumulative" else "active",
    )


@settings(max_examples=150, deadline=None)
@given(
    answer=st.text(max_size=40),
    step=st.integers(1, 7),
    layout=st.sampled_from(["active", "cumulative"]),
)
@example(answer="智谱【1†source】。", step=1, layout="active")
def test_any_script_reads_back_to_its_answer(answer: str, step: int, layout: str) -> None:
    """Whatever the answer, chunking and layout, a client keyed by logic_id reads every
    part back exactly, and every event is one compact JSON line."""
    raw = list(snapshot_events(full_spec(layout, answer, step), logic_ids=counter_ids()))
    assert all(b"\n" not in event for event in raw)
    events = [orjson.loads(event) for event in raw]
    assert answer_of(events) == answer
    assert [item["think"] for item in items(events, "think")] == ["想一想"]
    assert [item["code"] for item in items(events, "code")] == ["print(1)"]
    assert [item["content"] for item in items(events, "execution_output")] == ["1"]
    assert items(events, "image")[0]["image"] == [{"image_url": "https://img.example/a.png"}]
    assert [e["status"] for e in events] == ["init"] * (len(events) - 1) + ["finish"]
    assert all(e["conversation_id"] == "c" * 24 and e["last_error"] == {} for e in events)


def test_active_layout_sends_each_part_alone_and_finished_parts_once() -> None:
    """Active layout: one part per event, a finished part never comes back, and the final
    event carries no parts (the reference's assumption, 3.9)."""
    events = [
        orjson.loads(e) for e in snapshot_events(full_spec("active"), logic_ids=counter_ids())
    ]
    assert all(len(e["parts"]) == 1 for e in events[:-1])
    assert events[-1]["parts"] == []
    finished: set[str] = set()
    for event in events[:-1]:
        part = event["parts"][0]
        assert part["logic_id"] not in finished
        assert part["content"][0]["status"] == part["status"]
        if part["status"] == "finish":
            finished.add(part["logic_id"])
    assert len(finished) == 6  # think, quote, text, code, output, image


def test_cumulative_layout_repeats_finished_parts_unchanged() -> None:
    """Cumulative layout: every event starts with all finished parts as they finished, and
    the final event carries every part."""
    events = [
        orjson.loads(e) for e in snapshot_events(full_spec("cumulative"), logic_ids=counter_ids())
    ]
    done: list[dict[str, Any]] = []
    for event in events[:-1]:
        assert event["parts"][: len(done)] == done
        active = event["parts"][len(done)]
        assert len(event["parts"]) == len(done) + 1
        if active["status"] == "finish":
            done.append(active)
    assert events[-1]["parts"] == done
    assert len(done) == 6


def test_search_part_finishes_with_the_hits_in_meta_data() -> None:
    """The quote_result part starts empty and finishes with meta_data.metadata_list."""
    events = [orjson.loads(e) for e in snapshot_events(full_spec("active"))]
    quotes = [
        e["parts"][0] for e in events[:-1] if e["parts"][0]["content"][0]["type"] == "quote_result"
    ]
    assert [q["status"] for q in quotes] == ["init", "finish"]
    assert quotes[0]["meta_data"] == {}
    assert quotes[1]["meta_data"]["metadata_list"] == [
        {"title": "智谱", "url": "https://www.zhipuai.cn/"}
    ]


def test_stamp_mode_takes_a_stamp_per_event_when_it_is_built() -> None:
    """Stamp mode: the text grows by one [ts:N] per event, read from the clock lazily."""
    ticks = iter(range(100, 200))
    spec = ScriptSpec(conversation_id="c", answer="ignored", stamp_frames=3)
    stream = snapshot_events(spec, clock_ns=lambda: next(ticks))
    first = orjson.loads(next(stream))
    assert first["parts"][0]["content"][0]["text"] == "[ts:100]"
    rest = [orjson.loads(e) for e in stream]
    assert answer_of([first, *rest]) == "[ts:100][ts:101][ts:102]"


# ---------------------------------------------------------------- sans-IO: multipart


def form(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    body = b""
    for head, data in parts:
        body += f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@settings(max_examples=100, deadline=None)
@given(datas=st.lists(st.binary(max_size=50), min_size=1, max_size=4))
def test_multipart_round_trips_any_file_bytes(datas: list[bytes]) -> None:
    """Any part contents, CRLFs and dashes included, come back byte for byte."""
    heads = [
        f'Content-Disposition: form-data; name="f{i}"; filename="x{i}.bin"'
        for i in range(len(datas))
    ]
    parsed = parse_multipart(
        form(list(zip(heads, datas, strict=True))), "multipart/form-data; boundary=b0undary"
    )
    assert [p.data for p in parsed] == datas
    assert [p.filename for p in parsed] == [f"x{i}.bin" for i in range(len(datas))]


def test_multipart_reads_quoted_boundary_preamble_and_encoded_names() -> None:
    """A preamble is skipped, a quoted boundary works, filename* (RFC 5987) wins and
    quoted-pairs are unescaped."""
    body = b"preamble\r\n" + form(
        [
            (
                'Content-Disposition: form-data; name="file"; filename="a.png"; '
                "filename*=UTF-8''%E7%8C%AB.png\r\nContent-Type: image/png",
                b"\x89PNG",
            ),
            ('Content-Disposition: form-data; name="note"; filename="say \\"hi\\".txt"', b"x"),
        ],
        boundary="with space",
    )
    parts = parse_multipart(body, 'multipart/form-data; boundary="with space"')
    assert parts == [
        FormPart("file", "猫.png", "image/png", b"\x89PNG"),
        FormPart("note", 'say "hi".txt', None, b"x"),
    ]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (
            b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nno end',
            "multipart/form-data; boundary=b",
        ),
        (b"nothing here", "multipart/form-data; boundary=b"),
        (b"--b--\r\n", "application/json"),
        (b"--b\r\nX-Only: header\r\n\r\nv\r\n--b--", "multipart/form-data; boundary=b"),
        (b"--b\r\nbad header line\r\n\r\nv\r\n--b--", "multipart/form-data; boundary=b"),
    ],
)
def test_multipart_rejects_malformed_bodies(body: bytes, content_type: str) -> None:
    """Unterminated parts, missing delimiters, the wrong type and parts without a
    form-data name raise ValueError."""
    with pytest.raises(ValueError, match=r"multipart|not multipart"):
        parse_multipart(body, content_type)


# ---------------------------------------------------------------- refresh and auth


async def test_refresh_with_a_known_token_gives_an_access_token(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """A signed refresh with a known token answers status 0 with access and refresh tokens."""
    with trio.fail_after(5):
        envelope = await call(pool, emu, REFRESH_PATH, "rt-alice")
    assert envelope["status"] == 0
    assert envelope["message"] == "success"
    assert envelope["result"]["refresh_token"] == "rt-alice"
    assert envelope["result"]["access_token"]
    assert emu.record.refreshes == 1
    assert emu.record.paths == [REFRESH_PATH]


async def test_bad_or_missing_signature_is_refused(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """A tampered X-Sign or no signing headers at all get the 10001 envelope over HTTP 200."""
    with trio.fail_after(5):
        tampered = [(k, b"0" * 32 if k == b"X-Sign" else v) for k, v in signed("rt-alice")]
        response = await pool.request(
            "POST", emu.base_url + REFRESH_PATH, headers=tampered, content=b"{}"
        )
        missing = await call(pool, emu, REFRESH_PATH, "rt-alice", signature=False)
    assert response.status == 200
    assert orjson.loads(response.content) == {"code": ERR_SIGN, "message": "sign invalid"}
    assert missing["code"] == ERR_SIGN
    assert emu.record.bad_signatures == 2
    assert emu.record.refreshes == 0


async def test_unknown_refresh_token_gets_code_401(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """A token outside the accepted set gets {"code": 401} and counts as an auth failure."""
    with trio.fail_after(5):
        envelope = await call(pool, emu, REFRESH_PATH, "rt-mallory")
    assert envelope["code"] == ERR_AUTH
    assert "result" not in envelope
    assert emu.record.auth_failures == 1


async def test_expired_refresh_token_gets_the_40102_envelope(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """expire_refresh_token and refresh_expired both answer {"status": 1, "message": "40102 ..."}
    (3.6), the code variant with error_field="status"; other tokens keep working."""
    with trio.fail_after(5):
        emu.expire_refresh_token("rt-alice")
        one = await call(pool, emu, REFRESH_PATH, "rt-alice")
        bob = await call(pool, emu, REFRESH_PATH, "rt-bob")
        emu.behavior.refresh_expired = True
        two = await call(pool, emu, REFRESH_PATH, "rt-bob")
        emu.behavior.error_field = "status"
        three = await call(pool, emu, REFRESH_PATH, "rt-bob")
    assert one["status"] == 1
    assert one["message"].startswith("40102")
    assert bob["status"] == 0
    assert two["status"] == 1
    assert "40102" in two["message"]
    assert three["code"] == 40102
    assert "status" not in three


async def test_error_field_status_swaps_the_envelope_fields(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """With error_field="status", errors carry status and success carries code 0."""
    emu.behavior.error_field = "status"
    with trio.fail_after(5):
        bad = await call(pool, emu, REFRESH_PATH, "rt-alice", signature=False)
        good = await call(pool, emu, REFRESH_PATH, "rt-alice")
    assert bad == {"status": ERR_SIGN, "message": "sign invalid"}
    assert good["code"] == 0
    assert "status" not in good


async def test_signature_check_can_be_switched_off(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """With check_signature False an unsigned refresh succeeds."""
    emu.behavior.check_signature = False
    with trio.fail_after(5):
        envelope = await call(pool, emu, REFRESH_PATH, "rt-alice", signature=False)
    assert envelope["status"] == 0
    assert emu.record.bad_signatures == 0


async def test_expired_or_unknown_access_tokens_get_code_401(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """After expire_access_tokens, or past access_ttl_s, or with a refresh token as bearer,
    a stream call answers JSON {"code": 401}, not SSE."""
    with trio.fail_after(5):
        access = await login(pool, emu)
        emu.expire_access_tokens()
        expired = await chat(pool, emu, access)
        emu.behavior.access_ttl_s = 0.0
        short_lived = await chat(pool, emu, await login(pool, emu))
        wrong = await chat(pool, emu, "rt-alice")
    for response in (expired, short_lived, wrong):
        assert response.status == 200
        assert orjson.loads(response.content)["code"] == ERR_AUTH
    assert emu.record.auth_failures == 3
    assert emu.record.streams == []


# ---------------------------------------------------------------- streams


async def test_stream_round_trip_ends_with_the_demo_answer(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """A stream answers chunked text/event-stream snapshots of a new 24-hex conversation;
    the answer quotes the prompt's last line and the final status is finish."""
    with trio.fail_after(5):
        response = await chat(pool, emu, await login(pool, emu), chat_body("第一行\n最后一行"))
    assert response.status == 200
    headers = dict(response.headers)
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"Transfer-Encoding"] == b"chunked"
    events = sse_events(response.content)
    conversation = emu.record.conversations_created[0]
    assert len(conversation) == 24
    assert int(conversation, 16) >= 0
    assert {e["conversation_id"] for e in events} == {conversation}
    assert events[-1]["status"] == "finish"
    assert all(e["status"] == "init" and e["last_error"] == {} for e in events[:-1])
    answer = answer_of(events)
    assert "「最后一行」" in answer
    texts = [p["content"][0]["text"] for e in events for p in e["parts"] if p["status"] == "init"]
    steps = [len(b) - len(a) for a, b in itertools.pairwise(texts)]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert steps[:-1] == [4] * (len(steps) - 1)
    assert 0 < steps[-1] <= 4
    assert all(isinstance(e["parts"][0]["logic_id"], str) for e in events[:-1])
    assert emu.record.streams == [chat_body("第一行\n最后一行")]
    assert emu.record.streams_finished == 1
    assert emu.record.active_streams == 0
    assert emu.record.max_active_per_account == {account_key("rt-alice"): 1}


@pytest.mark.parametrize("layout", ["active", "cumulative"])
async def test_both_layouts_read_back_to_the_scripted_answer(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool, layout: str
) -> None:
    """Either layout, the final snapshot's text is the scripted answer; in the cumulative
    layout the final event itself carries it."""
    emu.behavior.answer = "一二三四五六七八九十 and more"
    emu.behavior.layout = "cumulative" if layout == "cumulative" else "active"
    emu.behavior.chunk_chars = 3
    with trio.fail_after(5):
        response = await chat(pool, emu, await login(pool, emu))
    events = sse_events(response.content)
    assert answer_of(events) == "一二三四五六七八九十 and more"
    if layout == "cumulative":
        assert answer_of(events[-1:]) == "一二三四五六七八九十 and more"
    else:
        assert events[-1]["parts"] == []


async def test_think_part_comes_first_for_zero_mode_or_when_scripted(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """chat_mode zero streams a default think item first; a scripted think is used as is;
    a plain request has no think part."""
    with trio.fail_after(5):
        access = await login(pool, emu)
        zero = sse_events(
            (await chat(pool, emu, access, chat_body("问题", chat_mode="zero"))).content
        )
        plain = sse_events((await chat(pool, emu, access)).content)
        emu.behavior.think = "deliberately"
        scripted = sse_events((await chat(pool, emu, access)).content)
    assert zero[0]["parts"][0]["content"][0]["type"] == "think"
    assert "问题" in items(zero, "think")[0]["think"]
    assert items(plain, "think") == []
    growth = [
        p["content"][0]["think"]
        for e in scripted
        for p in e["parts"]
        if p["content"][0]["type"] == "think" and p["status"] == "init"
    ]
    assert growth == ["deli", "delibera", "deliberately"]
    assert items(scripted, "think") == [
        {"type": "think", "status": "finish", "think": "deliberately"}
    ]


async def test_search_results_give_a_quote_part_and_markers(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """Search results come as a finished quote_result part before the text, and the text
    carries 【N†source】 markers unless citations are off."""
    emu.behavior.answer = "智谱是一家AI公司。"
    emu.behavior.search_results = [("智谱", "https://www.zhipuai.cn/")]
    with trio.fail_after(5):
        access = await login(pool, emu)
        cited = sse_events((await chat(pool, emu, access)).content)
        emu.behavior.citations = False
        plain = sse_events((await chat(pool, emu, access)).content)
    kinds = [part["content"][0]["type"] for part in last_parts(cited).values()]
    assert kinds == ["quote_result", "text"]
    quote = next(iter(last_parts(cited).values()))
    assert quote["status"] == "finish"
    assert quote["meta_data"]["metadata_list"] == [
        {"title": "智谱", "url": "https://www.zhipuai.cn/"}
    ]
    assert answer_of(cited) == "智谱是一家AI公司【1†source】。"
    assert answer_of(plain) == "智谱是一家AI公司。"


async def test_code_part_grows_then_execution_output_follows(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """Scripted code grows while its part is init, finishes, then the execution_output part
    finishes with the output."""
    emu.behavior.answer = "ok"
    emu.behavior.code = "print(6 * 7)"
    emu.behavior.execution_output = "42"
    with trio.fail_after(5):
        events = sse_events((await chat(pool, emu, await login(pool, emu))).content)
    codes = [
        p["content"][0]["code"]
        for e in events
        for p in e["parts"]
        if p["content"][0]["type"] == "code" and p["status"] == "init"
    ]
    assert codes == ["prin", "print(6 ", "print(6 * 7)"]
    assert items(events, "code")[0]["code"] == "print(6 * 7)"
    assert items(events, "execution_output") == [
        {"type": "execution_output", "status": "finish", "content": "42"}
    ]


async def test_images_finish_with_urls_that_the_emulator_serves(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """Image names become emulator URLs serving a valid PNG, absolute URLs pass through, and
    the drawing assistant draws a default image when none is scripted."""
    emu.behavior.images = ["cat", "https://cdn.example/dog.png"]
    with trio.fail_after(5):
        access = await login(pool, emu)
        events = sse_events((await chat(pool, emu, access)).content)
        urls = [entry["image_url"] for entry in items(events, "image")[0]["image"]]
        png = await pool.request("GET", urls[0])
        head = await pool.request("HEAD", urls[0])
        emu.behavior.images = []
        drawing = sse_events(
            (
                await chat(pool, emu, access, chat_body("一只猫", assistant_id=DRAWING_ASSISTANT))
            ).content
        )
    assert urls == [f"{emu.base_url}/images/cat.png", "https://cdn.example/dog.png"]
    assert png.status == 200
    assert png.content == TINY_PNG
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert head.status == 200
    assert head.content == b""
    assert dict(head.headers)[b"content-length"] == str(len(TINY_PNG)).encode()
    drawn = items(drawing, "image")[0]["image"]
    assert drawn[0]["image_url"].startswith(f"{emu.base_url}/images/")
    assert "一只猫" in answer_of(drawing)


async def test_intervene_ends_with_the_filter_explanation(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """intervene_text ends the stream with status intervene and last_error.intervene_text."""
    emu.behavior.intervene_text = "这个问题我暂时无法回答"
    with trio.fail_after(5):
        events = sse_events((await chat(pool, emu, await login(pool, emu))).content)
    assert events[-1]["status"] == "intervene"
    assert events[-1]["last_error"] == {"intervene_text": "这个问题我暂时无法回答"}
    assert not any(e["status"] == "finish" for e in events)


async def test_stream_error_answers_non_sse_json(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """stream_error answers the stream call with that status and JSON body, records the
    request and creates no conversation."""
    emu.behavior.stream_error = (500, {"code": 500, "message": "服务繁忙"})
    with trio.fail_after(5):
        response = await chat(pool, emu, await login(pool, emu))
    assert response.status == 500
    assert dict(response.headers)[b"content-type"] == b"application/json"
    assert orjson.loads(response.content) == {"code": 500, "message": "服务繁忙"}
    assert len(emu.record.streams) == 1
    assert emu.record.conversations_created == []


async def test_bad_stream_bodies_and_unknown_conversations_are_refused(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """A body that is not a 3.7 request gets ERR_PARAM; an unknown conversation id ERR_NOT_FOUND."""
    with trio.fail_after(5):
        access = await login(pool, emu)
        no_messages = await chat(
            pool, emu, access, {"assistant_id": CHAT_ASSISTANT, "conversation_id": ""}
        )
        unknown = await chat(pool, emu, access, chat_body(conversation_id="a" * 24))
    assert orjson.loads(no_messages.content)["code"] == ERR_PARAM
    assert orjson.loads(unknown.content)["code"] == ERR_NOT_FOUND
    assert emu.record.streams == []


async def test_a_conversation_can_be_continued_then_deleted(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """An existing conversation id is continued without creating another; deleting it is
    recorded, and a second delete or another account's delete is refused."""
    with trio.fail_after(5):
        access = await login(pool, emu)
        await chat(pool, emu, access)
        conversation = emu.record.conversations_created[0]
        again = sse_events(
            (await chat(pool, emu, access, chat_body(conversation_id=conversation))).content
        )
        bob = await call(
            pool,
            emu,
            DELETE_PATH,
            await login(pool, emu, "rt-bob"),
            {"assistant_id": CHAT_ASSISTANT, "conversation_id": conversation},
        )
        deleted = await call(
            pool,
            emu,
            DELETE_PATH,
            access,
            {"assistant_id": CHAT_ASSISTANT, "conversation_id": conversation},
        )
        twice = await call(
            pool,
            emu,
            DELETE_PATH,
            access,
            {"assistant_id": CHAT_ASSISTANT, "conversation_id": conversation},
        )
        gone = await chat(pool, emu, access, chat_body(conversation_id=conversation))
    assert {e["conversation_id"] for e in again} == {conversation}
    assert emu.record.conversations_created == [conversation]
    assert bob["code"] == ERR_NOT_FOUND
    assert deleted["status"] == 0
    assert twice["code"] == ERR_NOT_FOUND
    assert emu.record.conversations_deleted == [conversation]
    assert orjson.loads(gone.content)["code"] == ERR_NOT_FOUND


async def test_one_stream_per_account_refuses_a_second_open_stream(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """While an account's stream is open, its second stream gets the busy JSON envelope;
    another account is served, and the first account is free again once its stream ends."""
    emu.behavior.stall_after = 1
    with trio.fail_after(5):
        alice = await login(pool, emu)
        first = await RawStream.open(emu, alice, chat_body())
        await first.read_events(1)
        emu.behavior.stall_after = None
        busy = await chat(pool, emu, alice)
        bob = await chat(pool, emu, await login(pool, emu, "rt-bob"))
        await first.aclose()
        await emu.wait_until(lambda r: r.active_streams == 0)
        later = await chat(pool, emu, alice)
    assert orjson.loads(busy.content) == {"code": ERR_BUSY, "message": "当前有对话正在进行中"}
    assert emu.record.concurrent_rejections == 1
    assert sse_events(bob.content)[-1]["status"] == "finish"
    assert sse_events(later.content)[-1]["status"] == "finish"
    assert emu.record.max_active_per_account == {
        account_key("rt-alice"): 1,
        account_key("rt-bob"): 1,
    }
    assert emu.record.streams_aborted == 1


async def test_without_the_limit_an_account_may_hold_two_streams(emu: GlmEmulator) -> None:
    """With one_stream_per_account off, two stalled streams of one account are both served
    and max_active_per_account says 2."""
    emu.behavior.one_stream_per_account = False
    emu.behavior.stall_after = 0
    async with httpcore.AsyncConnectionPool() as pool:
        with trio.fail_after(5):
            access = await login(pool, emu)
            streams = [await RawStream.open(emu, access, chat_body()) for _ in range(2)]
            await emu.wait_until(lambda r: r.active_streams == 2)
            for stream in streams:
                await stream.aclose()
            await emu.wait_until(lambda r: r.streams_aborted == 2)
    assert emu.record.max_active_per_account == {account_key("rt-alice"): 2}
    assert emu.record.concurrent_rejections == 0


@pytest.mark.parametrize(
    "knobs",
    [
        {"write_size": 1},
        {"write_size": 7, "line_end": "\r\n"},
        {"pack_all": True},
        {"pack_all": True, "write_size": 5},
    ],
)
async def test_wire_splitting_and_line_ends_give_the_same_events(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool, knobs: dict[str, Any]
) -> None:
    """Byte-by-byte writes (splitting lines and UTF-8 characters), CRLF line ends and one
    packed write all carry the same events as the plain stream."""
    emu.behavior.answer = "你好，世界。Hi!"
    emu.behavior.search_results = [("t", "https://t.example/")]
    with trio.fail_after(5):
        access = await login(pool, emu)
        plain = normalized(sse_events((await chat(pool, emu, access)).content))
        for name, value in knobs.items():
            setattr(emu.behavior, name, value)
        response = await chat(pool, emu, access)
    assert normalized(sse_events(response.content)) == plain
    if knobs.get("line_end") == "\r\n":
        assert b"\r\n\r\n" in response.content
        assert b"}\n\n" not in response.content


async def test_http_1_0_clients_get_a_close_delimited_stream(emu: GlmEmulator) -> None:
    """An HTTP/1.0 request gets the same events in a body that ends when the server closes."""
    async with httpcore.AsyncConnectionPool() as pool:
        with trio.fail_after(5):
            raw = await RawStream.open(emu, await login(pool, emu), chat_body(), http_10=True)
            outcome = await raw.read_to_end()
            await raw.aclose()
            await emu.wait_until(lambda r: r.streams_finished == 1)
    assert outcome == "complete"
    assert b"\r\n" not in raw.body  # no chunk framing, LF line ends
    assert sse_events(raw.body)[-1]["status"] == "finish"


async def test_drop_after_cuts_the_connection_mid_stream(emu: GlmEmulator) -> None:
    """drop_after=3 closes the TCP connection after three events without ending the chunked
    body; the conversation stays created and the stream counts as dropped."""
    emu.behavior.drop_after = 3
    async with httpcore.AsyncConnectionPool() as pool:
        with trio.fail_after(5):
            raw = await RawStream.open(emu, await login(pool, emu), chat_body())
            outcome = await raw.read_to_end()
            await raw.aclose()
    assert outcome == "eof"
    assert len(sse_events(raw.body)) == 3
    assert emu.record.streams_dropped == 1
    assert emu.record.streams_finished == 0
    assert len(emu.record.conversations_created) == 1
    assert emu.record.active_streams == 0


async def test_stall_after_keeps_the_stream_silent_until_the_client_leaves(
    emu: GlmEmulator,
) -> None:
    """stall_after=2 sends two events and then nothing; the client leaving ends it as aborted."""
    emu.behavior.stall_after = 2
    async with httpcore.AsyncConnectionPool() as pool:
        with trio.fail_after(5):
            raw = await RawStream.open(emu, await login(pool, emu), chat_body())
            assert len(await raw.read_events(2)) == 2
            with trio.move_on_after(0.02):
                await raw.read_events(3)
            await emu.wait_until(lambda r: r.active_streams == 1)
            await raw.aclose()
            await emu.wait_until(lambda r: r.streams_aborted == 1)
    assert len(sse_data(raw.body)) == 2
    assert emu.record.active_streams == 0
    assert emu.record.streams_finished == 0


async def test_malformed_after_inserts_a_data_line_that_is_not_json(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """malformed_after=1 puts a non-JSON data line after the first event; the rest follows."""
    emu.behavior.malformed_after = 1
    with trio.fail_after(5):
        response = await chat(pool, emu, await login(pool, emu))
    datas = sse_data(response.content)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(datas[1])
    good = [orjson.loads(d) for d in datas[:1] + datas[2:]]
    assert good[-1]["status"] == "finish"


async def test_client_disconnect_mid_stream_is_recorded_as_aborted(emu: GlmEmulator) -> None:
    """A client that reads one event and hangs up during frame delays is noticed at once:
    the stream counts as aborted and the account is free."""
    emu.behavior.answer = "x" * 400
    emu.behavior.chunk_chars = 1
    emu.behavior.frame_delay_s = 0.002
    async with httpcore.AsyncConnectionPool() as pool:
        with trio.fail_after(5):
            raw = await RawStream.open(emu, await login(pool, emu), chat_body())
            await raw.read_events(1)
            await raw.aclose()
            await emu.wait_until(lambda r: r.streams_aborted == 1)
    assert emu.record.streams_finished == 0
    assert emu.record.active_streams == 0


async def test_first_delay_holds_back_the_response(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """first_delay_s delays the first byte of the stream response by that long."""
    emu.behavior.first_delay_s = 0.01
    with trio.fail_after(5):
        access = await login(pool, emu)
        start = trio.current_time()
        response = await chat(pool, emu, access)
    assert trio.current_time() - start >= 0.01
    assert response.status == 200


async def test_stamp_mode_streams_monotonic_stamps(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """Stamp mode sends stamp_frames text events, each adding a later monotonic_ns stamp."""
    emu.behavior.stamp = True
    emu.behavior.stamp_frames = 5
    with trio.fail_after(5):
        before = time.monotonic_ns()
        events = sse_events((await chat(pool, emu, await login(pool, emu))).content)
    text = answer_of(events)
    stamps = [int(s) for s in text.removeprefix("[ts:").removesuffix("]").split("][ts:")]
    assert len(stamps) == 5
    assert stamps == sorted(stamps)
    assert stamps[0] >= before


# ---------------------------------------------------------------- uploads and video


async def test_image_upload_has_dimensions_and_documents_do_not(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """An image upload reports width/height (from the PNG header), a document none; both
    are recorded and served back at file_url."""
    with trio.fail_after(5):
        access = await login(pool, emu)
        image = await upload(
            pool, emu, access, 'name="file"; filename="cat.png"', TINY_PNG, "image/png"
        )
        doc = await upload(
            pool,
            emu,
            access,
            "name=\"file\"; filename*=UTF-8''%E6%8A%A5%E5%91%8A.txt",
            b"report",
            None,
        )
        served = await pool.request("GET", doc["result"]["file_url"])
    assert image["status"] == 0
    assert image["result"]["width"] == 1
    assert image["result"]["height"] == 1
    assert image["result"]["file_name"] == "cat.png"
    assert "width" not in doc["result"]
    assert "height" not in doc["result"]
    assert doc["result"]["file_name"] == "报告.txt"
    assert served.content == b"report"
    assert dict(served.headers)[b"content-type"] == b"text/plain"
    assert [(u.filename, u.content_type, u.kind) for u in emu.record.uploads] == [
        ("cat.png", "image/png", "chat"),
        ("报告.txt", "text/plain", "chat"),
    ]
    assert emu.record.uploads[0].data == TINY_PNG


async def test_uploads_accept_but_do_not_require_signatures(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """An unsigned upload passes, a wrong signature does not, and a form without a file
    part is refused."""
    with trio.fail_after(5):
        access = await login(pool, emu)
        bad_sign = [
            (k, b"f" * 32 if k == b"X-Sign" else v)
            for k, v in sign(int(time.time() * 1000)).headers()
        ]
        refused = await upload(
            pool, emu, access, 'name="file"; filename="a.txt"', b"a", "text/plain", headers=bad_sign
        )
        no_file = await upload(pool, emu, access, 'name="other"', b"a", "text/plain")
        unsigned = await upload(
            pool, emu, access, 'name="file"; filename="a.txt"', b"a", "text/plain"
        )
    assert refused["code"] == ERR_SIGN
    assert no_file["code"] == ERR_PARAM
    assert unsigned["status"] == 0
    assert len(emu.record.uploads) == 1


async def test_video_flow_from_upload_to_delete(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """Static upload gives a source_id; a video chat polls init, processing, then finished
    with the media fields; composite and delete are recorded."""
    with trio.fail_after(5):
        access = await login(pool, emu)
        source = await upload(
            pool,
            emu,
            access,
            'name="file"; filename="f.png"',
            TINY_PNG,
            "image/png",
            path=VIDEO_UPLOAD_PATH,
        )
        body = {
            "conversation_id": "",
            "prompt": "一只猫",
            "source_list": [source["result"]["source_id"]],
        }
        created = (await call(pool, emu, VIDEO_CHAT_PATH, access, body))["result"]
        chat_id = created["chat_id"]
        polls = [
            (await call(pool, emu, VIDEO_STATUS_PREFIX + chat_id, access, method="GET"))["result"]
            for _ in range(3)
        ]
        composite = await call(
            pool,
            emu,
            VIDEO_COMPOSITE_PATH,
            access,
            {"chat_id": chat_id, "key": "k", "audio_id": "7"},
        )
        deleted = await call(
            pool, emu, f"{VIDEO_CHAT_PATH}/{chat_id}", access, method="DELETE", signature=False
        )
        after = await call(pool, emu, VIDEO_STATUS_PREFIX + chat_id, access, method="GET")
    assert emu.record.uploads[0].kind == "video"
    assert len(created["conversation_id"]) == 24
    assert [p["status"] for p in polls] == ["init", "processing", "finished"]
    assert polls[2]["video_duration"] == "6s"
    assert polls[2]["resolution"] == "1440 × 960"
    assert polls[2]["video_url"].startswith(emu.base_url)
    assert polls[2]["cover_url"].endswith(".png")
    assert composite["result"]["url"].endswith(".mp4")
    assert deleted["status"] == 0
    assert after["code"] == ERR_NOT_FOUND
    assert emu.record.video_chats == [body]
    assert emu.record.video_polls == 3  # the refused poll after delete does not count
    assert emu.record.composites == [{"chat_id": chat_id, "key": "k", "audio_id": "7"}]
    assert emu.record.videos_deleted == [chat_id]


async def test_video_failure_and_missing_prompt(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """video_fail ends polling with status failed; a video chat without prompt is refused."""
    emu.behavior.video_polls = 0
    emu.behavior.video_fail = True
    with trio.fail_after(5):
        access = await login(pool, emu)
        missing = await call(pool, emu, VIDEO_CHAT_PATH, access, {"conversation_id": ""})
        chat_id = (await call(pool, emu, VIDEO_CHAT_PATH, access, {"prompt": "p"}))["result"][
            "chat_id"
        ]
        status = await call(pool, emu, VIDEO_STATUS_PREFIX + chat_id, access, method="GET")
    assert missing["code"] == ERR_PARAM
    assert status["result"]["status"] == "failed"
    assert status["result"]["video_url"] == ""


# ---------------------------------------------------------------- HTTP plumbing


async def test_unknown_paths_and_wrong_methods(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """Unknown paths answer 404 and known paths with the wrong method 405, both JSON."""
    with trio.fail_after(5):
        missing = await pool.request("GET", emu.base_url + "/nope")
        wrong = await pool.request("GET", emu.base_url + STREAM_PATH)
    assert missing.status == 404
    assert wrong.status == 405
    assert "message" in orjson.loads(wrong.content)


async def test_keep_alive_serves_several_requests_on_one_connection(emu: GlmEmulator) -> None:
    """A raw client sends three requests over one TCP connection, stream included, and gets
    three whole responses."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", emu.port)
        conn = h11.Connection(h11.CLIENT)
        responses: list[tuple[int, bytes]] = []

        async def exchange(target: str, headers: Headers, body: bytes) -> None:
            all_headers = [(b"Host", b"x"), (b"Content-Length", str(len(body)).encode()), *headers]
            wire = conn.send(h11.Request(method="POST", target=target, headers=all_headers)) or b""
            wire += (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
            await stream.send_all(wire)
            status, data = 0, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            responses.append((status, data))
            conn.start_next_cycle()

        await exchange(REFRESH_PATH, signed("rt-alice"), b"{}")
        access = orjson.loads(responses[0][1])["result"]["access_token"]
        await exchange(STREAM_PATH, signed(access), orjson.dumps(chat_body()))
        await exchange(REFRESH_PATH, signed("rt-bob"), b"{}")
        await stream.aclose()
    assert [status for status, _ in responses] == [200, 200, 200]
    assert sse_events(responses[1][1])[-1]["status"] == "finish"
    assert emu.record.refreshes == 2


async def test_garbage_requests_get_400_and_the_server_keeps_serving(
    emu: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """Bytes that are not HTTP get a 400 and a closed connection; other clients are unaffected."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", emu.port)
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
        await stream.aclose()
        envelope = await call(pool, emu, REFRESH_PATH, "rt-alice")
    assert answer.startswith(b"HTTP/1.1 400")
    assert envelope["status"] == 0


async def test_wait_until_times_out_when_the_record_never_matches(emu: GlmEmulator) -> None:
    """wait_until raises TooSlowError if the predicate stays false."""
    with trio.fail_after(5), pytest.raises(trio.TooSlowError):
        await emu.wait_until(lambda r: r.refreshes > 0, timeout=0.01)


async def test_tls_serving_with_a_trusted_certificate(nursery: trio.Nursery) -> None:
    """With an ssl_context the emulator serves HTTPS that a verifying client accepts."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    emulator = GlmEmulator(tokens=TOKENS)
    await nursery.start(
        lambda task_status: emulator.serve(ssl_context=server_context, task_status=task_status)
    )
    assert emulator.base_url.startswith("https://127.0.0.1:")
    async with httpcore.AsyncConnectionPool(ssl_context=client_context) as pool:
        with trio.fail_after(5):
            access = await login(pool, emulator)
            response = await chat(pool, emulator, access)
    assert sse_events(response.content)[-1]["status"] == "finish"
    assert emulator.record.handler_errors == []


def test_command_line_builds_the_asked_behaviour() -> None:
    """The CLI options map onto GlmBehavior and the accepted tokens."""
    emulator, host, port = emulator_from_args(
        [
            "--port",
            "9",
            "--stamp",
            "--frames",
            "7",
            "--frame-delay-s",
            "0.5",
            "--stall-after",
            "3",
            "--answer",
            "hi",
            "--token",
            "a",
            "--token",
            "b",
        ]
    )
    behavior = emulator.behavior
    assert (host, port) == ("127.0.0.1", 9)
    assert (behavior.stamp, behavior.stamp_frames, behavior.frame_delay_s) == (True, 7, 0.5)
    assert (behavior.stall_after, behavior.answer) == (3, "hi")
    assert isinstance(behavior, GlmBehavior)
    assert isinstance(emulator.record, GlmRecord)


@pytest.mark.parametrize(
    ("signum", "started_with"),
    [
        (signal.SIGINT, signal.SIG_DFL),
        (signal.SIGINT, signal.SIG_IGN),
        (signal.SIGTERM, signal.SIG_DFL),
    ],
    ids=["sigint", "sigint-started-ignored", "sigterm"],
)
async def test_module_runs_as_a_process_and_says_where_it_listens(
    signum: int, started_with: signal.Handlers
) -> None:
    """`python -m providers.glm.emulator --port 0` prints its base URL, answers a refresh,
    and exits 0 on SIGINT (also when started with SIGINT ignored) or SIGTERM.

    The child is reaped whatever happens, so a failure here cannot leak into a later test.
    """
    with trio.fail_after(PROCESS_TIMEOUT_S):
        async with emulator_process(
            "providers.glm.emulator", "--token", "rt", sigint=started_with
        ) as child:
            async with httpcore.AsyncConnectionPool() as pool:
                response = await pool.request(
                    "POST", child.base_url + REFRESH_PATH, headers=signed("rt"), content=b"{}"
                )
            code = await child.stop(signum)
    assert orjson.loads(response.content)["status"] == 0
    assert code == 0
