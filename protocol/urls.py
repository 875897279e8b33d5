"""URLs clients name for files, and the addresses they lead to: which are public.

``relay.fetcher`` downloads the files a chat message names by http(s) URL;
these are the pure parts of that, tested without a socket:

- :func:`is_public_address` decides whether an address may be fetched: a
  globally routable unicast IP, and for an IPv6 address that stands for IPv4
  ones (:func:`embedded_ipv4`: mapped, translated, compatible, NAT64, 6to4,
  Teredo), every one of those; everything else (loopback, private,
  link-local, multicast, reserved, junk) is refused by the fetcher's guard;
- :func:`ip_literal`: a host that is an IP literal;
- :func:`origin_of`: the (scheme, host, port) the fetcher compares with the
  origins it trusts;
- :func:`filename_from_url`: the name a fetched file gets.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

DEFAULT_PORTS = {"http": 80, "https": 443}

#: An origin as the fetcher compares them: scheme, host (lower case, no brackets), port.
Origin = tuple[str, str, int]

#: RFC 6052 well-known NAT64 prefix: the IPv4 address is the last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: RFC 8215 local-use NAT64 prefixes: any RFC 6052 prefix length from /48 to /96.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
#: RFC 4291 2.5.5.1 IPv4-compatible (deprecated) and RFC 2765 IPv4-translated addresses.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")


def _bits(value: int, start: int, length: int) -> int:
    """``length`` bits of a 128-bit ``value`` from bit ``start`` (0 is the most significant)."""
    return (value >> (128 - start - length)) & ((1 << length) - 1)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for; empty when it embeds none.

    Traffic to these forms goes to (or through) the IPv4 address: IPv4-mapped
    ``::ffff:a.b.c.d``, IPv4-translated ``::ffff:0:a.b.c.d``, IPv4-compatible
    ``::a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``, 6to4 ``2002:AABB:CCDD::/48``,
    and Teredo ``2001::/32`` (its server and its client, both). For the
    local-use NAT64 prefix (RFC 8215) the prefix length is the operator's,
    so every RFC 6052 position (/48, /56, /64, /96) is a candidate.
    """
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    value = int(ip)
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE or ip in _IPV4_TRANSLATED:
        return [ipaddress.IPv4Address(value & 0xFFFFFFFF)]
    if ip in _NAT64_LOCAL:  # RFC 6052 2.2: bits 64-71 (the "u" octet) are skipped
        return [
            ipaddress.IPv4Address(candidate)
            for candidate in (
                _bits(value, 48, 16) << 16 | _bits(value, 72, 16),
                _bits(value, 56, 8) << 24 | _bits(value, 72, 24),
                _bits(value, 72, 32),
                _bits(value, 96, 32),
            )
        ]
    return []


def is_public_address(address: str) -> bool:
    """True when ``address`` is a globally routable unicast IP.

    An IPv6 address that embeds IPv4 addresses (:func:`embedded_ipv4`) is
    judged by them alone: public only if every one of them is.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner:
            return all(v4.is_global and not v4.is_multicast for v4 in inner)
    return ip.is_global and not ip.is_multicast


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address when it is an IP literal (no brackets), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def origin_of(url: str) -> Origin:
    """The (scheme, host, port) of an http(s) ``url``, as the fetcher compares them.

    Raises:
        ValueError: not an http(s) URL with a host and a valid port.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in DEFAULT_PORTS or not host:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return scheme, host, parts.port or DEFAULT_PORTS[scheme]


def filename_from_url(url: str) -> str:
    """The last path segment without the query string, URL-decoded."""
    path = urllib.parse.urlsplit(url).path
    name = urllib.parse.unquote(path.rsplit("/", 1)[-1])
    return name or "file"
