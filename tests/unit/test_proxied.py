"""
A listener with C{proxy_protocol = true} (listener/proxied.py), driven in memory with the HTTP
plugin behind it: the carried address is the client for C{X-Forwarded-For}, access lines,
C{getPeer()} and per-client limits; peers outside C{proxy_protocol_from} are closed at
accept; a missing, malformed or late header closes the connection without an answer, and
nothing reaches the origin; the header's wait holds a place among C{max_connections}; v2
C{LOCAL} leaves the connection its own address; the drain closes connections still waiting.
"""

from __future__ import annotations

from typing import Any

import pytest
from fakes import OK_RESPONSE, FakePort, HalfCloseTransport, Harness, parse_response
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from persistproxy.http.client_connection import ClientConnection
from persistproxy.http.plugin import HTTPFactory, HTTPProtocolPlugin
from persistproxy.listener.admission import Admitted, ConnectionRegistry, ListenerFactory
from persistproxy.listener.limits import ConnectionLimits, Rejection
from persistproxy.listener.proxied import HeaderReader, ProxyHeaderFactory, Senders
from persistproxy.net.proxyproto import V2_SIGNATURE, encode

GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"
CLIENT = IPv4Address("TCP", "203.0.113.7", 61000)
FRONT = IPv4Address("TCP", "198.51.100.1", 443)
V1 = encode("v1", CLIENT, FRONT)
DONE = Failure(ConnectionDone())


class _Listener:
    """An HTTP listener whose connections start with a PROXY protocol header."""

    def __init__(
        self,
        max_connections: int = 0,
        per_client: int = 0,
        senders: tuple[str, ...] = ("127.0.0.0/8",),
        timeout: float = 10.0,
    ) -> None:
        self.h = Harness(listener={"proxy_protocol": True, "header_timeout": timeout})
        self.limits = ConnectionLimits(
            "web", max_connections, per_client, 0, self.h.log, self.h.stats
        )
        self.port = FakePort()
        self.limits.port = self.port
        self.h.ctx.limits = self.limits
        self.registry = ConnectionRegistry()
        admission = ListenerFactory(
            HTTPFactory(self.h.ctx),
            self.h.clock,
            self.limits,
            self.h.stats,
            self.registry,
            HTTPProtocolPlugin().refusal,
            identified=True,
        )
        self.factory = ProxyHeaderFactory(
            admission,
            self.h.clock,
            self.limits,
            self.h.stats,
            self.registry,
            self.h.log,
            "web",
            Senders(senders),
            timeout,
        )

    def connect(self, peer: str = "127.0.0.1") -> tuple[Any, HalfCloseTransport]:
        address = IPv4Address("TCP", peer, 40000)
        protocol = self.factory.buildProtocol(address)
        transport = HalfCloseTransport(
            peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080)
        )
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def served(self, reader: HeaderReader) -> ClientConnection:
        """The HTTP connection behind a reader whose header was read."""
        admitted = reader.inner
        assert isinstance(admitted, Admitted)
        inner = admitted.inner
        assert isinstance(inner, ClientConnection)
        return inner


def _forwarded_for(sent: bytes) -> list[bytes]:
    _, headers, _ = parse_response(b"HTTP/1.1 200 X\r\n" + sent.partition(b"\r\n")[2])
    return headers.get(b"x-forwarded-for", [])


def test_the_carried_address_is_the_client_for_the_origin_the_log_and_getpeer() -> None:
    listener = _Listener()
    reader, transport = listener.connect()
    reader.dataReceived(V1)
    assert listener.h.origin.connections == [], "nothing before a request"
    reader.dataReceived(GET)
    assert _forwarded_for(listener.h.origin.sent()) == [b"203.0.113.7"]
    listener.h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[0] == 200
    [line] = listener.h.events("access")
    assert line["client"] == "203.0.113.7"
    assert transport.getPeer() == CLIENT and transport.getHost() == FRONT
    assert listener.served(reader).peer == "203.0.113.7"


def test_the_request_may_come_in_the_headers_read() -> None:
    listener = _Listener()
    reader, _ = listener.connect()
    reader.dataReceived(encode("v2", CLIENT, FRONT) + GET)
    assert _forwarded_for(listener.h.origin.sent()) == [b"203.0.113.7"]


