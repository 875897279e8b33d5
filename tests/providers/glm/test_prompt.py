"""Tests of the ChatGLM request side (providers/glm/prompt.py, PROTOCOLS.md 3.2-3.10)."""

from __future__ import annotations

import contextlib
import copy
import email.policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.errors import (
    AuthError,
    LocalProtocolError,
    RelayError,
    RemoteProtocolError,
    UpstreamFailed,
)
from protocol.openai import ContentPart, Message
from providers.glm.prompt import (
    BROWSER_HEADERS,
    DEFAULT_ASSISTANT,
    DELETE_PATH,
    DRAWING_ASSISTANT,
    EXPIRED_MESSAGE,
    FILE_HINT,
    MODEL_OWNER,
    MODELS,
    REFRESH_PATH,
    STREAM_PATH,
    UPLOAD_PATH,
    ModelChoice,
    attachment_items,
    browser_headers,
    build_prompt,
    conversation_missing,
    delete_body,
    filename_from_url,
    is_agent_id,
    is_image_upload,
    multipart_body,
    multipart_content_type,
    origin,
    parse_envelope,
    parse_refresh,
    referer,
    resolve_model,
    stream_body,
    strip_markdown_images,
    strip_sandbox_paths,
    upload_referer,
    url_for,
    valid_conversation_id,
)

SETTINGS = settings(max_examples=200, deadline=None)


def text_message(role: str, text: str) -> Message:
    return Message(role, (ContentPart("text", text=text),), False)


def list_message(role: str, *parts: ContentPart) -> Message:
    return Message(role, tuple(parts), True)


def text(value: str) -> ContentPart:
    return ContentPart("text", text=value)


IMAGE = ContentPart("image_url", url="https://example.com/cat.png")
FILE = ContentPart("file", url="https://example.com/a.pdf", name="a.pdf")

EXAMPLE = [
    text_message("system", "你是助手"),
    text_message("user", "你好"),
    text_message("assistant", "你好！"),
    text_message("user", "再见"),
]


# --- constants ------------------------------------------------------------


def test_wire_paths_and_ids_are_those_of_the_protocol() -> None:
    """The paths and assistant ids of 3.2 are spelled exactly as the upstream expects."""
    assert REFRESH_PATH == "/chatglm/user-api/user/refresh"
    assert STREAM_PATH == "/chatglm/backend-api/assistant/stream"
    assert DELETE_PATH == "/chatglm/backend-api/assistant/conversation/delete"
    assert UPLOAD_PATH == "/chatglm/backend-api/assistant/file_upload"
    assert DEFAULT_ASSISTANT == "65940acff94777010aa6b796"
    assert DRAWING_ASSISTANT == "65a232c082ff90a2ad2f15e2"


def test_models_list_the_documented_ids() -> None:
    """/v1/models lists the reference's ids plus the reasoning and research ones, owned by glm."""
    assert MODELS == (
        "glm-3-turbo",
        "glm-4",
        "glm-4-plus",
        "glm-4v",
        "glm-v1",
        "glm-v1-vision",
        "glm-4-zero",
        "glm-4-think",
        "glm-4-deepresearch",
    )
    assert MODEL_OWNER == "glm"


def test_browser_headers_follow_the_base_url_and_keep_empty_values() -> None:
    """The 3.5 set gets an Origin from the base URL, only decodable encodings, and empty values."""
    headers = browser_headers("https://glm.example:8443/prefix/")
    as_dict = dict(headers)
    assert as_dict[b"Origin"] == b"https://glm.example:8443"
    assert as_dict[b"Accept-Encoding"] == b"gzip, deflate"
    assert as_dict[b"X-Device-Brand"] == b""
    assert as_dict[b"X-Device-Model"] == b""
    assert as_dict[b"App-Name"] == b"chatglm"
    assert as_dict[b"X-Exp-Groups"].startswith(b"na_android_config:exp:NA,")
    assert len(headers) == len(BROWSER_HEADERS) + 1
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in headers)
    assert headers is not browser_headers("https://glm.example")  # a fresh list each time


def test_origin_of_default_and_ipv6_base_urls() -> None:
    """Origin is scheme://host[:port]; IPv6 hosts keep brackets; a non-http URL is our bug."""
    assert origin("https://chatglm.cn") == b"https://chatglm.cn"
    assert origin("http://[::1]:9000/x") == b"http://[::1]:9000"
    with pytest.raises(LocalProtocolError):
        origin("ftp://chatglm.cn")


