"""Data URLs (RFC 2397) as clients put them in chat messages.

``data:[<mime>][;param=value]*[;base64],<data>``. Clients send images and
documents this way (``data:image/png;base64,iVBOR...``). The decoded size is
checked against a limit *before* decoding, from the length of the encoded
text, so a hostile URL cannot make us allocate more than the limit.
"""

from __future__ import annotations

import binascii
import mimetypes
import urllib.parse
import uuid
from dataclasses import dataclass

from protocol.errors import RequestError

DEFAULT_MIME = "application/octet-stream"


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


def parse_data_url(url: str, max_bytes: int) -> DataURL:
    """Decode a data URL.

    Args:
        url: the whole ``data:`` URL.
        max_bytes: the largest decoded size accepted.

    Raises:
        RequestError: not a data URL, no comma, bad base64, or over ``max_bytes``
            (code ``file_too_large``).
    """
    if not is_data_url(url):
        raise RequestError("not a data: URL", code="invalid_file_url")
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise RequestError("data URL has no ',' before its data", code="invalid_file_url")
    params = [p.strip() for p in head.split(";")]
    is_b64 = bool(params) and params[-1].lower() == "base64"
    if is_b64:
        params.pop()
    mime = params[0].lower() if params and "/" in params[0] else DEFAULT_MIME
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
