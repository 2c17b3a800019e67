"""
The PROXY protocol's header as read and written (persistproxy/net/proxyproto.py): what
Twisted's parsers accept and a proxy must not (addresses that are not addresses, lines past
107 bytes, TLVs that overrun), every malformed header refused with its reason, v2's LOCAL and
address-less families, and headers written then read back.
"""

from __future__ import annotations

import struct

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.protocols.haproxy._v1parser import V1Parser

from persistproxy.net.proxyproto import (
    MAX_V1_SIZE,
    MAX_V2_SIZE,
    V2_SIGNATURE,
    HeaderParser,
    InvalidHeader,
    ProxyHeader,
    crc32c,
    encode,
)

V4 = (IPv4Address("TCP", "192.0.2.1", 51000), IPv4Address("TCP", "198.51.100.2", 443))
V6 = (IPv6Address("TCP", "2001:db8::1", 51000), IPv6Address("TCP", "2001:db8::2", 443))


def parse(data: bytes) -> tuple[ProxyHeader, bytes]:
    found = HeaderParser().feed(data)
    assert found is not None, "incomplete"
    return found


def refused(data: bytes) -> str:
    with pytest.raises(InvalidHeader) as caught:
        parse(data)
    return str(caught.value)


def v2(command: int, family: int, block: bytes, version: int = 2) -> bytes:
    return (
        V2_SIGNATURE
        + bytes([(version << 4) | command, family])
        + struct.pack("!H", len(block))
        + block
    )


def inet_block(src: str = "192.0.2.1", dst: str = "198.51.100.2") -> bytes:
    import ipaddress

    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", 51000, 443)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# -- written and read back ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("pair", [V4, V6], ids=["ipv4", "ipv6"])
def test_a_written_header_reads_back_byte_by_byte(
    version: str, pair: tuple[IPv4Address, IPv4Address]
) -> None:
    header = encode(version, *pair)
    parser = HeaderParser()
    for i in range(len(header) - 1):
        assert parser.feed(header[i : i + 1]) is None
        assert parser.buffered == i + 1
    found = parser.feed(header[-1:] + b"GET / HTTP/1.1\r\n")
    assert found is not None
    parsed, rest = found
    assert (parsed.source, parsed.destination) == pair
    assert (parsed.version, parsed.size) == (int(version[1]), len(header))
    assert rest == b"GET / HTTP/1.1\r\n"
    assert parser.buffered == 0


def test_the_v1_text_is_the_specs() -> None:
    assert encode("v1", *V4) == b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n"
    assert encode("v1", *V6) == b"PROXY TCP6 2001:db8::1 2001:db8::2 51000 443\r\n"


def test_the_v2_bytes_are_the_specs() -> None:
    assert encode("v2", *V4) == v2(1, 0x11, inet_block())


def test_mixed_families_are_written_as_ipv6_with_the_ipv4_address_mapped() -> None:
    mixed = (V4[0], V6[1])
    assert encode("v1", *mixed) == b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 51000 443\r\n"
    parsed, _ = parse(encode("v2", *mixed))
    assert parsed.source == IPv6Address("TCP", "::ffff:192.0.2.1", 51000)


def test_without_two_ip_addresses_the_header_says_unknown() -> None:
    from twisted.internet.address import UNIXAddress

    assert encode("v1", UNIXAddress(b"/run/s"), V4[1]) == b"PROXY UNKNOWN\r\n"
    assert encode("v2", None, None) == V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert parse(encode("v2", None, None))[0].source is None


def test_an_ipv6_scope_is_not_written() -> None:
    scoped = IPv6Address("TCP", "fe80::1%eth0", 1)
    assert encode("v1", scoped, scoped) == b"PROXY TCP6 fe80::1 fe80::1 1 1\r\n"


def test_crc32c_is_castagnolis() -> None:
    assert crc32c(b"123456789") == 0xE3069283


# -- v1 ------------------------------------------------------------------------------------------


