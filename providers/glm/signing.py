"""ChatGLM request signing: X-Timestamp, X-Nonce, X-Sign (PROTOCOLS.md 3.4).

1. ``A`` = the time in milliseconds as a decimal string, ``n = len(A)``.
2. ``d`` = (sum of every digit of ``A`` except the one at ``n-2``) mod 10.
3. ``X-Timestamp`` = ``A`` with its digit at ``n-2`` replaced by ``d``.
4. ``X-Nonce`` = a fresh UUID as 32 lowercase hex digits.
5. ``X-Sign`` = hex MD5 of ``"{X-Timestamp}-{X-Nonce}-{secret}"``.

Both sides live here: :func:`sign` for our client, :func:`verify` for the
emulator, so the two cannot drift apart silently (the test vectors of 3.4
pin them to the site's rule).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

#: PROTOCOLS.md 3.2: the reference's secret; configurable, the site changes it.
DEFAULT_SECRET = "8a1317a7468aa3ad86e997d08f3f31cb"  # noqa: S105 - public, from the web app


@dataclass(frozen=True, slots=True)
class Signature:
    """The three signing header values of one request."""

    timestamp: str
    nonce: str
    sign: str

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The signature as HTTP header pairs."""
        return [
            (b"X-Timestamp", self.timestamp.encode()),
            (b"X-Nonce", self.nonce.encode()),
            (b"X-Sign", self.sign.encode()),
        ]


def _check_digit(digits: str) -> int:
    """Sum of all digits except the second-to-last one, mod 10."""
    skip = len(digits) - 2
    return sum(int(c) for i, c in enumerate(digits) if i != skip) % 10


def signed_timestamp(epoch_ms: int) -> str:
    """Turn milliseconds since the epoch into the site's ``X-Timestamp``."""
    a = str(epoch_ms)
    n = len(a)
    return f"{a[: n - 2]}{_check_digit(a)}{a[n - 1]}"


def make_sign(timestamp: str, nonce: str, secret: str = DEFAULT_SECRET) -> str:
    """The ``X-Sign`` value for a timestamp and nonce."""
    return hashlib.md5(f"{timestamp}-{nonce}-{secret}".encode(), usedforsecurity=False).hexdigest()


def sign(epoch_ms: int, secret: str = DEFAULT_SECRET, nonce: str | None = None) -> Signature:
    """Sign one request made at ``epoch_ms`` (a fresh random nonce unless given)."""
    ts = signed_timestamp(epoch_ms)
    nonce = nonce if nonce is not None else uuid.uuid4().hex
    return Signature(ts, nonce, make_sign(ts, nonce, secret))


def verify(
    timestamp: str,
    nonce: str,
    signature: str,
    *,
    now_ms: int,
    secret: str = DEFAULT_SECRET,
    tolerance_ms: int = 300_000,
) -> bool:
    """What the site checks: the check digit, the clock, and the MD5."""
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) < 3:
        return False
    if int(timestamp[-2]) != _check_digit(timestamp):
        return False
    # the check digit replaced a real digit, so compare at 10 ms resolution
    if abs(int(timestamp) - now_ms) > tolerance_ms + 100:
        return False
    return make_sign(timestamp, nonce, secret) == signature
