"""The direct ChatGLM client of ``bench overhead``: the floor the relay is compared with.

Theory of operation
-------------------
Direct mode reads the GLM emulator's native stream the way the relay does,
minus the translation to OpenAI chunks: the refresh token is exchanged for an
access token once per scenario (:meth:`GlmDirect.login`; the relay caches its
session too), then per stream one signed ``assistant/stream`` POST
(PROTOCOLS.md 3.4, 3.7), its SSE body read by :class:`GlmSnapshotReader`,
and, once the stream is over, the conversation it created is deleted, untimed
(the relay deletes after the answer as well). Every call carries the browser
header set, a stable ``X-Device-Id`` per account, a fresh ``X-Request-Id`` and
a fresh signature, as the relay's own client sends them.

The answer arrives as *snapshots* (3.9): each event repeats the whole text so
far. :class:`GlmSnapshotReader` keeps the last text of each item (keyed by the
part's ``logic_id``, or its position, and the item's index) and takes only the
new suffix of each snapshot as the chunk: the stamps are extracted from that
suffix alone, so their cost is proportional to the new text, never to the
answer so far. That a snapshot extends the previous one is checked at the
boundary only: it must be at least as long, and its characters just before
the boundary (:data:`BOUNDARY_CHECK_CHARS`) must be the previous snapshot's
last ones. A snapshot that fails the check is a ``bad_frame`` error. Decoding
the SSE event and its JSON still costs the whole snapshot: that is the
protocol's price, which the relay pays too.

In stamp mode the emulator appends whole stamps per event, so a stamp is
never split between two suffixes. Top-level status ``finish`` completes the
stream; ``intervene`` (the content filter) is an ``inband_error``.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
import trio

from bench.readers import settle_sse_end
from bench.wire import Endpoint, HttpConnection, header
from protocol.errors import RelayError, RemoteProtocolError
from protocol.openai import ContentPart, Message
from protocol.sse import SSEDecoder
from providers.glm import prompt as glm
from providers.glm.client import device_id_for
from providers.glm.signing import DEFAULT_SECRET, sign

if TYPE_CHECKING:
    from bench.readers import StreamRecord

#: Characters before the boundary that must match the previous snapshot.
BOUNDARY_CHECK_CHARS = 64
#: Bound on the untimed conversation delete after a stream.
DELETE_TIMEOUT_S = 2.0

_SSE_TYPE = b"text/event-stream"
_JSON_TYPE = b"application/json"
_END_STATUSES = ("finish", "intervene")


class GlmSnapshotReader:
    """Checks and times one ChatGLM ``assistant/stream`` answer (PROTOCOLS.md 3.9).

    A :class:`~bench.readers.StreamReader`: one :meth:`feed` per socket read,
    one :meth:`finish` at the end of the body. Each snapshot that extends a
    text item is one chunk, whose text is the new suffix.

    Args:
        record: where results go; its ``start_ns`` is the caller's.
        stamps: extract emulator stamps from the new text.

    Attributes:
        conversation_id: the first conversation id a snapshot named, or "".
    """

    __slots__ = ("_decoder", "_ended", "_record", "_stamps", "_texts", "conversation_id")

    def __init__(self, record: StreamRecord, *, stamps: bool = True) -> None:
        self._record = record
        self._stamps = stamps
        self._decoder = SSEDecoder()
        self._ended = False
        self._texts: dict[tuple[object, int], str] = {}
        self.conversation_id = ""

    def feed(self, data: bytes, now_ns: int) -> None:
        """Decode the body bytes of one read, received at ``now_ns``; never raises."""
        record = self._record
        if record.error is not None:
            return
        try:
            events = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            record.fail("bad_frame", str(exc), now_ns)
            return
        for event in events:
            if self._ended:
                record.fail("data_after_done", event.data[:80], now_ns)
                return
            try:
                snapshot = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                record.fail("bad_frame", f"not JSON: {event.data[:80]!r}", now_ns)
                return
            if not isinstance(snapshot, dict):
                record.fail("bad_frame", f"not a JSON object: {event.data[:80]!r}", now_ns)
                return
            if not self._snapshot(snapshot, now_ns):
                return

    def _snapshot(self, snapshot: dict[str, Any], now_ns: int) -> bool:
        """Take one snapshot; False once the stream has failed."""
        record = self._record
        if not self.conversation_id:
            conversation = snapshot.get("conversation_id")
            if isinstance(conversation, str):
                self.conversation_id = conversation
        parts = snapshot.get("parts", [])
        if not isinstance(parts, list):
            record.fail("bad_frame", "snapshot parts is not a list", now_ns)
            return False
        new: list[str] = []
        for position, part in enumerate(parts):
            if not isinstance(part, dict):
                record.fail("bad_frame", "snapshot part is not an object", now_ns)
                return False
            content = part.get("content")
            if not isinstance(content, list):
                continue
            logic_id = part.get("logic_id")
            key: object = logic_id if isinstance(logic_id, str) else position
            for index, item in enumerate(content):
                if not isinstance(item, dict) or item.get("type") != "text":
                    continue
                text = item.get("text")
                if not isinstance(text, str):
                    continue
                suffix = self._suffix((key, index), text)
                if suffix is None:
                    record.fail(
                        "bad_frame", f"snapshot does not extend the previous one: {key}", now_ns
                    )
                    return False
                if suffix:
                    new.append(suffix)
        if new:
            record.text_chunk(new[0] if len(new) == 1 else "".join(new), now_ns, self._stamps)
        status = snapshot.get("status")
        if status in _END_STATUSES:
            self._ended = True
            if status == "intervene":
                detail = orjson.dumps(snapshot.get("last_error")).decode()
                record.fail("inband_error", f"intervene: {detail}", now_ns)
                return False
            record.complete(now_ns)
        return True

    def _suffix(self, key: tuple[object, int], text: str) -> str | None:
        """The new part of item ``key``'s ``text``; None if it does not extend the last one."""
        texts = self._texts
        previous = texts.get(key, "")
        known = len(previous)
        if len(text) < known:
            return None
        if known:
            tail = previous[-BOUNDARY_CHECK_CHARS:]
            if not text.startswith(tail, known - len(tail)):
                return None
        texts[key] = text
        return text[known:]

    def finish(self, *, complete: bool, now_ns: int) -> None:
        """The body ended: cleanly (``complete``) or not. Decides the outcome."""
        settle_sse_end(
            self._record, self._decoder, ended=self._ended, complete=complete,
            missing="the stream ended without a finish snapshot", now_ns=now_ns,
        )