def test_referers_depend_on_the_assistant() -> None:
    """The default assistant's referer is alltoolsdetail, any other is gdetail/<id> (3.7)."""
    assert referer("https://chatglm.cn/", DEFAULT_ASSISTANT) == (
        b"https://chatglm.cn/main/alltoolsdetail"
    )
    assert referer("https://chatglm.cn", DRAWING_ASSISTANT) == (
        b"https://chatglm.cn/main/gdetail/65a232c082ff90a2ad2f15e2"
    )
    assert referer("https://x.test", "abc", default_assistant="abc") == (
        b"https://x.test/main/alltoolsdetail"
    )
    assert upload_referer("https://chatglm.cn") == b"https://chatglm.cn/"
    assert url_for("https://chatglm.cn/", STREAM_PATH) == (
        "https://chatglm.cn/chatglm/backend-api/assistant/stream"
    )


# --- model resolution -----------------------------------------------------

AGENT_24 = "abcdef0123456789abcdef01"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("glm-4-plus", ModelChoice(DEFAULT_ASSISTANT, None, think=False, silent=False)),
        ("glm-4-zero", ModelChoice(DEFAULT_ASSISTANT, "zero", think=True, silent=False)),
        ("glm-4-think", ModelChoice(DEFAULT_ASSISTANT, "zero", think=True, silent=False)),
        (
            "glm-4-deepresearch",
            ModelChoice(DEFAULT_ASSISTANT, "deep_research", think=False, silent=False),
        ),
        (
            "glm-4-deepresearch-think",
            ModelChoice(DEFAULT_ASSISTANT, "deep_research", think=True, silent=False),
        ),
        ("glm-4-think-silent", ModelChoice(DEFAULT_ASSISTANT, "zero", think=True, silent=True)),
        ("GLM-4-THINK", ModelChoice(DEFAULT_ASSISTANT, "zero", think=True, silent=False)),
        (AGENT_24, ModelChoice(AGENT_24, None, think=False, silent=False)),
        (AGENT_24 + "99", ModelChoice(AGENT_24 + "99", None, think=False, silent=False)),
        (AGENT_24[:23], ModelChoice(DEFAULT_ASSISTANT, None, think=False, silent=False)),
        (AGENT_24.upper(), ModelChoice(DEFAULT_ASSISTANT, None, think=False, silent=False)),
        ("x" + AGENT_24 + "-", ModelChoice(DEFAULT_ASSISTANT, None, think=False, silent=False)),
        ("", ModelChoice(DEFAULT_ASSISTANT, None, think=False, silent=False)),
    ],
)
def test_model_resolution_table(model: str, expected: ModelChoice) -> None:
    """Each model name selects the assistant, chat mode and flags of 3.10."""
    assert resolve_model(model) == expected


def test_model_resolution_uses_the_configured_default_assistant() -> None:
    """A name that is not an agent id falls back to the configured default."""
    assert resolve_model("glm-4", default_assistant="other").assistant_id == "other"
    assert resolve_model(AGENT_24, default_assistant="other").assistant_id == AGENT_24
    assert is_agent_id(AGENT_24)
    assert not is_agent_id(AGENT_24 + "\n")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("65f6c28546bae1f0fbb532de", "65f6c28546bae1f0fbb532de"),
        ("ABCDEFGHIJKLMNOPQRSTUVWX", "ABCDEFGHIJKLMNOPQRSTUVWX"),
        ("65f6c28546bae1f0fbb532de0000", "65f6c28546bae1f0fbb532de0000"),
        ("65f6c28546bae1f0fbb532d", None),  # 23 characters
        ("none", None),
        ("", None),
        (None, None),
        ("x-65f6c28546bae1f0fbb532de", None),  # contains an id, but is not one
        ("65f6c28546bae1f0fbb532de\n", None),
        ("65f6c28546bae1f0fbb532de ", None),
        ("６５f6c28546bae1f0fbb532de", None),  # full-width digits are not ASCII
    ],
)
def test_conversation_id_validation_is_anchored(value: str | None, expected: str | None) -> None:
    """Only a whole value of 24+ ASCII letters/digits continues a conversation (weakness 36)."""
    assert valid_conversation_id(value) == expected


# --- prompt ---------------------------------------------------------------

