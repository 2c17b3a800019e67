"""
Connection governance on the client hop, with a Clock: body and send timeouts, lifetime,
per-client and total connection limits, idle reaping per client, TCP keep-alive probes.
"""

from __future__ import annotations

from typing import Any

from fakes import OK_RESPONSE, Harness, parse_response
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from persistproxy.http.plugin import HTTPFactory, HTTPProtocolPlugin
from persistproxy.listener.admission import ConnectionRegistry, ListenerFactory
from persistproxy.listener.limits import ConnectionLimits, Rejection
from persistproxy.metrics import ListenerStats

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def test_body_silence_gets_408_and_drops_the_upstream_connection() -> None:
    h = Harness(listener={"body_timeout": 5})
    client, transport = h.client()
    client.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    h.clock.advance(4)
    client.dataReceived(b"de")  # progress re-arms the timer
    h.clock.advance(4.9)
    assert transport.value() == b""
    h.clock.advance(0.2)
    assert parse_response(transport.value())[0] == 408
    assert transport.write_closed
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]
    assert h.stats.timeouts == 1


def test_send_timeout_cuts_a_client_that_stops_reading() -> None:
    h = Harness(listener={"send_timeout": 10})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    exchange = client._queue[0]
    exchange.pauseProducing()  # what the transport does when its buffer is full
    upstream = h.origin.connections[0]
    assert upstream.transport.producerState == "paused"  # type: ignore[union-attr]
    h.clock.advance(9.9)
    assert not transport.disconnecting
    exchange.resumeProducing()
    exchange.pauseProducing()
    h.clock.advance(9.9)
    assert not transport.disconnecting, "progress restarts the send timeout"
    h.clock.advance(0.2)
    assert transport.disconnecting
    assert h.events("client.send_timeout")
    [line] = h.events("access")
    assert (line["status"], line["aborted"]) == (200, "timeout")
    assert upstream.transport.disconnecting, "the origin's response is abandoned too"  # type: ignore[union-attr]


def test_max_lifetime_ends_keep_alive() -> None:
    h = Harness(listener={"max_lifetime": 30, "keepalive_timeout": 75})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert b"connection" not in parse_response(transport.value())[1]
    transport.clear()
    h.clock.advance(29.9)
    assert not transport.write_closed, "an idle connection lives until its lifetime"
    client.dataReceived(GET)
    h.clock.advance(0.2)
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[1][b"connection"] == [b"close"]
    assert transport.write_closed


def test_idle_connection_closes_at_max_lifetime() -> None:
    h = Harness(listener={"max_lifetime": 10, "keepalive_timeout": 75})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    h.clock.advance(9.9)
    assert not transport.write_closed
    h.clock.advance(0.2)
    assert transport.write_closed


# -- limits ----------------------------------------------------------------------------------


class _Port:
    reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def _limited(**kw: int) -> tuple[Harness, ListenerFactory, ConnectionLimits]:
    h = Harness(listener={k: v for k, v in kw.items()})
    limits = ConnectionLimits(
        "web",
        kw.get("max_connections", 0),
        kw.get("max_connections_per_client", 0),
        kw.get("max_idle_per_client", 0),
        h.log,
        ListenerStats(),
    )
    h.ctx.limits = limits
    plugin = HTTPProtocolPlugin()
    factory = ListenerFactory(
        HTTPFactory(h.ctx), h.clock, limits, h.stats, ConnectionRegistry(), plugin.refusal
    )
    return h, factory, limits


def _connect(factory: ListenerFactory, host: str) -> tuple[Any, StringTransport]:
    address = IPv4Address("TCP", host, 40000)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def test_per_client_limit_answers_503_and_keeps_existing_connections() -> None:
    h, factory, _limits = _limited(max_connections_per_client=2)
    first, t1 = _connect(factory, "10.0.0.1")
    _connect(factory, "10.0.0.1")
    refused, t3 = _connect(factory, "10.0.0.1")
    assert isinstance(refused, Rejection)
    status, headers, _ = parse_response(t3.value())
    assert status == 503 and headers[b"retry-after"] == [b"5"]
    other, _ = _connect(factory, "10.0.0.2")
    assert not isinstance(other, Rejection), "the limit is per client address"
    first.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert parse_response(t1.value())[0] == 200
    refusal = h.events("client.refused")
    assert refusal and refusal[0]["client"] == "10.0.0.1"
    first.connectionLost(None)
    again, _ = _connect(factory, "10.0.0.1")
    assert not isinstance(again, Rejection), "a closed connection frees its slot"


def test_listener_limit_stops_accepting_until_a_connection_closes() -> None:
    _, factory, limits = _limited(max_connections=2)
    port = _Port()
    limits.port = port
    a, _ = _connect(factory, "10.0.0.1")
    assert port.reading
    _connect(factory, "10.0.0.2")
    assert not port.reading, "further clients wait in the backlog"
    # Accepted in the same burst, before reading stopped: held unread, not refused.
    late, late_transport = _connect(factory, "10.0.0.3")
    assert not isinstance(late, Rejection) and late.held
    assert late_transport.producerState == "paused"
    a.connectionLost(None)
    assert not late.held and late_transport.producerState == "producing"
    assert not port.reading, "the held connection took the freed slot"
    late.connectionLost(None)
    assert port.reading


def test_oldest_idle_connection_of_a_client_is_reaped() -> None:
    h, factory, _ = _limited(max_idle_per_client=2)
    conns = []
    for _ in range(3):
        c, t = _connect(factory, "10.0.0.1")
        c.dataReceived(GET)
        h.origin.respond(OK_RESPONSE)
        conns.append((c, t))
        h.clock.advance(1)
    assert [c.inner._phase for c, _ in conns] == ["lingering", "idle", "idle"]
    # A busy connection is not counted as idle.
    conns[1][0].dataReceived(b"GET / HTTP/1.1\r\n")
    c4, _ = _connect(factory, "10.0.0.1")
    c4.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert conns[2][0].inner._phase == "idle" and c4.inner._phase == "idle"
