# -*- test-case-name: tests.unit.test_proxyproto -*-
"""
The PROXY protocol's header (HAProxy's spec, versions 1 and 2), read and written: the bytes a
load balancer puts in front of a connection to say whose connection it is.

Reading is sans-IO (L{HeaderParser}: bytes in, a L{ProxyHeader} or an L{InvalidHeader} out)
and builds on Twisted's parsers (C{twisted.protocols.haproxy}, the modules behind its
C{haproxy:} endpoint) for the fields of a complete header. Those are private modules, and on
their own they are not enough for a proxy that puts the carried address into
C{X-Forwarded-For}, access lines and per-client limits, so around them this module adds:

 - framing and bounds: which version the first bytes announce (a connection that starts with
   anything else is refused at its first byte), a v1 line within the 107 bytes the spec
   allows, a v2 header within L{MAX_V2_SIZE}; Twisted's v1 parser accepts a longer line when
   its CRLF arrives in the same read, and its v2 parser fails a header whose first read is
   under 16 bytes;
 - the addresses themselves: Twisted's v1 parser takes any bytes between two spaces as a
   host (C{"PROXY TCP4 a\\nX-Evil:1 ..."} gives the host C{"a\\nX-Evil:1"}, which would go
   into the upstream request's C{X-Forwarded-For} as a header of its own), any integer as a
   port (C{-1}, C{99999}) and lets C{ValueError} escape for a non-numeric one; here a host is
   an IP literal of the announced family and a port is 0-65535;
 - v2's TLVs, which Twisted ignores: they must tile the rest of the header exactly, and a
   CRC32C TLV must match (as HAProxy checks them);
 - v2 commands and families as HAProxy handles them: C{LOCAL} (a health check) and a C{PROXY}
   header for an unspecified family, C{AF_UNIX} or a datagram protocol carry no address to
   use, and the connection keeps its own (L{ProxyHeader.source} is L{None}).

Writing (L{encode}) is ours: Twisted has no encoder.

The start-up self-check (L{persistproxy.net.selfcheck}, C{"proxyproto"}) probes Twisted's
parsers on known headers; if they are gone or changed, a listener with C{proxy_protocol = true}
refuses to start with that finding, and nothing else is affected.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address

try:  # private modules: fenced by the self-check (see the module docstring)
    from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
    from twisted.protocols.haproxy._v1parser import V1Parser
    from twisted.protocols.haproxy._v2parser import V2Parser
except ImportError:  # pragma: no cover - only with a Twisted that moved them
    InvalidProxyHeader = V1Parser = V2Parser = None  # type: ignore[assignment, misc]

__all__ = [
    "MAX_V1_SIZE",
    "MAX_V2_SIZE",
    "V2_SIGNATURE",
    "HeaderParser",
    "InvalidHeader",
    "ProxyHeader",
    "crc32c",
    "encode",
]

IPAddress = IPv4Address | IPv6Address

#: A v1 header, CRLF included, is at most this long (the spec's worst case, TCP6).
MAX_V1_SIZE = 107
#: The largest v2 header accepted (16-byte fixed part, addresses and TLVs): HAProxy reads it
#: into one 16 KiB buffer; the length field alone would allow 64 KiB a connection.
MAX_V2_SIZE = 16384
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: Bytes of v2's address block by address family (the high nibble of byte 13).
_ADDRESS_SIZE = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
_FAMILY = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_TRANSPORT = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
_PP2_TYPE_CRC32C = 0x03
#: Anything but printable ASCII in a v1 line.
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")


class InvalidHeader(Exception):
    """The connection does not start with a valid PROXY protocol header; the message says why."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """
    A complete, valid header.

    @ivar version: 1 or 2.
    @ivar kind: what it announced, for logs: v1's protocol field (C{"TCP4"}, C{"TCP6"},
        C{"UNKNOWN"}), v2's C{"LOCAL"} or C{"<family> <transport>"} (C{"INET STREAM"}).
    @ivar source: the client's address, or L{None} when the header carries none to use
        (v1 C{UNKNOWN}, v2 C{LOCAL}, an unspecified family, C{AF_UNIX}, a datagram): the
        connection's own peer is then the client.
    @ivar destination: the address the client connected to, when C{source} is set.
    @ivar size: the header's length in bytes.
    """

    version: int
    kind: str
    source: IPAddress | None
    destination: IPAddress | None
    size: int


class HeaderParser:
    """
    Reads one header from the first bytes of a connection.

    Holds at most L{MAX_V2_SIZE} bytes: whatever the peer sends, L{feed} either waits for a
    header it can still complete within the bound or raises.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """
        Take the next bytes of the connection.

        @return: L{None} while the header is incomplete; then the header and the bytes that
            followed it (the first bytes of the protocol behind it).
        @raise InvalidHeader: the bytes so far cannot begin a valid header, or make an
            invalid one.
        """
        buffer = self._buffer + data if self._buffer else data
        if buffer[:1] == b"P":
            found = _v1(buffer)
        elif buffer[:1] == b"\r":
            found = _v2(buffer)
        elif not buffer:
            return None
        else:
            raise InvalidHeader("not a PROXY protocol header")
        if found is None:
            self._buffer = buffer
            return None
        self._buffer = b""
        return found

    @property
    def buffered(self) -> int:
        """Bytes held while the header is incomplete."""
        return len(self._buffer)