def test_a_v2_header_may_come_a_byte_at_a_time() -> None:
    listener = _Listener()
    reader, _ = listener.connect()
    for byte in encode("v2", CLIENT, FRONT):
        assert reader.inner is None
        reader.dataReceived(bytes([byte]))
    assert reader.state == "SERVING"
    reader.dataReceived(GET)
    assert _forwarded_for(listener.h.origin.sent()) == [b"203.0.113.7"]


def test_an_ipv6_client_is_carried_over_an_ipv4_connection() -> None:
    listener = _Listener()
    reader, transport = listener.connect()
    client = IPv6Address("TCP", "2001:db8::7", 1234)
    reader.dataReceived(encode("v1", client, IPv6Address("TCP", "2001:db8::1", 80)) + GET)
    assert _forwarded_for(listener.h.origin.sent()) == [b"2001:db8::7"]
    assert transport.getPeer() == client


def test_v2_local_is_a_health_check_served_as_the_peer_itself() -> None:
    listener = _Listener()
    reader, transport = listener.connect("127.0.0.9")
    reader.dataReceived(V2_SIGNATURE + b"\x20\x00\x00\x00" + GET)
    assert _forwarded_for(listener.h.origin.sent()) == [b"127.0.0.9"]
    assert transport.getPeer().host == "127.0.0.9"


def test_v1_unknown_is_served_as_the_peer_itself() -> None:
    listener = _Listener()
    reader, _ = listener.connect("127.0.0.9")
    reader.dataReceived(b"PROXY UNKNOWN\r\n" + GET)
    assert _forwarded_for(listener.h.origin.sent()) == [b"127.0.0.9"]


# -- refused ------------------------------------------------------------------------------------


def test_a_peer_outside_proxy_protocol_from_is_closed_at_accept() -> None:
    listener = _Listener(senders=("10.0.0.0/8",))
    reader, _ = listener.connect("127.0.0.1")
    assert reader is None, "the port closes the socket: nothing read, nothing counted"
    assert listener.limits.total == 0 and len(listener.registry) == 0
    [event] = listener.h.events("proxy_protocol.refused")
    assert (event["peer"], event["reason"]) == ("127.0.0.1", "not in proxy_protocol_from")
    assert event["level"] == "warning" and listener.h.stats.connections_rejected == 1
    allowed, _ = listener.connect("10.9.8.7")
    assert isinstance(allowed, HeaderReader)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (GET, "not a PROXY protocol header"),
        (b"PROXY TCP4 203.0.113.7 198.51.100.1 http 443\r\n" + GET, "source port 'http'"),
        (V2_SIGNATURE + b"\x21\x11\x00\x08" + b"\x00" * 8, "address block of INET"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not a PROXY protocol header"),
    ],
    ids=["http", "bad-v1", "short-v2", "tls-hello"],
)
def test_a_bad_header_closes_without_an_answer_and_nothing_reaches_the_origin(
    data: bytes, reason: str
) -> None:
    listener = _Listener()
    reader, transport = listener.connect()
    reader.dataReceived(data)
    assert transport.disconnecting and transport.value() == b""
    assert listener.h.origin.connections == []
    [event] = listener.h.events("proxy_protocol.invalid")
    assert event["peer"] == "127.0.0.1" and reason in event["reason"]
    reader.dataReceived(GET)  # whatever still comes is not read
    assert listener.h.origin.connections == [] and not listener.h.events("access")
    assert listener.limits.total == 1
    reader.connectionLost(DONE)
    assert listener.limits.total == 0 and len(listener.registry) == 0


def test_a_header_not_complete_within_header_timeout_closes_the_connection() -> None:
    listener = _Listener(timeout=3)
    reader, transport = listener.connect()
    reader.dataReceived(V1[:10])
    listener.h.clock.advance(2.9)
    assert not transport.disconnecting
    listener.h.clock.advance(0.1)
    assert transport.disconnecting and transport.value() == b""
    [event] = listener.h.events("proxy_protocol.invalid")
    assert event["reason"] == "no complete header within 3s (10 bytes)"


def test_the_timer_stops_once_the_header_is_in() -> None:
    listener = _Listener(timeout=3)
    reader, transport = listener.connect()
    listener.h.clock.advance(2)
    reader.dataReceived(V1)
    listener.h.clock.advance(1.5)
    assert not listener.h.events("proxy_protocol.invalid")
    assert not (transport.disconnecting or transport.write_closed)
    # The HTTP request head has its own header_timeout, counted from the handover.
    listener.h.clock.advance(1.5)
    assert transport.write_closed, "closed gracefully by the HTTP side's own timer"


