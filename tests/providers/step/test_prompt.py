"""Tests of providers.step.prompt: OpenAI request -> StepChat request, and unary replies."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.connect import Envelope, EnvelopeDecoder
from protocol.errors import (
    AuthError,
    LocalProtocolError,
    RemoteProtocolError,
    UpstreamFailed,
    UpstreamTimeout,
)
from protocol.openai import ContentPart, Message
from providers.step import prompt
from providers.step.prompt import (
    BROWSER_HEADERS,
    FILE_FAILED_STATUSES,
    HISTORY_HINT,
    HISTORY_HINT_WITH_FILES,
    attachment,
    attachments_of,
    browser_headers,
    build_prompt,
    create_chat_body,
    delete_chat_body,
    parse_create_chat,
    parse_credential,
    parse_file_status,
    parse_register,
    parse_unary_error,
    parse_upload,
    send_message_body,
    session_cookie,
)


def text(role: str, content: str) -> Message:
    """A message with string content."""
    return Message(role, (ContentPart("text", text=content),), False)


def parts(role: str, *items: ContentPart) -> Message:
    """A message with array content."""
    return Message(role, items, True)


# --- build_prompt ---------------------------------------------------------


def test_protocols_example_gets_the_history_hint() -> None:
    """The three-message example of PROTOCOLS.md 2.9 merges into its documented text."""
    messages = [text("user", "你好"), text("assistant", "你好！"), text("user", "讲个笑话")]
    assert build_prompt(messages) == (
        "user:你好\n"
        "assistant:你好！\n"
        "system:以上为历史消息，关注以下用户消息\n"
        "user:讲个笑话\n"
        "assistant:"
    )


def test_single_message_has_no_history_hint() -> None:
    """A one-message conversation gets no 'history' hint (weakness 34)."""
    assert build_prompt([text("user", "hi")]) == "user:hi\nassistant:"


def test_no_messages_is_just_the_assistant_cue() -> None:
    """An empty conversation merges to the closing cue alone."""
    assert build_prompt([]) == "assistant:"


def test_null_content_is_skipped() -> None:
    """A message with null content prints nothing, never 'null' or 'undefined'."""
    messages = [
        text("user", "a"),
        Message("assistant", (), False),
        text("user", "b"),
    ]
    merged = build_prompt(messages)
    assert merged == f"user:a\nsystem:{HISTORY_HINT}\nuser:b\nassistant:"
    assert "null" not in merged
    assert "undefined" not in merged


def test_array_content_prints_one_line_per_text_part() -> None:
    """Array content gives one role line per text part; image and file parts print nothing."""
    single = parts(
        "user",
        ContentPart("text", text="first"),
        ContentPart("image_url", url="https://example.com/a.png"),
        ContentPart("text", text="second"),
        ContentPart("file", url="https://example.com/b.pdf", name="b.pdf"),
    )
    assert build_prompt([single]) == "user:first\nuser:second\nassistant:"


def test_file_hint_when_last_message_has_files() -> None:
    """When the last message carries a file, the hint names files."""
    messages = [
        text("user", "hello"),
        parts(
            "user",
            ContentPart("text", text="summarise"),
            ContentPart("file", url="https://example.com/b.pdf"),
        ),
    ]
    assert build_prompt(messages) == (
        f"user:hello\nsystem:{HISTORY_HINT_WITH_FILES}\nuser:summarise\nassistant:"
    )


def test_image_in_last_message_also_gives_the_file_hint() -> None:
    """An image_url part in the last message selects the file hint as well."""
    messages = [
        text("system", "be brief"),
        parts("user", ContentPart("image_url", url="data:image/png;base64,AAAA")),
    ]
    assert build_prompt(messages) == (
        f"system:be brief\nsystem:{HISTORY_HINT_WITH_FILES}\nassistant:"
    )


def test_files_in_earlier_messages_do_not_select_the_file_hint() -> None:
    """Only the last message decides which hint is used."""
    messages = [
        parts("user", ContentPart("file", url="https://example.com/old.pdf")),
        text("user", "now"),
    ]
    assert build_prompt(messages) == f"system:{HISTORY_HINT}\nuser:now\nassistant:"


def test_callers_messages_are_not_modified() -> None:
    """Merging leaves the caller's list exactly as it was (weakness 32)."""
    messages = [text("user", "a"), text("assistant", "b"), text("user", "c")]
    before = list(messages)
    build_prompt(messages)
    assert messages == before
    assert len(messages) == 3


def test_empty_role_prints_as_user() -> None:
    """A message without a role is printed as 'user', as the reference does."""
    assert build_prompt([text("", "x")]) == "user:x\nassistant:"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system", "tool"]), st.text())))