MERGED_EXAMPLE = (
    "<|system|>\n你是助手\n<|user|>\n你好\n<|assistant|>\n你好！\n<|user|>\n再见\n<|assistant|>\n"
)


def test_merged_prompt_of_the_protocol_example() -> None:
    """The 3.10 example merges with role tags, system spelt correctly, and a trailing tag."""
    assert build_prompt(EXAMPLE, reuse=False) == MERGED_EXAMPLE


def test_merged_prompt_with_the_reference_spelling() -> None:
    """system_tag="<|sytstem|>" reproduces the reference's output byte for byte."""
    expected = MERGED_EXAMPLE.replace("<|system|>", "<|sytstem|>")
    assert expected.startswith("<|sytstem|>\n你是助手\n<|user|>\n")
    assert build_prompt(EXAMPLE, reuse=False, system_tag="<|sytstem|>") == expected


def test_single_message_passes_through() -> None:
    """One message: its text and a newline, no tags, no scrubbing."""
    messages = [text_message("user", "看 ![a](u) /mnt/data/x")]
    assert build_prompt(messages, reuse=False) == "看 ![a](u) /mnt/data/x\n"


def test_reuse_passes_through_every_message() -> None:
    """With a reused conversation every text part becomes text plus newline, untagged."""
    messages = [
        text_message("system", "s"),
        list_message("user", text("a"), IMAGE, text("b")),
        Message("assistant", (), False),
        text_message("user", "c"),
    ]
    assert build_prompt(messages, reuse=True) == "s\na\nb\nc\n"


def test_empty_messages_give_an_empty_prompt() -> None:
    """No messages pass through as nothing."""
    assert build_prompt([], reuse=False) == ""


def test_hint_precedes_a_last_message_with_attachments() -> None:
    """A file or image in the last message puts the system hint right before it."""
    for attachment in (IMAGE, FILE):
        messages = [text_message("user", "早"), list_message("user", text("看图"), attachment)]
        assert build_prompt(messages, reuse=False) == (
            f"<|user|>\n早\n<|system|>\n{FILE_HINT}\n<|user|>\n看图\n<|assistant|>\n"
        )


def test_no_hint_for_attachments_in_earlier_messages() -> None:
    """Only the last message's attachments matter."""
    messages = [list_message("user", text("a"), IMAGE), text_message("user", "b")]
    assert FILE_HINT not in build_prompt(messages, reuse=False)


def test_null_contents_and_non_text_parts_are_skipped() -> None:
    """A null content prints nothing (not "null"); image parts add no text."""
    messages = [
        Message("assistant", (), False),
        list_message("user", IMAGE),
        text_message("user", "q"),
    ]
    result = build_prompt(messages, reuse=False)
    assert result == "<|user|>\nq\n<|assistant|>\n"
    assert "null" not in result
    assert "None" not in result


def test_other_roles_are_bare_and_developer_is_system() -> None:
    """tool keeps its bare name as the tag; developer is tagged like system."""
    messages = [
        text_message("developer", "d"),
        text_message("tool", "t"),
        text_message("user", "u"),
    ]
    assert build_prompt(messages, reuse=False) == (
        "<|system|>\nd\ntool\nt\n<|user|>\nu\n<|assistant|>\n"
    )


def test_each_list_text_part_gets_its_own_tag() -> None:
    """A list content with two text parts gives two tagged blocks."""
    messages = [text_message("system", "s"), list_message("user", text("a"), text("b"))]
    assert build_prompt(messages, reuse=False) == (
        "<|system|>\ns\n<|user|>\na\n<|user|>\nb\n<|assistant|>\n"
    )


def test_image_scrub_is_not_greedy() -> None:
    """Two images on one line are removed separately; the text between them stays (weakness 35)."""
    messages = [
        text_message("assistant", "前 ![一](https://a/1.png) 中间 ![二](https://a/2.png) 后"),
        text_message("user", "ok"),
    ]
    assert build_prompt(messages, reuse=False) == (
        "<|assistant|>\n前  中间  后\n<|user|>\nok\n<|assistant|>\n"
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("a ![x](u) b", "a  b"),
        ("![](u)", ""),
        ("![x]()", ""),
        ("![a [b] c](u)", ""),
        ("![w](https://en.wikipedia.org/wiki/Cat_(animal).jpg) t", " t"),
        ("[link](u) and (paren)", "[link](u) and (paren)"),
        ("![x]\n(u)", "![x]\n(u)"),
        ("![x](u\nv)", "![x](u\nv)"),
        ("!![x](u)!", "!!"),
        ("![x] text ](u)", "![x] text ](u)"),
    ],
)
def test_markdown_image_pattern(source: str, expected: str) -> None:
    """Only whole one-line ![alt](target) spans are removed; links and broken spans stay."""
    assert strip_markdown_images(source) == expected


