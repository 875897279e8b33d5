"""Tests of protocol/datauri.py: parsing RFC 2397 data URLs as clients send them."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.datauri import (
    DEFAULT_MIME,
    DataURL,
    check_file_name,
    check_file_url,
    is_data_url,
    is_media_type,
    parse_data_url,
    upload_media_type,
)
from protocol.errors import RequestError

PROPERTY = settings(max_examples=200, deadline=None)
LIMIT = 1 << 20


# --- recognising and splitting ------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("data:,x", True),
        ("DATA:,x", True),
        ("Data:text/plain,x", True),
        ("http://example.com/a.png", False),
        ("dat:,x", False),
        ("", False),
        (" data:,x", False),
    ],
)
def test_is_data_url(url: str, expected: bool) -> None:
    """Only URLs whose scheme is ``data`` (any case) count as data URLs."""
    assert is_data_url(url) is expected


def test_base64_png() -> None:
    """The common form ``data:image/png;base64,...`` gives the MIME type and the bytes."""
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert parse_data_url(url, LIMIT) == DataURL("image/png", png)


def test_no_comma_is_refused() -> None:
    """A data URL without the ',' before its data is a RequestError (invalid_file_url)."""
    with pytest.raises(RequestError) as info:
        parse_data_url("data:image/png;base64", LIMIT)
    assert info.value.code == "invalid_file_url"
    assert info.value.status == 400


def test_not_a_data_url_is_refused() -> None:
    """parse_data_url refuses URLs of other schemes."""
    with pytest.raises(RequestError) as info:
        parse_data_url("http://example.com/,x", LIMIT)
    assert info.value.code == "invalid_file_url"


def test_parameters_between_mime_and_base64_are_skipped() -> None:
    """Parameters such as ``charset`` or ``name`` do not disturb the MIME type or the
    base64 flag, which must be the last parameter."""
    url = "data:text/plain;charset=utf-8;name=a.txt;base64," + base64.b64encode(b"hi").decode()
    assert parse_data_url(url, LIMIT) == DataURL("text/plain", b"hi")


def test_uppercase_scheme_mime_and_base64_flag() -> None:
    """Scheme, MIME type and the base64 flag are case-insensitive; the MIME is lowered."""
    url = "DATA:Image/PNG;BASE64," + base64.b64encode(b"abc").decode()
    assert parse_data_url(url, LIMIT) == DataURL("image/png", b"abc")


def test_spaces_around_parameters_are_tolerated() -> None:
    """Blanks around the header's parts are ignored."""
    url = "data: image/jpeg ; base64 ," + base64.b64encode(b"jpg").decode()
    assert parse_data_url(url, LIMIT) == DataURL("image/jpeg", b"jpg")


def test_missing_mime_defaults() -> None:
    """Without a MIME type (or with one lacking '/'), the default MIME type is used."""
    assert parse_data_url("data:;base64,aGk=", LIMIT) == DataURL(DEFAULT_MIME, b"hi")
    assert parse_data_url("data:,hi", LIMIT) == DataURL(DEFAULT_MIME, b"hi")
    assert parse_data_url("data:image;base64,aGk=", LIMIT).mime == DEFAULT_MIME


def test_whitespace_inside_base64_is_ignored() -> None:
    """Base64 wrapped over lines (newlines, spaces, tabs) decodes as if unwrapped."""
    blob = bytes(range(256)) * 3
    text = base64.encodebytes(blob).decode()  # 76-character lines
    assert "\n" in text
    url = "data:application/pdf;base64," + text.replace("\n", "\r\n ", 3)
    assert parse_data_url(url, LIMIT) == DataURL("application/pdf", blob)


def test_percent_encoded_base64_is_decoded() -> None:
    """RFC 2397 data is URL-encoded, base64 included: %2B, %2F and %3D stand for + / =.
    They are decoded before the base64, not dropped as noise (which corrupted the file)."""
    blob = b"\xfb\xef\xff\xfe" * 3  # base64 with '+' and '/'
    text = base64.b64encode(blob + b"x").decode()
    assert set("+/=") <= set(text)
    url = "data:application/octet-stream;base64," + urllib.parse.quote(text, safe="")
    assert all(escape in url for escape in ("%2B", "%2F", "%3D"))
    assert parse_data_url(url, LIMIT).data == blob + b"x"


def test_missing_base64_padding_is_tolerated() -> None:
    """Base64 without its trailing '=' padding decodes (WHATWG forgiving-base64)."""
    assert parse_data_url("data:text/plain;base64,aGk", LIMIT).data == b"hi"
    assert parse_data_url("data:text/plain;base64,aGVsbG8", LIMIT).data == b"hello"