class GlmDirect:
    """A direct ChatGLM client for one logged-in account (PROTOCOLS.md 3.3-3.9).

    Args:
        endpoint: the emulator (or site).
        access_token: from :meth:`login`.
        device_id: the account's stable ``X-Device-Id``.
        prompt_text: the one user message of every stream.
        secret: the signing secret.
        delete_timeout_s: bound on the untimed delete after a stream.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        access_token: str,
        device_id: str,
        prompt_text: str,
        *,
        secret: str = DEFAULT_SECRET,
        delete_timeout_s: float = DELETE_TIMEOUT_S,
    ) -> None:
        self._endpoint = endpoint
        self._secret = secret
        self._delete_timeout_s = delete_timeout_s
        self._assistant = glm.DEFAULT_ASSISTANT
        base = endpoint.base_url
        message = Message("user", (ContentPart("text", prompt_text),), False)
        self._body = glm.stream_body(
            assistant_id=self._assistant,
            conversation_id="",
            prompt=glm.build_prompt([message], reuse=False),
        )
        common = _fixed_headers(base, access_token, device_id)
        referer = glm.referer(base, self._assistant)
        self._stream_headers = [
            (key, _SSE_TYPE) if key == b"Accept" else (key, value) for key, value in common
        ]
        self._stream_headers += [(b"Referer", referer), (b"Content-Type", _JSON_TYPE)]
        delete_referer = glm.url_for(base, glm.REFERER_ALLTOOLS_PATH).encode()
        self._delete_headers = [
            *common,
            (b"Referer", delete_referer),
            (b"Content-Type", _JSON_TYPE),
        ]

    @classmethod
    async def login(
        cls,
        base_url: str,
        credential: str,
        prompt_text: str,
        *,
        secret: str = DEFAULT_SECRET,
        delete_timeout_s: float = DELETE_TIMEOUT_S,
    ) -> GlmDirect:
        """Exchange the refresh token ``credential`` for an access token; a client for it.

        Raises:
            RelayError: the call failed (``AuthError`` when refused).
        """
        endpoint = Endpoint.parse(base_url)
        device_id = device_id_for(credential)
        headers = _fixed_headers(endpoint.base_url, credential, device_id)
        headers += [(b"Content-Type", _JSON_TYPE), *_per_call(secret)]
        connection = await HttpConnection.open(endpoint)
        try:
            await connection.send_request(b"POST", glm.REFRESH_PATH, headers, b"{}")
            response = await connection.read_response()
            body = await connection.read_body()
        finally:
            await connection.aclose()
        access, _ = glm.parse_refresh(glm.parse_envelope(response.status_code, body))
        return cls(
            endpoint,
            access,
            device_id,
            prompt_text,
            secret=secret,
            delete_timeout_s=delete_timeout_s,
        )

    async def run_stream(self, record: StreamRecord, *, timeout_s: float) -> None:
        """POST the stream (timed and checked), then delete its conversation (untimed)."""
        record.start_ns = time.monotonic_ns()
        connection: HttpConnection | None = None
        reader = GlmSnapshotReader(record, stamps=True)
        try:
            with trio.move_on_after(timeout_s) as scope:
                connection = await HttpConnection.open(self._endpoint)
                headers = [*self._stream_headers, *_per_call(self._secret)]
                await connection.send_request(b"POST", glm.STREAM_PATH, headers, self._body)
                response = await connection.read_response()
                kind = header(response, b"content-type").split(b";")[0].strip().lower()
                if response.status_code != 200 or kind != _SSE_TYPE:
                    detail = (await connection.read_body(4096)).decode("utf-8", "replace")
                    status = response.status_code
                    kind_of = f"http_{status}" if status != 200 else "not_sse"
                    record.fail(kind_of, detail, time.monotonic_ns())
                    return
                await connection.stream_body(reader)
            if scope.cancelled_caught:
                record.timed_out(timeout_s)
                return
            assert connection is not None  # the scope was not cancelled
            if reader.conversation_id:
                with trio.move_on_after(self._delete_timeout_s):
                    if not connection.next_cycle():
                        await connection.aclose()
                        connection = await HttpConnection.open(self._endpoint)
                    await self._delete(connection, reader.conversation_id)
        except RelayError as exc:  # a cut-off, a connect failure, a refused delete
            record.fail(exc.code or "bad_http", exc.message, time.monotonic_ns())
        finally:
            if connection is not None:
                await connection.aclose()

    async def _delete(self, connection: HttpConnection, conversation_id: str) -> None:
        """Delete the conversation a stream created (PROTOCOLS.md 3.7).

        Raises:
            RelayError: the delete was refused or the connection broke.
        """
        headers = [*self._delete_headers, *_per_call(self._secret)]
        body = glm.delete_body(self._assistant, conversation_id)
        await connection.send_request(b"POST", glm.DELETE_PATH, headers, body)
        response = await connection.read_response()
        glm.parse_envelope(response.status_code, await connection.read_body())


def _fixed_headers(base_url: str, bearer: str, device_id: str) -> list[tuple[bytes, bytes]]:
    """What every call of one account carries: the browser set (3.5), auth, device id."""
    headers = glm.browser_headers(base_url)
    headers.append((b"Authorization", b"Bearer " + bearer.encode()))
    headers.append((b"X-Device-Id", device_id.encode()))
    return headers


def _per_call(secret: str) -> list[tuple[bytes, bytes]]:
    """A fresh ``X-Request-Id`` and signature (3.4) for one call."""
    return [
        (b"X-Request-Id", uuid.uuid4().hex.encode()),
        *sign(int(time.time() * 1000), secret).headers(),
    ]