def test_sandbox_paths_are_removed_to_the_end_of_their_line() -> None:
    """Each /mnt/data/ path and the rest of its line go; the newline and other lines stay."""
    assert strip_sandbox_paths("a /mnt/data/x.png b\nc\n/mnt/data/\nd") == "a \nc\n\nd"
    messages = [text_message("assistant", "见 /mnt/data/out.csv 文件"), text_message("user", "u")]
    assert build_prompt(messages, reuse=False) == "<|assistant|>\n见 \n<|user|>\nu\n<|assistant|>\n"


# text that never contains "[": markdown images can only come from IMAGES below
PLAIN = st.text(st.characters(blacklist_characters="["), max_size=12)
IMAGES = st.builds(
    "![{}]({})".format,
    st.text(st.characters(blacklist_characters="[]\n"), max_size=6),
    st.text(st.characters(blacklist_characters="()\n"), max_size=8),
)


@SETTINGS
@given(st.lists(st.tuples(PLAIN, IMAGES), max_size=5), PLAIN)
@example([("a ", "![x](u)"), (" b ", "![y](v)")], " c")
def test_image_scrub_only_removes_image_spans(pieces: list[tuple[str, str]], tail: str) -> None:
    """Whatever surrounds the images survives intact: only the image spans are removed."""
    source = "".join(plain + image for plain, image in pieces) + tail
    assert strip_markdown_images(source) == "".join(plain for plain, _ in pieces) + tail


MESSAGE_TEXT = st.lists(
    st.sampled_from(["a", "字", "\n", " ", "/mnt/data/", "/mnt/", "data/", "![", "](", ")", "x"]),
    max_size=8,
).map("".join)
MESSAGES = st.lists(
    st.builds(
        Message,
        st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
        st.lists(
            st.one_of(
                st.builds(ContentPart, st.just("text"), text=MESSAGE_TEXT),
                st.just(IMAGE),
                st.just(FILE),
            ),
            max_size=3,
        ).map(tuple),
        st.booleans(),
    ),
    max_size=5,
)


@SETTINGS
@given(MESSAGES, st.booleans())
def test_merged_prompt_never_holds_sandbox_paths_or_mutates(
    messages: list[Message], reuse: bool
) -> None:
    """A merged prompt never contains /mnt/data/, and the caller's list is left as it was."""
    before = copy.deepcopy(messages)
    result = build_prompt(messages, reuse=reuse)
    assert messages == before
    if not reuse and len(messages) >= 2:
        assert "/mnt/data/" not in result
        assert result.endswith("<|assistant|>\n")
    else:
        texts = [p.text for m in messages for p in m.parts if p.type == "text"]
        assert result == "".join(t + "\n" for t in texts)


# --- bodies ---------------------------------------------------------------


def test_stream_body_shape_for_a_plain_chat() -> None:
    """A chat without uploads has one text item, networking on and no chat_mode key (3.7)."""
    body = orjson.loads(
        stream_body(assistant_id=DEFAULT_ASSISTANT, conversation_id="", prompt="hi\n")
    )
    assert body == {
        "assistant_id": DEFAULT_ASSISTANT,
        "conversation_id": "",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi\n"}]}],
        "meta_data": {
            "channel": "",
            "draft_id": "",
            "if_plus_model": True,
            "input_question_type": "xxxx",
            "is_networking": True,
            "is_test": False,
            "platform": "pc",
            "quote_log_id": "",
        },
    }