def test_v1_addresses_are_made_canonical() -> None:
    parsed, _ = parse(b"PROXY TCP6 2001:DB8:0:0::1 ::FFFF:192.0.2.9 1 2\r\n")
    assert parsed.source is not None and parsed.destination is not None
    assert (parsed.source.host, parsed.destination.host) == ("2001:db8::1", "::ffff:192.0.2.9")


def test_v1_unknown_carries_no_address_and_whatever_follows_it_is_ignored() -> None:
    parsed, rest = parse(b"PROXY UNKNOWN ff:ff:: whatever 1 2\r\nGET")
    assert (parsed.kind, parsed.source, parsed.destination, rest) == ("UNKNOWN", None, None, b"GET")


def test_twisteds_v1_parser_alone_takes_any_bytes_for_a_host() -> None:
    """Why the addresses are checked here: this host would become a header of its own in
    the upstream request's X-Forwarded-For."""
    line = b"PROXY TCP4 1.2.3.4\rX-Admin:1 5.6.7.8 1 2"
    info = V1Parser.parse(line)
    assert info.source is not None and "\r" in info.source.host  # type: ignore[attr-defined]
    assert "not printable" in refused(line + b"\r\n")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
        (b"PROXX TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol 'TCP5'"),
        (b"PROXY\r\n", "not a PROXY protocol header"),
        (b"PROXY \r\n", "unknown protocol ''"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "7 fields"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "7 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "no CRLF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 http 2\r\n", "source port 'http'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "source port '-1'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "source port '+1'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "destination port '65536'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 000001\r\n", "destination port '000001'"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "source '::1' is not an IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "source '1.2.3.4' is not an IPv6 address"),
        (b"PROXY TCP4 1.2.3.4 example.com 1 2\r\n", "destination 'example.com' is not"),
        (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "source '1.2.3.400'"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "source '01.2.3.4'"),
        (b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n", "not printable"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n", "not printable"),
    ],
)
def test_a_malformed_v1_header_is_refused_with_its_reason(header: bytes, reason: str) -> None:
    if header.endswith(b"2\n"):  # no CRLF: refused once 107 bytes came without one
        header += b"x" * MAX_V1_SIZE
    assert reason in refused(header)


def test_a_v1_line_is_at_most_107_bytes() -> None:
    six = "ffff:" * 7 + "ffff"
    longest = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(longest) == MAX_V1_SIZE
    assert parse(longest)[0].kind == "UNKNOWN"
    # One byte more: refused, even with its CRLF in the same read (Twisted's parser would
    # take it).
    assert "no CRLF within 107 bytes" in refused(longest.replace(b" ", b"  ", 1))
    parser = HeaderParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"x" * 92) is None  # 106 bytes: may still end
    with pytest.raises(InvalidHeader, match="no CRLF within 107"):
        parser.feed(b"x")


def test_a_truncated_header_waits_and_holds_only_what_came() -> None:
    parser = HeaderParser()
    assert parser.feed(b"PROXY TCP4 192.0.2.1 198.51") is None
    assert parser.buffered == 27
    assert parser.feed(b"") is None


# -- v2 ------------------------------------------------------------------------------------------


def test_v2_local_is_a_health_check_with_no_address() -> None:
    parsed, rest = parse(v2(0, 0x00, b"") + b"rest")
    assert (parsed.kind, parsed.source, parsed.destination, rest) == ("LOCAL", None, None, b"rest")
    # A LOCAL header may carry the sender's addresses (and any family): ignored.
    parsed, _ = parse(v2(0, 0x11, inet_block()))
    assert (parsed.kind, parsed.source) == ("LOCAL", None)
    assert parse(v2(0, 0x77, b"junk"))[0].kind == "LOCAL"


