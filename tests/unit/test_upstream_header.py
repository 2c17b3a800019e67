"""
C{send_proxy_protocol} (upstream/header.py, upstream/group.py), in a memory reactor: each
connection starts with the PROXY protocol header of the client it is picked for, before
anything its protocol writes and before a TLS handshake; a pick without a client says
C{UNKNOWN}; the protocol the pool gets is its own, with the transport itself (its writes go
straight to the socket); events and half-closes pass through.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.config import UpstreamConfig
from persistproxy.http.upstream_connection import HTTPConnector, UpstreamConnection
from persistproxy.interfaces import ClientAddresses
from persistproxy.logs import make_event_log
from persistproxy.net.proxyproto import HeaderParser, encode
from persistproxy.tls.upstream import TLSClientEndpoint, endpoint_wrapper
from persistproxy.upstream.group import Router
from persistproxy.upstream.header import HeaderFirstEndpoint, header_for

CLIENT = ClientAddresses(
    IPv4Address("TCP", "203.0.113.7", 61000), IPv4Address("TCP", "198.51.100.1", 443)
)
GET = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n"


class Waiter:
    cancelled = False

    def __init__(self) -> None:
        self.got: list[tuple[Any, bool]] = []
        self.failed: list[tuple[str, int]] = []

    def connection_ready(self, connection: Any, reused: bool) -> None:
        self.got.append((connection, reused))

    def connection_failed(self, reason: str, status: int) -> None:
        self.failed.append((reason, status))


def _router(reactor: MemoryReactorClock, version: str, **kw: Any) -> Router:
    config = UpstreamConfig(
        name="app", servers=(("127.0.0.1", 8081),), send_proxy_protocol=version, **kw
    )
    log = make_event_log(io.StringIO())
    return Router(reactor, {"app": config}, log, wrap=lambda c: endpoint_wrapper(reactor, c, log))


def _complete_connect(reactor: MemoryReactorClock, index: int = -1) -> StringTransport:
    host, port, factory, _, _ = reactor.tcpClients[index]
    transport = StringTransport()
    factory.buildProtocol(IPv4Address("TCP", host, port)).makeConnection(transport)
    return transport


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_each_connection_starts_with_the_header_of_the_client_it_serves(version: str) -> None:
    reactor = MemoryReactorClock()
    group = _router(reactor, version).group("app", HTTPConnector(reactor))
    waiter = Waiter()
    group.pick(key=CLIENT).acquire(waiter)
    transport = _complete_connect(reactor)
    [(connection, reused)] = waiter.got
    assert isinstance(connection, UpstreamConnection) and not reused
    assert connection.transport is transport, "the protocol writes to the socket itself"
    connection.send_head(Waiter(), GET, b"GET", True)  # type: ignore[arg-type]
    header = encode(version, CLIENT.source, CLIENT.destination)
    assert transport.value() == header + GET
    found = HeaderParser().feed(transport.value())
    assert found is not None and found[0].source == CLIENT.source


def test_a_pick_without_a_client_says_unknown() -> None:
    reactor = MemoryReactorClock()
    group = _router(reactor, "v1").group("app", HTTPConnector(reactor))
    group.pick().acquire(Waiter())
    assert _complete_connect(reactor).value() == b"PROXY UNKNOWN\r\n"
    assert header_for("v2", "not-addresses") == encode("v2", None, None)


def test_connections_are_pooled_per_client() -> None:
    reactor = MemoryReactorClock()
    group = _router(reactor, "v2").group("app", HTTPConnector(reactor))
    first = Waiter()
    group.pick(key=CLIENT).acquire(first)
    _complete_connect(reactor)
    [(connection, _)] = first.got
    connection.state = "IDLE"
    group.pick(key=CLIENT).release(connection, True)
    other = ClientAddresses(IPv6Address("TCP", "2001:db8::7", 1), CLIENT.destination)
    group.pick(key=other).acquire(Waiter())
    assert len(reactor.tcpClients) == 2, "another client gets its own connection"
    assert encode("v2", other.source, other.destination) == _complete_connect(reactor).value()
    again = Waiter()
    group.pick(key=CLIENT).acquire(again)
    assert again.got == [(connection, True)] and len(reactor.tcpClients) == 2


def test_with_tls_the_header_goes_in_clear_before_the_handshake() -> None:
    reactor = MemoryReactorClock()
    router = _router(reactor, "v1", tls=True, tls_verify=False)
    [server] = router.servers["app"]
    endpoint = server.with_header(b"X")
    assert isinstance(endpoint, TLSClientEndpoint)
    assert isinstance(server.endpoint, TLSClientEndpoint)
    assert isinstance(endpoint.wrapped, HeaderFirstEndpoint)
    assert endpoint.creator is server.endpoint.creator, "one session memory: resumption"
    router.group("app", HTTPConnector(reactor)).pick(key=CLIENT).acquire(Waiter())
    sent = _complete_connect(reactor).value()
    header = encode("v1", CLIENT.source, CLIENT.destination)
    assert sent.startswith(header)
    assert sent[len(header) : len(header) + 2] == b"\x16\x03", "then the ClientHello"


def test_an_endpoint_that_cannot_be_rebuilt_over_the_header_is_refused_at_start() -> None:
    config = UpstreamConfig(name="app", servers=(("127.0.0.1", 1),), send_proxy_protocol="v1")
    with pytest.raises(ValueError, match="send_proxy_protocol needs its endpoint"):
        Router(
            MemoryReactorClock(),
            {"app": config},
            make_event_log(io.StringIO()),
            wrap=lambda c: lambda endpoint, host: object(),  # type: ignore[arg-type, return-value]
        )


# -- the pass-through ------------------------------------------------------------------------------


class _Endpoint:
    """Connects at once over a StringTransport."""

    def __init__(self) -> None:
        self.transport = StringTransport()

    def connect(self, factory: Any) -> Any:
        from twisted.internet.defer import succeed

        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        protocol.makeConnection(self.transport)
        return succeed(protocol)


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.events: list[Any] = []

    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.events.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.events.append("lost")


@implementer(IHalfCloseableProtocol)
class _HalfRecorder(_Recorder):
    def readConnectionLost(self) -> None:
        self.events.append("read")

    def writeConnectionLost(self) -> None:
        self.events.append("write")


@pytest.mark.parametrize("kind", [_Recorder, _HalfRecorder])
def test_the_pass_through_hands_on_every_event_and_claims_only_what_it_can(kind: type) -> None:
    endpoint = _Endpoint()
    got: list[Any] = []
    HeaderFirstEndpoint(endpoint, b"HEADER ").connect(Factory.forProtocol(kind)).addCallback(
        got.append
    )
    [protocol] = got
    assert type(protocol) is kind, "the caller gets its own protocol"
    assert endpoint.transport.value() == b"HEADER hello"
    assert protocol.transport is endpoint.transport, "the transport itself, not a wrapper"


@pytest.mark.parametrize("kind", [_Recorder, _HalfRecorder])
def test_events_pass_through(kind: type) -> None:
    from persistproxy.upstream.header import _HeaderFirstFactory

    factory = _HeaderFirstFactory(Factory.forProtocol(kind), b"H")
    first = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert first is not None
    first.makeConnection(StringTransport())
    first.dataReceived(b"x")
    half = IHalfCloseableProtocol.providedBy(first)
    assert half is (kind is _HalfRecorder)
    if half:
        first.readConnectionLost()  # type: ignore[attr-defined]
        first.writeConnectionLost()  # type: ignore[attr-defined]
    first.connectionLost(Failure(ConnectionDone()))
    expected = [b"x", "read", "write", "lost"] if half else [b"x", "lost"]
    assert first.wrapped.events == expected  # type: ignore[attr-defined]


# -- the plugins pick per client ---------------------------------------------------------------


def test_http_picks_upstream_connections_per_client_connection() -> None:
    from fakes import OK_RESPONSE, HalfCloseTransport, Harness, parse_response

    from persistproxy.http.client_connection import ClientConnection

    h = Harness(upstream={"send_proxy_protocol": "v1"})
    assert h.ctx.keyed
    alice, alice_transport = h.client()
    bob = ClientConnection(h.ctx)
    bob.makeConnection(HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5556)))
    alice.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert parse_response(alice_transport.value())[0] == 200
    bob.dataReceived(GET)
    assert len(h.origin.connections) == 2, "bob never gets alice's idle connection"
    h.origin.respond(OK_RESPONSE)
    alice_transport.clear()
    alice.dataReceived(GET)
    assert len(h.origin.connections) == 2, "alice gets hers back"
    h.origin.respond(OK_RESPONSE, 0)
    assert parse_response(alice_transport.value())[0] == 200
    key = alice.upstream_key
    assert key == ClientAddresses(
        IPv4Address("TCP", "10.1.2.3", 5555), alice_transport.getHost()
    )
    assert Harness().client()[0].upstream_key is None, "no key without send_proxy_protocol"


def test_tcp_picks_its_upstream_connection_for_its_client() -> None:
    from test_tcp_plugin import Harness as TCPHarness

    from persistproxy.tcp.plugin import TCPProtocolPlugin

    h = TCPHarness()
    h.upstream_config = UpstreamConfig(
        name="app", servers=(("127.0.0.1", 9000),), send_proxy_protocol="v2"
    )
    h.factory = TCPProtocolPlugin().build_factory(h.config, h.context)
    group = h.groups[-1]
    picked: list[Any] = []
    pick = group.pick
    def spy(client: str | None = None, avoid: Any = (), key: Any = None) -> Any:
        picked.append(key)
        return pick(client, avoid, key)

    group.pick = spy  # type: ignore[method-assign]
    _, transport = h.client()
    assert picked == [ClientAddresses(IPv4Address("TCP", "10.1.2.3", 5555), transport.getHost())]
    assert h.pool.waiting == 0 and len(h.origin.pending) == 1


def test_avoid_skips_the_server_of_a_keyed_pool() -> None:
    """
    A request that failed to connect avoids what pick gave it, a key's share: the next pick
    must skip that whole server, not just that (new, unequal) share object. ip_hash would
    otherwise give the same client the same server again.
    """
    reactor = MemoryReactorClock()
    config = UpstreamConfig(
        name="app",
        servers=(("127.0.0.1", 9000), ("127.0.0.1", 9001)),
        send_proxy_protocol="v2",
        balance="ip_hash",
    )
    router = Router(reactor, {"app": config}, make_event_log(io.StringIO()))
    group = router.group("app", HTTPConnector(reactor))
    first = group.pick("10.1.2.3", key=CLIENT)
    assert group.pick("10.1.2.3", key=CLIENT).address == first.address
    second = group.pick("10.1.2.3", avoid=[first], key=CLIENT)
    assert second.address != first.address
    assert group.pick("10.1.2.3", avoid=[first, second], key=CLIENT).address in {
        "127.0.0.1:9000",
        "127.0.0.1:9001",
    }