def test_prompt_shape_property(items: list[tuple[str, str]]) -> None:
    """Any string-content conversation merges to its lines, one hint iff >1 message, and the cue."""
    messages = [text(role, content) for role, content in items]
    lines = [f"{role}:{content}\n" for role, content in items]
    if len(lines) > 1:
        lines.insert(len(lines) - 1, f"system:{HISTORY_HINT}\n")
    assert build_prompt(messages) == "".join(lines) + "assistant:"


# --- attachments -----------------------------------------------------------


def test_attachments_are_the_last_messages_files_in_order() -> None:
    """Only the last message's file and image parts are attachments, in order."""
    pdf = ContentPart("file", url="https://example.com/b.pdf")
    png = ContentPart("image_url", url="https://example.com/a.png")
    messages = [
        parts("user", ContentPart("file", url="https://example.com/old.pdf")),
        parts("user", pdf, ContentPart("text", text="x"), png),
    ]
    assert attachments_of(messages) == [pdf, png]
    assert attachments_of([]) == []
    assert attachments_of([text("user", "x")]) == []


def test_attachment_with_unknown_dimensions_uses_empty_strings() -> None:
    """Unknown width/height are empty strings, never the literal 'undefined' (weakness 28)."""
    assert attachment("f1", "test.pdf", "application/pdf", 123456, None, None) == {
        "attachmentType": "application/pdf",
        "attachmentId": "f1",
        "name": "test.pdf",
        "width": "",
        "height": "",
        "size": "123456",
    }


def test_attachment_with_dimensions_sends_them_as_strings() -> None:
    """Known image dimensions are decimal strings."""
    item = attachment("f2", "a.png", "image/png", 10, 640, 480)
    assert (item["width"], item["height"], item["size"]) == ("640", "480", "10")


# --- bodies ---------------------------------------------------------------


def decode_one(body: bytes) -> Envelope:
    """The single envelope ``body`` must consist of."""
    decoder = EnvelopeDecoder()
    envelopes = decoder.feed(body)
    decoder.close()
    assert len(envelopes) == 1
    return envelopes[0]


def test_send_message_body_is_one_envelope_without_attachments() -> None:
    """SendMessageStream's body decodes to one plain envelope; no files -> no attachments key."""
    envelope = decode_one(send_message_body("85466015488159744", "user:hi\nassistant:"))
    assert envelope.flags == 0
    assert orjson.loads(envelope.payload) == {
        "chatId": "85466015488159744",
        "messageInfo": {"text": "user:hi\nassistant:"},
    }


def test_send_message_body_carries_attachments() -> None:
    """Attachments go into messageInfo.attachments, unchanged and in order."""
    items = [
        attachment("f1", "a.pdf", "application/pdf", 3, None, None),
        attachment("f2", "b.png", "image/png", 4, 1, 2),
    ]
    envelope = decode_one(send_message_body("7", "t", items))
    assert orjson.loads(envelope.payload) == {
        "chatId": "7",
        "messageInfo": {"text": "t", "attachments": items},
    }


def test_header_bytes_of_the_protocols_example() -> None:
    """The envelope header is flags 0 and the big-endian length (PROTOCOLS.md 2.5)."""
    body = send_message_body("1", "")
    payload = body[5:]
    assert body[:5] == b"\x00" + len(payload).to_bytes(4, "big")


def test_unary_bodies() -> None:
    """CreateChat and DelChat bodies are the documented JSON objects."""
    assert orjson.loads(create_chat_body()) == {"chatName": "新会话"}
    assert orjson.loads(delete_chat_body("85466015488159744")) == {"chatIds": ["85466015488159744"]}
    assert orjson.loads(prompt.file_status_body("abc")) == {"id": "abc"}
    assert orjson.loads(prompt.register_body()) == {}


# --- headers --------------------------------------------------------------


def test_browser_headers_origin_follows_the_base_url() -> None:
    """Origin is built from the configured base URL, without its path."""
    headers = dict(browser_headers("http://127.0.0.1:8123/some/path"))
    assert headers[b"Origin"] == b"http://127.0.0.1:8123"
    assert dict(browser_headers("https://yuewen.cn"))[b"Origin"] == b"https://yuewen.cn"


def test_browser_headers_advertise_only_decodable_encodings() -> None:
    """Accept-Encoding names gzip and deflate only (weakness 31); no fixed Origin in the set."""
    headers = dict(BROWSER_HEADERS)
    assert headers[b"Accept-Encoding"] == b"gzip, deflate"
    assert b"Origin" not in headers
    assert headers[b"Oasis-Mode"] == b"2"
    assert headers[b"X-Waf-Client-Type"] == b"fetch_sdk"