def test_stream_body_with_uploads_and_mode() -> None:
    """Files and images become their items, images gain image_url; chat_mode is sent."""
    uploads: list[dict[str, Any]] = [
        {"file_id": "f1", "file_url": "https://s/doc.pdf", "file_name": "doc.pdf"},
        {"file_id": "i1", "file_url": "https://s/cat.png", "width": 800, "height": 600},
    ]
    files, images = attachment_items(uploads)
    raw = stream_body(
        assistant_id="a" * 24,
        conversation_id="c" * 24,
        prompt="p",
        files=files,
        images=images,
        chat_mode="zero",
    )
    body = orjson.loads(raw)
    content = body["messages"][0]["content"]
    assert content[1] == {"type": "file", "file": [uploads[0]]}
    assert content[2] == {
        "type": "image",
        "image": [{**uploads[1], "image_url": "https://s/cat.png"}],
    }
    assert body["meta_data"]["chat_mode"] == "zero"
    assert body["conversation_id"] == "c" * 24
    assert "image_url" not in uploads[1]  # inputs are not modified


def test_stream_body_fills_image_url_itself() -> None:
    """Images passed without image_url get it from file_url."""
    body = orjson.loads(
        stream_body(
            assistant_id="a", conversation_id="", prompt="p", images=[{"file_url": "u", "width": 1}]
        )
    )
    assert body["messages"][0]["content"][1]["image"] == [
        {"image_url": "u", "file_url": "u", "width": 1}
    ]


def test_stream_body_for_drawing_omits_networking() -> None:
    """The drawing flow sends neither chat_mode nor is_networking (3.12)."""
    meta = orjson.loads(
        stream_body(
            assistant_id=DRAWING_ASSISTANT, conversation_id="", prompt="p", is_networking=False
        )
    )["meta_data"]
    assert "is_networking" not in meta
    assert "chat_mode" not in meta


def test_stream_body_rejects_an_unknown_chat_mode() -> None:
    """A chat_mode the upstream does not know is a bug on our side."""
    with pytest.raises(LocalProtocolError):
        stream_body(assistant_id="a", conversation_id="", prompt="p", chat_mode="fast")


def test_delete_body() -> None:
    """The delete body names the assistant used and the conversation."""
    assert orjson.loads(delete_body("a1", "c1")) == {"assistant_id": "a1", "conversation_id": "c1"}


@pytest.mark.parametrize(
    ("result", "image"),
    [
        ({"file_url": "u", "width": 800, "height": 600}, True),
        ({"file_url": "u", "width": 0, "height": 5}, True),
        ({"file_url": "u", "width": 5}, True),
        ({"file_url": "u", "width": 0, "height": 0}, False),
        ({"file_url": "u", "width": None}, False),
        ({"file_url": "u"}, False),
    ],
)
def test_image_uploads_are_told_by_width_or_height(result: dict[str, Any], image: bool) -> None:
    """A truthy width or height marks an upload as an image (3.8)."""
    assert is_image_upload(result) is image
    files, images = attachment_items([result])
    assert (len(images), len(files)) == ((1, 0) if image else (0, 1))


# --- envelopes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"status": 0, "message": "success", "result": {"a": 1}}', {"a": 1}),
        (b'{"code": 0, "message": "ok", "result": [1]}', [1]),
        (b'{"code": 0}', None),
        (b'{"status": 0.0, "result": 2}', 2),
        (b'{"status": 1, "code": 0, "result": 3}', 3),
        (b'{"chat_id": "x"}', {"chat_id": "x"}),  # no numbers: the whole body is the result
        (b'{"code": "0", "x": 1}', {"code": "0", "x": 1}),  # a string code is not numeric
        (b"[1, 2]", [1, 2]),
    ],
)
def test_envelope_success_shapes(body: bytes, expected: object) -> None:
    """Successful answers yield result, or the whole body when it carries no numeric code."""
    assert parse_envelope(200, body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"status": 1, "message": "40102 token expired"}',
        b'{"code": 40102, "message": "expired"}',
        b'{"status": 40102}',
        b'{"code": 40102.0}',
        b'{"code": 500, "message": "error 40102"}',
    ],
)
def test_envelope_refresh_token_expired(body: bytes) -> None:
    """40102 in message, code or status means the refresh token expired (3.6)."""
    with pytest.raises(AuthError) as info:
        parse_envelope(200, body)
    assert info.value.message == EXPIRED_MESSAGE
    assert info.value.code == "refresh_token_expired"
    assert info.value.status == 401


def test_envelope_401_code_is_an_auth_error() -> None:
    """code 401 is an auth failure, so the account layer evicts the access token."""
    with pytest.raises(AuthError) as info:
        parse_envelope(200, b'{"code": 401, "message": "token invalid"}')
    assert info.value.code == "access_token_invalid"
    assert "token invalid" in info.value.message


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("body", [b"<html>Forbidden</html>", b'{"status": 0, "result": 1}', b""])
def test_envelope_http_401_and_403_are_auth_errors(status: int, body: bytes) -> None:
    """HTTP 401/403 are auth failures whatever the body says (3.6)."""
    with pytest.raises(AuthError) as info:
        parse_envelope(status, body)
    assert str(status) in info.value.message