@pytest.mark.parametrize(
    ("family", "block", "kind"),
    [
        (0x00, b"", "UNSPEC UNSPEC"),
        (0x10, inet_block(), "INET UNSPEC"),
        (0x12, inet_block(), "INET DGRAM"),
        (0x31, b"/run/client".ljust(108, b"\0") + b"/run/haproxy".ljust(108, b"\0"), "UNIX STREAM"),
    ],
)
def test_v2_families_without_a_usable_address_keep_the_connections_own(
    family: int, block: bytes, kind: str
) -> None:
    parsed, _ = parse(v2(1, family, block))
    assert (parsed.kind, parsed.source, parsed.destination) == (kind, None, None)


def test_v2_tlvs_are_skipped_when_they_tile_the_header() -> None:
    block = inet_block() + tlv(0x04, b"\0" * 5) + tlv(0x01, b"h2") + tlv(0x30, b"")
    parsed, rest = parse(v2(1, 0x11, block) + b"x")
    assert parsed.source == V4[0] and rest == b"x"


def test_a_v2_crc32c_tlv_is_checked() -> None:
    zeroed = v2(1, 0x11, inet_block() + tlv(0x03, b"\0\0\0\0"))
    good = zeroed[:-4] + struct.pack("!I", crc32c(zeroed))
    assert parse(good)[0].source == V4[0]
    bad = zeroed[:-4] + struct.pack("!I", crc32c(zeroed) ^ 1)
    assert refused(bad) == "v2 header: CRC32C mismatch"
    assert "CRC32C TLV of 3 bytes" in refused(v2(1, 0x11, inet_block() + tlv(0x03, b"\0\0\0")))


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + inet_block(), "not a PROXY protocol header"),
        (b"\r\n\r\n\x01", "not a PROXY protocol header"),
        (v2(1, 0x11, inet_block(), version=1), "version 1, not 2"),
        (v2(1, 0x11, inet_block(), version=3), "version 3, not 2"),
        (v2(2, 0x11, inet_block()), "unknown command 2"),
        (v2(1, 0x41, inet_block()), "unknown address family and protocol 0x41"),
        (v2(1, 0x13, inet_block()), "unknown address family and protocol 0x13"),
        (v2(1, 0x11, inet_block()[:11]), "11 bytes after the fixed part, the address block"),
        (v2(1, 0x11, inet_block()[:11]), "of INET needs 12"),
        (v2(1, 0x21, inet_block()), "the address block of INET6 needs 36"),
        (v2(1, 0x11, inet_block() + b"\x04\x00"), "a truncated TLV at byte 28"),
        (v2(1, 0x11, inet_block() + tlv(0x04, b"ab")[:-1]), "overruns"),
        (v2(1, 0x11, inet_block() + b"\x04\xff\xff"), "TLV 0x04 of 65535 bytes at byte 28"),
    ],
)
def test_a_malformed_v2_header_is_refused_with_its_reason(header: bytes, reason: str) -> None:
    assert reason in refused(header)


def test_a_v2_length_past_the_bound_is_refused_before_its_bytes_come() -> None:
    parser = HeaderParser()
    assert parser.feed(V2_SIGNATURE + b"\x21\x11") is None
    with pytest.raises(InvalidHeader, match=f"over the limit of {MAX_V2_SIZE}"):
        parser.feed(struct.pack("!H", MAX_V2_SIZE - 15))
    largest = v2(1, 0x11, inet_block() + tlv(0x04, b"\0" * (MAX_V2_SIZE - 16 - 12 - 3)))
    assert len(largest) == MAX_V2_SIZE and parse(largest)[0].source == V4[0]


def test_a_v2_header_may_come_in_pieces_smaller_than_its_fixed_part() -> None:
    """Twisted's own wrapper closes a connection whose first read is under 16 bytes."""
    header = v2(1, 0x11, inet_block())
    parser = HeaderParser()
    assert parser.feed(header[:5]) is None
    assert parser.feed(header[5:15]) is None
    found = parser.feed(header[15:])
    assert found is not None and found[0].source == V4[0]