def test_browser_headers_refuse_a_non_http_base() -> None:
    """A base URL that is not http(s) is a configuration error."""
    with pytest.raises(LocalProtocolError):
        browser_headers("yuewen.cn")


def test_session_headers_and_referers() -> None:
    """Per-call headers add Cookie, Oasis-Webid, Referer and Content-Type."""
    cookie = session_cookie("A", "R", "dev")
    headers = dict(
        prompt.session_headers(
            "https://yuewen.cn/",
            cookie,
            "dev",
            prompt.chat_referer("https://yuewen.cn/", "42"),
            prompt.CONNECT_CONTENT_TYPE,
        )
    )
    assert headers[b"Cookie"] == b"Oasis-Token=A...R; Oasis-Webid=dev"
    assert headers[b"Oasis-Webid"] == b"dev"
    assert headers[b"Referer"] == b"https://yuewen.cn/chats/42"
    assert headers[b"Content-Type"] == b"application/connect+json"
    assert prompt.new_chat_referer("https://yuewen.cn") == "https://yuewen.cn/chats/new"


def test_upload_path_encodes_the_file_name() -> None:
    """The storage file name is percent-encoded (weakness 28)."""
    assert prompt.upload_path("a b&c=d/测.pdf") == (
        "/api/storage?file_name=a%20b%26c%3Dd%2F%E6%B5%8B.pdf"
    )


# --- credentials ------------------------------------------------------------


def test_parse_credential_splits_device_and_token() -> None:
    """'deviceId@Oasis-Token' splits at the first '@'; surrounding whitespace is dropped."""
    assert parse_credential("  267bcc81@eyJ.A...eyJ.R \n") == ("267bcc81", "eyJ.A...eyJ.R")
    assert parse_credential("dev@tok@en") == ("dev", "tok@en")


@pytest.mark.parametrize(
    "credential",
    ["secret-token-value", "@secret-token-value", "dev@", "  ", "dev@secret;x=1", "dev@se cret"],
)
def test_parse_credential_refuses_bad_forms_without_echoing(credential: str) -> None:
    """A credential without '@', with an empty side or unsafe characters is an AuthError
    whose message names the expected form and does not contain the token."""
    with pytest.raises(AuthError) as info:
        parse_credential(credential)
    assert "deviceId@Oasis-Token" in info.value.message
    assert "secret" not in str(info.value)
    assert info.value.status == 401


def test_session_cookie_joins_tokens_with_three_dots() -> None:
    """The session cookie is Oasis-Token=A...R plus Oasis-Webid (2.3)."""
    assert session_cookie("A", "R", "dev") == b"Oasis-Token=A...R; Oasis-Webid=dev"
    assert prompt.register_cookie("tok") == b"Oasis-Token=tok"


def test_session_cookie_refuses_header_injection() -> None:
    """A value that could end the header or add a cookie is refused."""
    with pytest.raises(LocalProtocolError):
        session_cookie("A\r\nX-Evil: 1", "R", "dev")
    with pytest.raises(LocalProtocolError):
        session_cookie("A", "R", "dev; admin=1")


# --- unary errors -------------------------------------------------------------


def connect_error(code: str, message: str = "boom") -> bytes:
    """A Connect unary error body."""
    return orjson.dumps({"code": code, "message": message, "details": []})


def test_unary_success_is_none() -> None:
    """A 2xx response without a string code is no error."""
    assert parse_unary_error(200, b'{"chatId": "1"}') is None
    assert parse_unary_error(200, b"") is None
    assert parse_unary_error(204, b"not json") is None
    assert parse_unary_error(200, b'{"code": 0}') is None


def test_unauthenticated_is_auth_error() -> None:
    """unauthenticated becomes a 401 AuthError carrying the Connect code and message."""
    error = parse_unary_error(401, connect_error("unauthenticated", "token expired"))
    assert isinstance(error, AuthError)
    assert (error.status, error.code) == (401, "unauthenticated")
    assert "token expired" in error.message


def test_permission_denied_is_auth_error() -> None:
    """permission_denied becomes a 401 AuthError saying the account was refused."""
    error = parse_unary_error(403, connect_error("permission_denied"))
    assert isinstance(error, AuthError)
    assert (error.status, error.code) == (401, "permission_denied")
    assert "refused the account" in error.message


def test_resource_exhausted_is_429() -> None:
    """resource_exhausted becomes an UpstreamFailed with status 429."""
    error = parse_unary_error(429, connect_error("resource_exhausted"))
    assert type(error) is UpstreamFailed
    assert (error.status, error.code) == (429, "resource_exhausted")