def test_envelope_http_403_with_40102_still_says_expired() -> None:
    """An expiry reported with HTTP 403 keeps the specific message."""
    with pytest.raises(AuthError) as info:
        parse_envelope(403, b'{"status": 1, "message": "40102"}')
    assert info.value.code == "refresh_token_expired"


@pytest.mark.parametrize(
    ("status", "body", "fragment"),
    [
        (200, b'{"status": 1, "message": "busy"}', "ChatGLM request failed: busy"),
        (200, b'{"code": 10001}', "ChatGLM request failed: code 10001"),
        (200, b'{"code": 7, "message": null}', "ChatGLM request failed: code 7"),
        (502, b"<html>Bad gateway</html>", "HTTP 502"),
        (200, b"not json", "HTTP 200"),
        (200, b"", "HTTP 200"),
        (500, b'{"detail": "x"}', "HTTP 500"),
        (500, b"[]", "HTTP 500"),
    ],
)
def test_envelope_failures(status: int, body: bytes, fragment: str) -> None:
    """Other failures are UpstreamFailed carrying the message or the HTTP status."""
    with pytest.raises(UpstreamFailed) as info:
        parse_envelope(status, body)
    assert fragment in info.value.message


def test_envelope_errors_never_echo_tokens() -> None:
    """A JWT inside an upstream message is redacted; long messages are cut."""
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    for status, code in ((200, 1), (200, 401), (403, 1)):
        body = orjson.dumps({"code": code, "message": f"bad token {jwt} " + "x" * 1000})
        with pytest.raises(RelayError) as info:
            parse_envelope(status, body)
        assert jwt not in info.value.message
        assert "eyJ" not in info.value.message
        assert len(info.value.message) < 400


def test_boolean_code_is_not_a_number() -> None:
    """JSON true is not the number 1: such a body has no numeric code and is the result."""
    assert parse_envelope(200, b'{"code": true, "result": 1}') == {"code": True, "result": 1}


@SETTINGS
@given(st.integers(100, 599), st.binary(max_size=64))
def test_envelope_garbage_gives_a_value_or_a_relay_error(status: int, body: bytes) -> None:
    """Any body parses or raises one of our errors, never anything else."""
    with contextlib.suppress(RelayError):
        parse_envelope(status, body)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["code", "status", "message", "result"]), children)
    ),
    max_leaves=6,
)


@SETTINGS
@given(st.integers(100, 599), JSON_VALUES)
def test_envelope_any_json_gives_a_value_or_a_relay_error(status: int, value: object) -> None:
    """Any JSON answer parses or raises one of our errors, never anything else."""
    with contextlib.suppress(RelayError):
        parse_envelope(status, orjson.dumps(value))


# --- refresh --------------------------------------------------------------


def test_refresh_reads_new_and_legacy_fields() -> None:
    """access_token (or legacy accessToken) and the rotated refresh_token are read (3.3)."""
    assert parse_refresh({"access_token": "A", "refresh_token": "R"}) == ("A", "R")
    assert parse_refresh({"accessToken": "A"}) == ("A", None)
    assert parse_refresh({"access_token": "", "accessToken": "B", "refresh_token": ""}) == (
        "B",
        None,
    )


@pytest.mark.parametrize("result", [None, [], {}, {"access_token": 5}, {"refresh_token": "R"}])
def test_refresh_without_access_token_is_a_protocol_error(result: object) -> None:
    """A refresh answer without an access token is the upstream's fault."""
    with pytest.raises(RemoteProtocolError):
        parse_refresh(result)


# --- uploads --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://x.test/a/cat.png?x=1", "cat.png"),
        ("https://x.test/a/cat.png#frag", "cat.png"),
        ("https://x.test/%E7%8C%AB.png", "猫.png"),
        ("https://x.test/a%22b%0d.png", "ab.png"),
        ("https://x.test/dir/", "file"),
        ("https://x.test", "file"),
        ("https://x.test/a/..", "file"),
        ("https://x.test/a%2Fb.txt", "ab.txt"),
    ],
)
def test_filename_from_url_drops_the_query(url: str, name: str) -> None:
    """The name is the last path segment without query (weakness 29), made header-safe."""
    assert filename_from_url(url) == name


