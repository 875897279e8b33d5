"""Tests of protocol/urls.py: which addresses are public, origins, file names."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.urls import (
    embedded_ipv4,
    filename_from_url,
    ip_literal,
    is_public_address,
    origin_of,
)

# --- which addresses are public ------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("127.255.0.9", False),
        ("::1", False),
        ("0.0.0.0", False),  # noqa: S104 - an address to refuse, not to bind
        ("::", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # link-local: cloud metadata
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("224.0.0.1", False),  # multicast
        ("239.255.255.250", False),
        ("ff02::1", False),
        ("ff0e::1", False),
        ("255.255.255.255", False),
        ("192.0.2.1", False),  # documentation
        ("2001:db8::1", False),
        ("240.0.0.1", False),  # reserved
        ("not an address", False),
        ("", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    """Only globally routable unicast addresses count as public; loopback, private,
    link-local, multicast, reserved, IPv4-mapped forms of them and junk do not."""
    assert is_public_address(address) is public


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://example.com/a/b/photo.png?x=1#frag", "photo.png"),
        ("https://example.com/a%20b.txt", "a b.txt"),
        ("https://example.com/", "file"),
        ("https://example.com", "file"),
        ("https://example.com/dir/?name=x.png", "file"),
    ],
)
def test_filename_from_url(url: str, name: str) -> None:
    """The file name is the URL-decoded last path segment, never the query; "file"
    when the path has none."""
    assert filename_from_url(url) == name


# --- addresses that embed an IPv4 address -------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::10.0.0.1", False),
        ("64:ff9b::8.8.8.8", True),
        ("64:ff9b:1::7f00:1", False),  # local-use NAT64, /96 position
        ("64:ff9b:1:7f00:0:100::", False),  # local-use NAT64, /48 position
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", False),
        ("2002:808:808::1", True),
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::169.254.169.254", False),
        ("::8.8.8.8", True),
        ("::ffff:0:127.0.0.1", False),  # IPv4-translated
        ("::ffff:0:8.8.8.8", True),
        # Teredo: server 65.54.227.120 (public), client 192.0.2.45 (documentation)
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
    ],
)
def test_embedded_ipv4_decides(address: str, public: bool) -> None:
    """An IPv6 address that carries an IPv4 address (NAT64, 6to4, IPv4-compatible or
    -translated, Teredo) is public only when the IPv4 addresses in it are."""
    assert is_public_address(address) is public


def teredo(server: ipaddress.IPv4Address, client: ipaddress.IPv4Address, port: int) -> str:
    """The Teredo address (RFC 4380 4) of ``client`` behind ``server``."""
    value = (0x20010000 << 96) | (int(server) << 64) | ((port ^ 0xFFFF) << 32)
    return str(ipaddress.IPv6Address(value | (int(client) ^ 0xFFFFFFFF)))


def embeddings(v4: ipaddress.IPv4Address, low: int) -> list[str]:
    """Every IPv6 form that stands for ``v4`` alone (``low``: free bits where there are any)."""
    n = int(v4)
    return [
        str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | n)),
        str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | (low & (1 << 80) - 1))),
        str(ipaddress.IPv6Address(n)),
        str(ipaddress.IPv6Address((0xFFFF << 32) | n)),
        str(ipaddress.IPv6Address((0xFFFF << 48) | n)),
    ]


ipv4s = st.one_of(
    st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
    st.sampled_from([ipaddress.IPv4Address(a) for a in (
        "127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.1", "100.64.0.1", "0.0.0.0",  # noqa: S104
        "8.8.8.8", "1.1.1.1", "224.0.0.1", "255.255.255.255",
    )]),
)


@given(v4=ipv4s, low=st.integers(0, 2**80 - 1))
def test_every_embedding_is_judged_as_its_ipv4(v4: ipaddress.IPv4Address, low: int) -> None:
    """NAT64, 6to4 (any subnet and interface bits), IPv4-compatible, -mapped and
    -translated forms of an IPv4 address are public exactly when it is."""
    if v4 == ipaddress.IPv4Address(0) or v4 == ipaddress.IPv4Address(1):
        return  # ::, ::1 are their own addresses (unspecified, loopback): never public
    for form in embeddings(v4, low):
        assert is_public_address(form) is is_public_address(str(v4)), form


@given(server=ipv4s, client=ipv4s, port=st.integers(0, 2**16 - 1))
def test_teredo_is_judged_by_server_and_client(
    server: ipaddress.IPv4Address, client: ipaddress.IPv4Address, port: int
) -> None:
    """A Teredo address is public only when both its server and its client IPv4 are."""
    expected = is_public_address(str(server)) and is_public_address(str(client))
    assert is_public_address(teredo(server, client, port)) is expected


def test_embedded_ipv4_names_every_local_nat64_position() -> None:
    """Under the local-use NAT64 prefix (RFC 8215) the prefix length is the operator's, so
    each RFC 6052 position (/48, /56, /64, /96) gives a candidate; other addresses none."""
    v4 = ipaddress.IPv4Address("10.20.30.40")
    n = int(v4)
    prefix = int(ipaddress.IPv6Address("64:ff9b:1::"))
    at_96 = ipaddress.IPv6Address(prefix | n)
    at_64 = ipaddress.IPv6Address(prefix | (n << 24))  # bits 72-103 (64-71 is the u octet)
    assert v4 in embedded_ipv4(at_96)
    assert v4 in embedded_ipv4(at_64)
    assert len(embedded_ipv4(at_96)) == 4
    assert embedded_ipv4(ipaddress.IPv6Address("2606:4700:4700::1111")) == []
    assert embedded_ipv4(ipaddress.IPv6Address("::ffff:1.2.3.4")) == [
        ipaddress.IPv4Address("1.2.3.4")
    ]


# --- hosts, origins and names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "literal"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("[::1]", None),  # hosts come without brackets (urlsplit's hostname)
        ("example.com", None),
        ("127.1", None),  # a name to resolve, not a literal
        ("", None),
    ],
)
def test_ip_literal(host: str, literal: str | None) -> None:
    """An IP literal is an address; anything else (a name, brackets, junk) is None."""
    found = ip_literal(host)
    assert (None if found is None else str(found)) == literal


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://Example.COM/a?b", ("http", "example.com", 80)),
        ("HTTPS://example.com:8443/", ("https", "example.com", 8443)),
        ("https://[::1]/x", ("https", "::1", 443)),
        ("http://127.0.0.1:9000", ("http", "127.0.0.1", 9000)),
    ],
)
def test_origin_of(url: str, origin: tuple[str, str, int]) -> None:
    """Scheme and host in lower case, brackets dropped, the scheme's default port filled in."""
    assert origin_of(url) == origin


@pytest.mark.parametrize("url", ["ftp://example.com/", "http:///path", "data:,x", "http://h:99999/"])
def test_origin_of_refuses_what_is_not_an_http_url(url: str) -> None:
    """Another scheme, no host or an invalid port is a ValueError."""
    with pytest.raises(ValueError):  # noqa: PT011 - the message names the URL, nothing to match
        origin_of(url)