@pytest.mark.parametrize(
    "payload",
    [
        "abcde",  # one character past a multiple of four cannot be base64
        "@@@@",  # no base64 characters at all: used to decode silently to b""
        "aGk=!!!!",  # trailing junk
        "aGk=aGk=",  # data after the padding: used to be silently cut at the padding
        "aGVs-bG8_",  # base64url alphabet
        "aGk=\u00e9",  # non-ASCII
        "a%ZZbc",  # a broken percent escape leaves '%', which is not base64
    ],
)
def test_bad_base64_is_refused(payload: str) -> None:
    """Anything that is not base64 (after dropping whitespace) is a RequestError, never a
    silently truncated or emptied file."""
    with pytest.raises(RequestError) as info:
        parse_data_url("data:image/png;base64," + payload, LIMIT)
    assert info.value.code == "invalid_file_url"


def test_percent_encoded_data_without_base64() -> None:
    """Without ``;base64`` the data is percent-decoded, bytes above 0x7F included."""
    url = "data:text/plain;charset=utf-8,hello%20w%C3%B6rld%21%FF"
    expected = "hello w\u00f6rld!".encode() + b"\xff"
    assert parse_data_url(url, LIMIT) == DataURL("text/plain", expected)


def test_empty_data() -> None:
    """An empty payload gives an empty file, base64 or not."""
    assert parse_data_url("data:text/plain;base64,", LIMIT) == DataURL("text/plain", b"")
    assert parse_data_url("data:text/plain,", LIMIT) == DataURL("text/plain", b"")
    assert parse_data_url("data:,", LIMIT) == DataURL(DEFAULT_MIME, b"")


def test_a_second_comma_belongs_to_the_data() -> None:
    """Only the first ',' ends the header; later ones are data."""
    assert parse_data_url("data:text/csv,a,b,c", LIMIT) == DataURL("text/csv", b"a,b,c")


# --- the size limit -------------------------------------------------------------