def parse_multipart(boundary: str, body: bytes) -> EmailMessage:
    head = b"Content-Type: " + multipart_content_type(boundary) + b"\r\n\r\n"
    message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert isinstance(message, EmailMessage)
    return message


def test_multipart_body_parses_back() -> None:
    """The stdlib email parser reads back the field, filename, type and bytes (3.8)."""
    data = b"\x89PNG\r\n\x1a\n\x00binary"
    body = multipart_body("file", "cat.png", "image/png", data, "b0undary42")
    message = parse_multipart("b0undary42", body)
    assert message.is_multipart()
    parts = list(message.iter_parts())
    assert len(parts) == 1
    part = parts[0]
    assert part.get_param("name", header="content-disposition") == "file"
    assert part.get_filename() == "cat.png"
    assert part.get_content_type() == "image/png"
    assert part.get_payload(decode=True) == data
    assert body.startswith(b"--b0undary42\r\n")
    assert body.endswith(b"\r\n--b0undary42--\r\n")


def test_multipart_filename_is_escaped_like_a_browser() -> None:
    """Quotes and line breaks in a filename are percent-encoded; UTF-8 stays as is."""
    body = multipart_body("file", 'a"b\r\n猫.txt', "text/plain", b"x", "bnd")
    assert 'filename="a%22b%0D%0A猫.txt"'.encode() in body


@pytest.mark.parametrize(
    ("field", "content_type", "boundary", "data"),
    [
        ("file", "text/plain", "", b"x"),
        ("file", "text/plain", "a" * 71, b"x"),
        ("file", "text/plain", "bad boundary", b"x"),
        ("file", "text/plain", "bnd", b"before --bnd after"),
        ('fi"le', "text/plain", "bnd", b"x"),
        ("file", "text/plain\r\nX-Evil: 1", "bnd", b"x"),
    ],
)
def test_multipart_refuses_what_would_break_the_body(
    field: str, content_type: str, boundary: str, data: bytes
) -> None:
    """Bad boundaries, a boundary inside the data, or header injection are our bugs."""
    with pytest.raises(LocalProtocolError):
        multipart_body(field, "f", content_type, data, boundary)


@SETTINGS
@given(st.binary(max_size=300), st.text(st.characters(codec="utf-8"), max_size=20))
def test_multipart_round_trip(data: bytes, filename: str) -> None:
    """Any data survives the round trip through a real multipart parser."""
    boundary = "----relay0123456789abcdef"
    body = multipart_body("file", filename, "application/octet-stream", data, boundary)
    (part,) = parse_multipart(boundary, body).iter_parts()
    assert isinstance(part, EmailMessage)
    assert part.get_payload(decode=True) == data
    # the part is exactly delimiter, header, blank line, data, delimiter
    start = body.index(b"\r\n\r\n") + 4
    assert body[start : len(body) - len(f"\r\n--{boundary}--\r\n")] == data


# --- an unknown conversation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "missing"),
    [
        (200, b'{"code": 10004, "message": "conversation not found"}', True),  # the emulator
        (200, '{"status": 1, "message": "会话不存在"}'.encode(), True),
        (200, b'{"code": 500, "message": "Conversation does not exist"}', True),
        (200, b'{"code": 500, "message": "conversation not_exist"}', True),
        (404, b"<html>nope</html>", True),
        (200, b'{"status": 0, "code": 5, "message": "not found"}', False),  # a success (3.6)
        (200, b'{"code": 10500, "message": "internal error"}', False),
        (200, b'{"message": "not found"}', False),  # no numeric code: not an error envelope
        (200, b"not json", False),
        (401, b'{"code": 401, "message": "token expired"}', False),
    ],
)
def test_conversation_missing(status: int, body: bytes, missing: bool) -> None:
    """An error envelope saying "not found" (English or Chinese) or an HTTP 404 means the
    continued conversation does not exist; other errors and successes do not."""
    assert conversation_missing(status, body) is missing


@given(st.integers(100, 599), st.binary(max_size=80))
def test_conversation_missing_never_raises(status: int, body: bytes) -> None:
    """Any status and body give a bool, never an exception."""
    assert isinstance(conversation_missing(status, body), bool)