def test_deadline_exceeded_is_timeout() -> None:
    """deadline_exceeded becomes an UpstreamTimeout (504)."""
    error = parse_unary_error(504, connect_error("deadline_exceeded"))
    assert isinstance(error, UpstreamTimeout)
    assert (error.status, error.code) == (504, "deadline_exceeded")


def test_other_codes_are_502() -> None:
    """Any other Connect code becomes an UpstreamFailed (502) keeping the code."""
    error = parse_unary_error(500, connect_error("internal"))
    assert type(error) is UpstreamFailed
    assert (error.status, error.code) == (502, "internal")


def test_body_decides_even_with_status_200() -> None:
    """A string code in a 200 body is an error, as the reference decides by the body."""
    error = parse_unary_error(200, connect_error("unauthenticated"))
    assert isinstance(error, AuthError)


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (401, b"", AuthError, "unauthenticated"),
        (403, b"<html>forbidden</html>", AuthError, "permission_denied"),
        (429, b"[]", UpstreamFailed, "resource_exhausted"),
        (504, b"\xff\xfe", UpstreamTimeout, "deadline_exceeded"),
        (502, b'{"code": 5}', UpstreamFailed, "unknown"),
        (500, b"null", UpstreamFailed, "internal"),
    ],
)
def test_non_2xx_without_a_readable_body(
    status: int, body: bytes, cls: type[Exception], code: str
) -> None:
    """A non-2xx status with an empty or unreadable body is still an error, coded by status."""
    error = parse_unary_error(status, body)
    assert isinstance(error, cls)
    assert error.code == code


@settings(max_examples=200, deadline=None)
@given(st.integers(100, 599), st.binary(max_size=64))
def test_unary_error_never_raises_on_garbage(status: int, body: bytes) -> None:
    """Any status and body give None or an error object, never an exception."""
    error = parse_unary_error(status, body)
    assert error is None or isinstance(error, UpstreamFailed | AuthError)
    if not 200 <= status < 300:
        assert error is not None


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.none() | st.booleans() | st.text(max_size=8)))
def test_unary_error_never_raises_on_json_objects(obj: dict[str, object]) -> None:
    """Arbitrary JSON objects are errors exactly when they hold a non-empty string code."""
    error = parse_unary_error(200, orjson.dumps(obj))
    code = obj.get("code")
    assert (error is not None) == (isinstance(code, str) and code != "")


# --- success bodies -----------------------------------------------------------


def test_parse_register() -> None:
    """RegisterDevice yields the two raw tokens."""
    body = b'{"accessToken": {"raw": "eyJA"}, "refreshToken": {"raw": "eyJR"}, "device": {}}'
    assert parse_register(body) == ("eyJA", "eyJR")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"accessToken": {"raw": "A"}}',
        b'{"accessToken": {"raw": ""}, "refreshToken": {"raw": "R"}}',
        b'{"accessToken": "A", "refreshToken": {"raw": "R"}}',
        b'{"accessToken": {"raw": "A;b=1"}, "refreshToken": {"raw": "R"}}',
    ],
)
def test_parse_register_refuses_missing_tokens(body: bytes) -> None:
    """A RegisterDevice body without two usable raw tokens is a RemoteProtocolError."""
    with pytest.raises(RemoteProtocolError):
        parse_register(body)


def test_parse_create_chat() -> None:
    """CreateChat yields the decimal chatId; anything else is a RemoteProtocolError."""
    assert parse_create_chat(b'{"chatId": "85466015488159744", "x": 1}') == "85466015488159744"
    for body in (b'{"chatId": 85466015488159744}', b'{"chatId": "12a"}', b'{"chatId": ""}', b"{"):
        with pytest.raises(RemoteProtocolError):
            parse_create_chat(body)


def test_parse_upload() -> None:
    """The storage reply yields the file id; a missing id is a RemoteProtocolError."""
    assert parse_upload(b'{"id": "file-1"}') == "file-1"
    with pytest.raises(RemoteProtocolError):
        parse_upload(b'{"id": 3}')


def test_parse_file_status() -> None:
    """GetFileStatus yields (fileStatus, needFurtherCall); omitted fields take proto defaults."""
    assert parse_file_status(b'{"fileStatus": 1, "needFurtherCall": false}') == (1, False)
    assert parse_file_status(b'{"needFurtherCall": true}') == (0, True)
    assert parse_file_status(b"{}") == (0, False)
    assert 59 in FILE_FAILED_STATUSES
    assert {12, 22, 59, 404} == FILE_FAILED_STATUSES
    for body in (b'{"fileStatus": "1"}', b'{"fileStatus": true}', b'{"needFurtherCall": 1}'):
        with pytest.raises(RemoteProtocolError):
            parse_file_status(body)