def test_base64_over_the_limit_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base64 payload whose encoded length already exceeds the limit is refused with
    code file_too_large without being decoded."""

    def must_not_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded a payload that is over the limit")

    monkeypatch.setattr(binascii, "a2b_base64", must_not_decode)
    url = "data:image/png;base64," + "A" * 4000  # 3000 bytes decoded
    with pytest.raises(RequestError) as info:
        parse_data_url(url, 1000)
    assert info.value.code == "file_too_large"
    assert info.value.status == 400


@pytest.mark.parametrize("size", [0, 1, 99, 100])
def test_base64_at_or_under_the_limit_is_accepted(size: int) -> None:
    """Decoded sizes up to the limit itself are accepted."""
    url = "data:image/png;base64," + base64.b64encode(b"z" * size).decode()
    assert len(parse_data_url(url, 100).data) == size


@pytest.mark.parametrize("size", [101, 102, 103, 150])
def test_base64_just_over_the_limit_is_refused(size: int) -> None:
    """A decoded size even one byte over the limit is refused (the early estimate lets
    a few bytes through; the exact check after decoding catches them)."""
    url = "data:image/png;base64," + base64.b64encode(b"z" * size).decode()
    with pytest.raises(RequestError) as info:
        parse_data_url(url, 100)
    assert info.value.code == "file_too_large"


def test_percent_encoded_over_the_limit_is_refused() -> None:
    """The limit applies to percent-encoded data too."""
    with pytest.raises(RequestError) as info:
        parse_data_url("data:text/plain," + "%41" * 101, 100)
    assert info.value.code == "file_too_large"
    assert parse_data_url("data:text/plain," + "%41" * 100, 100).data == b"A" * 100


# --- file names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mime", "extension"),
    [
        ("image/png", ".png"),
        ("image/jpeg", ".jpg"),
        ("application/pdf", ".pdf"),
        ("text/plain", ".txt"),
        ("application/x-made-up", ".bin"),
    ],
)
def test_filename_has_the_extension_of_the_mime(mime: str, extension: str) -> None:
    """A data URL's file name is a fresh hex name with the MIME type's extension."""
    name = DataURL(mime, b"").filename()
    assert re.fullmatch(r"[0-9a-f]{32}" + re.escape(extension), name)
    assert DataURL(mime, b"").filename() != name


# --- round trip --------------------------------------------------------------------


@PROPERTY
@given(
    data=st.binary(max_size=600),
    mime=st.sampled_from(["image/png", "application/pdf", "text/plain", "audio/mpeg"]),
    wrap=st.integers(min_value=0, max_value=80),
    upper=st.booleans(),
)
@example(data=b"", mime="image/png", wrap=0, upper=False)
@example(data=b"\xfb\xff", mime="image/png", wrap=1, upper=True)
def test_round_trip(data: bytes, mime: str, wrap: int, upper: bool) -> None:
    """Any bytes, base64-encoded into a data URL (optionally line-wrapped every ``wrap``
    characters, scheme and flag in upper case), parse back to the same bytes and MIME."""
    text = base64.b64encode(data).decode()
    if wrap:
        text = "\n".join(text[i : i + wrap] for i in range(0, len(text), wrap))
    head = "DATA:" if upper else "data:"
    flag = ";BASE64," if upper else ";base64,"
    parsed = parse_data_url(head + mime + flag + text, len(data))
    assert parsed == DataURL(mime, data)


@PROPERTY
@given(data=st.binary(max_size=300))
def test_percent_encoded_round_trip(data: bytes) -> None:
    """Any bytes, percent-encoded into a data URL without base64, parse back unchanged."""
    url = "data:application/octet-stream," + urllib.parse.quote_from_bytes(data, safe="")
    assert parse_data_url(url, len(data)).data == data


@PROPERTY
@given(st.text(max_size=100))
def test_any_text_parses_or_raises_request_error(tail: str) -> None:
    """Whatever follows ``data:``, the parser returns a DataURL or raises RequestError,
    never anything else."""
    try:
        parsed = parse_data_url("data:" + tail, 64)
    except RequestError:
        return
    assert len(parsed.data) <= 64


# --- what goes on into upstream headers -----------------------------------------------

#: the characters of RFC 9110 tokens
TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CONTROLS = [chr(c) for c in (*range(0x20), 0x7F)]


@pytest.mark.parametrize(
    "head",
    ["a/b\r\nX: 1", "image/png\n", "image/p ng", "image/png\x00", "image/", "/png",
     "im(age)/png", "image/png/x", "text/plain;charset=\r\nX", "\x7f/x"],
)
def test_media_type_that_would_break_a_header_is_refused(head: str) -> None:
    """A media type that is not ``type/subtype`` of RFC 9110 tokens (CR LF, a space, a NUL,
    an empty side, a separator), or a control character anywhere before the comma, is a
    RequestError (code invalid_file_url), from the parser and from the edge check alike."""
    url = f"data:{head};base64,aGVsbG8="
    for parse in (lambda: parse_data_url(url, LIMIT), lambda: check_file_url(url)):
        with pytest.raises(RequestError) as info:
            parse()
        assert (info.value.status, info.value.code) == (400, "invalid_file_url")


@PROPERTY
@given(st.text(max_size=40))
@example("a/b\r\nX: 1")
@example("text/plain\t")
def test_a_parsed_media_type_is_always_a_token_pair(head: str) -> None:
    """Whatever the header of a data URL, what the parser returns as its media type is
    a ``type/subtype`` of token characters (or the default), never a control character."""
    try:
        parsed = parse_data_url(f"data:{head},x", LIMIT)
    except RequestError:
        return
    assert is_media_type(parsed.mime)
    assert re.fullmatch(r"[^\x00-\x20\x7f]+", parsed.mime)


@given(st.text(TCHARS, min_size=1, max_size=10), st.text(TCHARS, min_size=1, max_size=10))
def test_every_token_pair_is_a_media_type(kind: str, subtype: str) -> None:
    """Any two RFC 9110 tokens make a media type the parser keeps (lowered)."""
    assert is_media_type(f"{kind}/{subtype}")
    assert parse_data_url(f"data:{kind}/{subtype},x", LIMIT).mime == f"{kind}/{subtype}".lower()


@pytest.mark.parametrize("control", CONTROLS)
def test_file_names_with_control_characters_are_refused(control: str) -> None:
    """Any C0 control or DEL in a file name, or URL-encoded in an http URL's last path
    segment, is a RequestError; the same name without it passes."""
    with pytest.raises(RequestError) as info:
        check_file_name(f"a{control}b.png")
    assert info.value.code == "invalid_file_name"
    encoded = urllib.parse.quote(control)
    with pytest.raises(RequestError):
        check_file_url(f"https://example.com/dir/a{encoded}b.png?x=1")
    assert check_file_name("naïve café.png") == "naïve café.png"
    check_file_url(f"https://example.com/a{encoded}b/ok.png")  # not the last segment


def test_upload_media_type_falls_back_for_odd_server_types() -> None:
    """A media type a file server named is kept when it is a token pair, else replaced
    by the default (the client cannot fix it: no reason to fail the request)."""
    assert upload_media_type("image/png") == "image/png"
    for odd in ("text/plain\tx", "", "text", "a b/c"):
        assert upload_media_type(odd) == DEFAULT_MIME
