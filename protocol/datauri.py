"""Data URLs (RFC 2397) as clients put them in chat messages.

``data:[<mime>][;param=value]*[;base64],<data>``. Clients send images and
documents this way (``data:image/png;base64,iVBOR...``). The decoded size is
checked against a limit *before* decoding, from the length of the encoded
text, so a hostile URL cannot make us allocate more than the limit.

What travels with a file ends up in upstream headers: its media type in a
``Content-Type`` (StepChat's upload) or a multipart part header (ChatGLM's),
its name in a ``Content-Disposition`` or a query string. A CR LF there would
split the header (h11 refuses to send it: a 502 or 500 instead of the
client's 400). So a data URL's media type must be an RFC 9110 ``type/subtype``
(tokens only, hence no control character or space), and a file name may
hold no control character. :func:`check_file_url` applies both to what a
client sent, at the edge (``protocol.openai`` names the field at fault);
:func:`upload_media_type` and :func:`check_file_name` guard what a provider
is about to send, whatever fetched it (a redirect names a file too).
"""

from __future__ import annotations

import binascii
import mimetypes
import re
import urllib.parse
import uuid
from dataclasses import dataclass

from protocol.errors import RequestError

DEFAULT_MIME = "application/octet-stream"

#: RFC 9110 5.6.2: ``token = 1*tchar``; 8.3.1: ``media-type = type "/" subtype``
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE_RE = re.compile(f"{_TCHARS}/{_TCHARS}")
#: C0 controls and DEL: none may go into a header (RFC 9110 5.5) or a file name
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class DataURL:
    """A decoded data URL."""

    mime: str
    data: bytes

    def filename(self) -> str:
        """A fresh file name with the extension of the MIME type."""
        ext = mimetypes.guess_extension(self.mime, strict=False) or ".bin"
        return f"{uuid.uuid4().hex}{ext}"


def is_data_url(url: str) -> bool:
    """True for ``data:`` URLs (case-insensitive scheme)."""
    return url[:5].lower() == "data:"


def is_media_type(value: str) -> bool:
    """True for a bare RFC 9110 ``type/subtype`` (no parameters, no spaces, no controls)."""
    return _MEDIA_TYPE_RE.fullmatch(value) is not None


def has_control_characters(value: str) -> bool:
    """True if ``value`` holds a C0 control character or DEL (CR and LF among them)."""
    return _CONTROL_RE.search(value) is not None


def _split_head(url: str) -> tuple[str, bool, str]:
    """``(media type, is base64, payload)`` of a data URL; the media type checked.

    Raises:
        RequestError: not a data URL, no comma, or a media type that is not a
            ``type/subtype`` token pair (code ``invalid_file_url``).
    """
    if not is_data_url(url):
        raise RequestError("not a data: URL", code="invalid_file_url")
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise RequestError("data URL has no ',' before its data", code="invalid_file_url")
    if has_control_characters(head):
        raise RequestError(
            "data URL media type or parameters hold control characters",
            code="invalid_file_url",
        )
    params = [p.strip() for p in head.split(";")]
    is_b64 = bool(params) and params[-1].lower() == "base64"
    if is_b64:
        params.pop()
    mime = params[0].lower() if params else ""
    if "/" not in mime:  # RFC 2397: omitted, it defaults (to octet-stream here); a bare
        return DEFAULT_MIME, is_b64, payload  # word is dropped the same way (never sent)
    if not is_media_type(mime):
        raise RequestError(
            "data URL media type must be type/subtype (RFC 2397, RFC 9110 tokens)",
            code="invalid_file_url",
        )
    return mime, is_b64, payload


def check_file_url(url: str) -> None:
    """Check what a file URL will put into upstream headers, without fetching or decoding it.

    A data URL's media type must be ``type/subtype``; an http(s) URL's file
    name (its last path segment, URL-decoded, as the fetcher names files)
    may hold no control character. Anything else about the URL (its scheme,
    address, size) is the fetcher's to judge.

    Raises:
        RequestError: (code ``invalid_file_url``) one of those does not hold.
    """
    if is_data_url(url):
        _split_head(url)
        return
    segment = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
    check_file_name(urllib.parse.unquote(segment))


def check_file_name(name: str) -> str:
    """``name``, if it holds no control character (it goes into an upstream header).

    Raises:
        RequestError: (code ``invalid_file_name``) it holds one.
    """
    if has_control_characters(name):
        raise RequestError("file name holds control characters", code="invalid_file_name")
    return name


def upload_media_type(mime: str) -> str:
    """``mime`` if it can be an upload's Content-Type, else :data:`DEFAULT_MIME`.

    For media types a remote server named (a file URL's ``Content-Type``),
    which the client cannot fix: an odd one is not worth a failed request.
    """
    return mime if is_media_type(mime) else DEFAULT_MIME


def parse_data_url(url: str, max_bytes: int) -> DataURL:
    """Decode a data URL.

    Args:
        url: the whole ``data:`` URL.
        max_bytes: the largest decoded size accepted.

    Raises:
        RequestError: not a data URL, no comma, a media type that is not
            ``type/subtype``, bad base64, or over ``max_bytes`` (code
            ``file_too_large``).
    """
    mime, is_b64, payload = _split_head(url)
    if is_b64:
        # WHATWG Fetch, "data: URL processor": percent-decode, then forgiving-base64
        # (whitespace dropped, padding optional, any other non-base64 character an
        # error). Non-strict binascii silently dropped such characters and stopped at
        # the first padding, handing on a corrupt or truncated file.
        payload = "".join(urllib.parse.unquote(payload).split())
        if len(payload) // 4 * 3 > max_bytes + 3:
            raise RequestError(
                f"file in data URL is over the {max_bytes}-byte limit", code="file_too_large"
            )
        payload += "=" * (-len(payload) % 4)
        try:
            data = binascii.a2b_base64(payload.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise RequestError("data URL is not valid base64", code="invalid_file_url") from exc
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise RequestError(
            f"file in data URL is over the {max_bytes}-byte limit", code="file_too_large"
        )
    return DataURL(mime, data)