def test_a_peer_that_closes_before_its_header_is_logged() -> None:
    listener = _Listener()
    reader, transport = listener.connect()
    reader.dataReceived(b"PROXY TCP4 ")
    reader.readConnectionLost()
    assert transport.disconnecting
    [event] = listener.h.events("proxy_protocol.invalid")
    assert event["reason"] == "the connection closed before a complete header (11 bytes)"


# -- limits --------------------------------------------------------------------------------------


def test_the_per_client_limit_counts_the_carried_address_not_the_sender() -> None:
    listener = _Listener(per_client=1)
    first, _ = listener.connect()
    first.dataReceived(V1)
    other, _ = listener.connect()
    other.dataReceived(encode("v1", IPv4Address("TCP", "203.0.113.8", 1), FRONT))
    assert isinstance(other.inner, Admitted), "another client behind the same balancer"
    again, transport = listener.connect()
    again.dataReceived(V1 + GET)
    assert isinstance(again.inner, Rejection)
    assert parse_response(transport.value())[0] == 503
    [refusal] = listener.h.events("client.refused")
    assert refusal["client"] == "203.0.113.7"
    assert listener.limits.total == 2, "the refused one left max_connections at once"
    first.connectionLost(DONE)
    third, _ = listener.connect()
    third.dataReceived(V1)
    assert isinstance(third.inner, Admitted), "a closed connection frees its client's slot"


def test_connections_awaiting_their_header_count_in_max_connections() -> None:
    listener = _Listener(max_connections=1)
    first, _ = listener.connect()
    assert listener.limits.total == 1 and not listener.port.reading
    # Accepted in the same burst: held unread, its header not awaited yet.
    held, held_transport = listener.connect()
    assert held.state == "HELD" and held_transport.producerState == "paused"
    listener.h.clock.advance(60)
    assert not held_transport.disconnecting, "no header timer while held"
    first.dataReceived(V1)
    assert listener.limits.total == 1, "the slot passed to the admitted connection"
    first.connectionLost(DONE)
    assert held.state == "READING" and held_transport.producerState == "producing"
    held.dataReceived(V1 + GET)
    assert _forwarded_for(listener.h.origin.sent()) == [b"203.0.113.7"]
    held.connectionLost(DONE)
    assert listener.limits.total == 0 and listener.port.reading


def test_a_held_connection_that_leaves_is_forgotten() -> None:
    listener = _Listener(max_connections=1)
    first, _ = listener.connect()
    held, _ = listener.connect()
    held.connectionLost(DONE)
    first.connectionLost(DONE)
    assert listener.limits.total == 0 and len(listener.registry) == 0


# -- the drain -----------------------------------------------------------------------------------


def test_the_drain_closes_connections_still_waiting_for_their_header() -> None:
    listener = _Listener()
    waiting, waiting_transport = listener.connect()
    served, _ = listener.connect()
    served.dataReceived(V1)
    registered = listener.registry.snapshot()
    assert waiting in registered and served not in registered
    assert served.inner in registered, "the admitted connection took its place"
    assert waiting.close_if_idle() is True and waiting_transport.disconnecting
    waiting.connectionLost(DONE)
    assert listener.registry.snapshot() == [served.inner]


def test_events_after_the_header_reach_the_served_protocol() -> None:
    listener = _Listener()
    reader, transport = listener.connect()
    reader.dataReceived(V1 + GET)
    listener.h.origin.respond(OK_RESPONSE)
    reader.readConnectionLost()  # the client's FIN, which the HTTP side hears
    assert transport.disconnecting
    reader.connectionLost(DONE)
    assert listener.limits.total == 0 and len(listener.registry) == 0
    assert reader.inner is None


# -- the senders ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("::ffff:10.1.2.3", True),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("fe80::1%eth0", False),
        ("not-an-address", False),
        (None, True),
    ],
)
def test_senders_match_networks_and_mapped_ipv4(host: str | None, allowed: bool) -> None:
    assert Senders(["10.0.0.0/8", "2001:db8::/32"]).allows(host) is allowed


def test_a_reason_never_carries_the_peers_control_bytes() -> None:
    listener = _Listener()
    reader, _ = listener.connect()
    reader.dataReceived(b"PROXY TCP4 \x1b[31m 1.2.3.4 1 2\r\n")
    [event] = listener.h.events("proxy_protocol.invalid")
    assert event["reason"] == "v1 header: a byte that is not printable ASCII"