def _v1(buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
    head = buffer[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        raise InvalidHeader("not a PROXY protocol header")
    end = buffer.find(b"\r\n", 0, MAX_V1_SIZE)
    if end < 0:
        if len(buffer) >= MAX_V1_SIZE:
            raise InvalidHeader(f"v1 header: no CRLF within {MAX_V1_SIZE} bytes")
        return None
    line, rest = buffer[:end], buffer[end + 2 :]
    if _NOT_PRINTABLE.search(line):
        raise InvalidHeader("v1 header: a byte that is not printable ASCII")
    fields = line.split(b" ")
    if len(fields) < 2:
        raise InvalidHeader("v1 header: no protocol")
    if fields[1] == b"UNKNOWN":
        # The spec: the receiver ignores whatever follows UNKNOWN.
        return ProxyHeader(1, "UNKNOWN", None, None, end + 2), rest
    if fields[1] not in (b"TCP4", b"TCP6"):
        raise InvalidHeader(f"v1 header: unknown protocol {_shown(fields[1])}")
    if len(fields) != 6:
        raise InvalidHeader(f"v1 header: {len(fields)} fields separated by single spaces, not 6")
    v6 = fields[1] == b"TCP6"
    source = _ip_field(fields[2], fields[4], v6, "source")
    destination = _ip_field(fields[3], fields[5], v6, "destination")
    try:
        info: Any = V1Parser.parse(line)
    except (InvalidProxyHeader, ValueError) as e:
        raise InvalidHeader(f"v1 header: {type(e).__name__}") from None
    return (
        ProxyHeader(
            1,
            fields[1].decode(),
            _agreed(info.source, *source, "source"),
            _agreed(info.destination, *destination, "destination"),
            end + 2,
        ),
        rest,
    )


def _ip_field(host: bytes, port: bytes, v6: bool, which: str) -> tuple[str, int]:
    """
    One end's fields, checked before Twisted's parser sees them: an IP literal of the
    announced family, and a decimal port within 0-65535 (Twisted's C{int()} would take
    C{-1} and C{+1}, and raise C{ValueError} on C{http}).

    @return: the address in canonical text (see L{canonical_ip}) and the port.
    """
    text = canonical_ip(host.decode("ascii"), socket.AF_INET6 if v6 else socket.AF_INET)
    if text is None:
        family = "IPv6" if v6 else "IPv4"
        raise InvalidHeader(f"v1 header: {which} {_shown(host)} is not an {family} address")
    if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise InvalidHeader(f"v1 header: {which} port {_shown(port)} is not 0-65535")
    return text, int(port)


def canonical_ip(text: str, family: int) -> str | None:
    """
    An address of C{family} as logs, limits and C{X-Forwarded-For} show it, or L{None} if
    C{text} is not one: IPv4 in dotted decimal without leading zeros, IPv6 compressed and in
    lower case, an IPv4-mapped one as C{::ffff:a.b.c.d} (as Twisted reports a dual-stack
    socket's peer), so that one client is one key in the per-client limits. (The C library's
    C{inet_pton}/C{inet_ntop}: a tenth of C{ipaddress}'s cost, and this runs per connection.)
    """
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, ValueError):
        return None


def _agreed(parsed: Any, host: str, port: int, which: str) -> IPAddress:
    """
    Twisted's address for one end, if it says what the checked fields say; with the
    canonical text, so that one client is one key in the per-client limits.
    """
    if not isinstance(parsed, IPv4Address | IPv6Address) or parsed.port != port:
        raise InvalidHeader(f"v1 header: {which} address not understood")
    if parsed.host == host:
        return parsed
    return type(parsed)("TCP", host, port)


def _v2(buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
    head = buffer[: len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[: len(head)]:
        raise InvalidHeader("not a PROXY protocol header")
    if len(buffer) < 16:
        return None
    version, command = buffer[12] >> 4, buffer[12] & 0x0F
    if version != 2:
        raise InvalidHeader(f"v2 header: version {version}, not 2")
    if command not in (0, 1):
        raise InvalidHeader(f"v2 header: unknown command {command}")
    size = 16 + int.from_bytes(buffer[14:16], "big")
    if size > MAX_V2_SIZE:
        raise InvalidHeader(f"v2 header: {size} bytes, over the limit of {MAX_V2_SIZE}")
    if len(buffer) < size:
        return None
    header, rest = buffer[:size], buffer[size:]
    family, transport = buffer[13] >> 4, buffer[13] & 0x0F
    local = command == 0
    if not local and (family not in _FAMILY or transport not in _TRANSPORT):
        raise InvalidHeader(f"v2 header: unknown address family and protocol 0x{buffer[13]:02x}")
    addresses = _ADDRESS_SIZE.get(family)
    if addresses is not None and size - 16 >= addresses:
        _check_tlvs(header, 16 + addresses)
    elif not local:
        raise InvalidHeader(
            f"v2 header: {size - 16} bytes after the fixed part, the address block of "
            f"{_FAMILY[family]} needs {addresses}"
        )
    try:
        info: Any = V2Parser.parse(header)
    except (InvalidProxyHeader, ValueError, KeyError, IndexError, struct.error) as e:
        raise InvalidHeader(f"v2 header: {type(e).__name__}") from None
    if local:
        return ProxyHeader(2, "LOCAL", None, None, size), rest
    kind = f"{_FAMILY[family]} {_TRANSPORT[transport]}"
    source, destination = info.source, info.destination
    if (
        _TRANSPORT[transport] != "STREAM"
        or not isinstance(source, IPv4Address | IPv6Address)
        or not isinstance(destination, IPv4Address | IPv6Address)
    ):
        # HAProxy keeps the connection's own addresses for these: nothing to use.
        return ProxyHeader(2, kind, None, None, size), rest
    return ProxyHeader(2, kind, _canonical(source), _canonical(destination), size), rest


def _canonical(address: IPAddress) -> IPAddress:
    """Twisted's v2 address, with its text canonical (its IPv6 text is uncompressed)."""
    family = socket.AF_INET6 if isinstance(address, IPv6Address) else socket.AF_INET
    text = canonical_ip(address.host, family)
    if text is None or text == address.host:
        return address
    return type(address)("TCP", text, address.port)


def _check_tlvs(header: bytes, offset: int) -> None:
    """
    The TLVs after the address block must tile the header exactly; a CRC32C TLV is 4 bytes
    and matches the header computed with its own value zeroed.
    """
    end = len(header)
    while offset < end:
        if end - offset < 3:
            raise InvalidHeader(f"v2 header: a truncated TLV at byte {offset}")
        kind = header[offset]
        length = int.from_bytes(header[offset + 1 : offset + 3], "big")
        value = offset + 3
        if value + length > end:
            raise InvalidHeader(
                f"v2 header: TLV 0x{kind:02x} of {length} bytes at byte {offset} overruns "
                f"the header's {end} bytes"
            )
        if kind == _PP2_TYPE_CRC32C:
            if length != 4:
                raise InvalidHeader(f"v2 header: CRC32C TLV of {length} bytes, not 4")
            zeroed = header[:value] + b"\x00\x00\x00\x00" + header[value + 4 :]
            if crc32c(zeroed) != int.from_bytes(header[value : value + 4], "big"):
                raise InvalidHeader("v2 header: CRC32C mismatch")
        offset = value + length


def _shown(field: bytes) -> str:
    """A field of the header for a log line: short, and never a control character."""
    text = field[:40].decode("ascii", "backslashreplace")
    return repr(text + ("..." if len(field) > 40 else ""))


# -- CRC32C (Castagnoli), for v2's checksum TLV --------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of C{data} (only ever run over one bounded header)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- writing ------------------------------------------------------------------------------------


def _ip(address: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        # Without an IPv6 scope ("%eth0"), which neither version can carry.
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def encode(version: str, source: object, destination: object) -> bytes:
    """
    The header that says a connection is C{source}'s, made to C{destination}.

    Two IPv4 addresses make a C{TCP4} header (v2: C{INET}); with an IPv6 one, both are
    IPv6 (an IPv4 one mapped, C{::ffff:a.b.c.d}, as HAProxy does); without two IP addresses
    (a UNIX socket, nothing known), v1 says C{UNKNOWN} and v2 sends C{PROXY} for an
    unspecified family: the receiver then takes the connection's own addresses.

    @param version: C{"v1"} or C{"v2"}.
    @param source: an address with C{host} and C{port} (Twisted's C{IPv4Address} or
        C{IPv6Address}), or anything else for "not known".
    """
    src, dst = _ip(source), _ip(destination)
    sport, dport = getattr(source, "port", 0), getattr(destination, "port", 0)
    if src is None or dst is None:
        if version == "v1":
            return b"PROXY UNKNOWN\r\n"
        return V2_SIGNATURE + b"\x21\x00\x00\x00"
    if src.version != dst.version:
        src, dst = _as_v6(src), _as_v6(dst)
    if version == "v1":
        proto = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {proto} {_text(src)} {_text(dst)} {sport} {dport}\r\n".encode("ascii")
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    family = b"\x11" if src.version == 4 else b"\x21"  # INET or INET6, STREAM
    return V2_SIGNATURE + b"\x21" + family + struct.pack("!H", len(block)) + block


def _text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The canonical text of L{canonical_ip} (an IPv4-mapped address as C{::ffff:a.b.c.d})."""
    return socket.inet_ntop(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, ip.packed)


def _as_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(f"::ffff:{ip}")
