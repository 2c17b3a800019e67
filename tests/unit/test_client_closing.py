"""
How a client connection ends and what it waits for (http/client_closing.py), over
StringTransports with a Clock: the timeouts of its phases (head, body, idle, send, lifetime),
the 408s, the graceful close (half-close, then a short drain of the client's input), and the
drain asking an idle connection to close.
"""

from __future__ import annotations

from fakes import OK_RESPONSE, HalfCloseTransport, Harness, parse_response

GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"


def test_idle_timeout_closes_after_and_not_before() -> None:
    h = Harness(listener={"keepalive_timeout": 5})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[1][b"keep-alive"] == [b"timeout=5"]
    h.clock.advance(4.9)
    assert not transport.write_closed
    h.clock.advance(0.2)
    assert transport.write_closed
    assert b"408" not in transport.value()


def test_lingering_close_ends_when_client_closes_or_after_a_moment() -> None:
    """After our FIN, input is drained until the client closes, for two seconds at most."""
    h = Harness(listener={"keepalive_timeout": 1})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    h.clock.advance(1.1)
    assert transport.write_closed and not transport.disconnecting
    client.writeConnectionLost()
    client.dataReceived(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")  # discarded
    assert len(h.origin.connections) == 1 and h.origin.connections[0].requests == 1
    h.clock.advance(1.9)
    assert not transport.disconnecting
    h.clock.advance(0.2)
    assert transport.disconnecting


def test_partial_head_gets_408_at_header_timeout() -> None:
    h = Harness(listener={"header_timeout": 10})
    client, transport = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHo")
    h.clock.advance(9.9)
    assert transport.value() == b""
    h.clock.advance(0.2)
    assert parse_response(transport.value())[0] == 408
    assert transport.write_closed
    access = h.events("access")
    assert [(a["status"], a["client"]) for a in access] == [(408, "10.1.2.3")]


def test_new_silent_connection_is_closed_quietly_at_header_timeout() -> None:
    h = Harness(listener={"header_timeout": 10})
    _client, transport = h.client()
    h.clock.advance(10.1)
    assert transport.value() == b"" and transport.write_closed


def test_send_408_on_idle_when_configured() -> None:
    h = Harness(listener={"keepalive_timeout": 3, "send_408_on_idle": True})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    transport.clear()
    h.clock.advance(3.1)
    assert parse_response(transport.value())[0] == 408


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


def test_send_408_on_idle_spares_a_connection_that_never_sent_a_byte() -> None:
    h = Harness(listener={"header_timeout": 2, "send_408_on_idle": True})
    _, transport = h.client()
    h.clock.advance(2.1)
    assert transport.value() == b"" and transport.write_closed


def test_closing_connections_share_the_listeners_timers() -> None:
    """
    A connection per request (HTTP/1.0, TLS handshake benchmarks) must not cost a reactor
    call per connection: lingering waits in the listener's queue like the other phases.
    """
    from twisted.internet.address import IPv4Address

    from persistproxy.http.client_connection import ClientConnection

    class FinAtOnce(HalfCloseTransport):
        """A TCP transport with nothing buffered: the FIN leaves during the call."""

        def loseWriteConnection(self) -> None:
            super().loseWriteConnection()
            self.owner.writeConnectionLost()

    h = Harness()
    transports = []
    for _ in range(20):
        client = ClientConnection(h.ctx)
        transport = FinAtOnce(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        transport.owner = client  # type: ignore[attr-defined]
        client.makeConnection(transport)
        client.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        h.origin.respond(OK_RESPONSE)
        assert transport.write_closed
        transports.append(transport)
    # One call per listener queue in use (header, linger) and the pool's own, not 20 more.
    calls = [str(c.func) for c in h.clock.getDelayedCalls()]
    assert len(calls) <= 4, calls
    h.clock.advance(1.9)
    assert not any(t.disconnecting for t in transports)
    h.clock.advance(0.2)  # LINGER_SECONDS: these clients never closed, so they are cut
    assert all(t.disconnecting for t in transports)


def test_a_client_that_half_closed_is_closed_once_answered_not_after_lingering() -> None:
    """
    Lingering drains a client that may still be sending; one whose FIN came first has
    nothing left to send, so once its response and our FIN are out, the socket closes (a
    plain close: waiting out the linger time ended in a reset).
    """
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    client.readConnectionLost()
    assert not transport.disconnecting, "the request it sent is still answered"
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[0] == 200
    assert transport.write_closed and not transport.disconnecting
    client.writeConnectionLost()  # our FIN is out
    assert transport.disconnecting, "closed at once, not after the linger time"

    # A client that did not half-close is drained for the linger time, as before.
    other, other_transport = h.client()
    other.dataReceived(b"GET /a HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n")
    h.origin.respond(OK_RESPONSE)
    assert other_transport.write_closed
    other.writeConnectionLost()
    assert not other_transport.disconnecting
    h.clock.advance(2.1)
    assert other_transport.disconnecting


def test_a_pipelined_body_timeout_lets_the_response_before_it_finish_then_408() -> None:
    h = Harness(listener={"body_timeout": 5})
    client, transport = h.client()
    client.dataReceived(GET + b"POST /b HTTP/1.1\r\nHost: example\r\nContent-Length: 10\r\n\r\nab")
    h.clock.advance(5.1)  # /b's body stalls while /a waits for its origin
    assert not transport.disconnecting and not transport.write_closed
    h.origin.respond(OK_RESPONSE)
    out = transport.value()
    assert out.index(b"HTTP/1.1 200 OK") < out.index(b"HTTP/1.1 408 ")
    assert transport.write_closed
    lines = [(a["path"], a["status"]) for a in h.events("access")]
    assert lines == [("/a", 200), ("/b", 408)]
    assert h.stats.responses == {2: 1, 4: 1} and h.stats.timeouts == 1
    assert b"POST /b" not in h.origin.sent(), "nothing of /b reached the origin"


def test_the_drain_closes_an_idle_connection_at_once_and_a_busy_one_after_its_response() -> None:
    h = Harness()
    idle, idle_transport = h.client()
    idle.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert idle.close_if_idle() is True
    assert idle_transport.write_closed, "closed gracefully: half-close first"
    busy, busy_transport = h.client()
    busy.dataReceived(GET)
    draining = True
    h.ctx.is_draining = lambda: draining
    assert busy.close_if_idle() is False
    assert not busy_transport.write_closed, "the response in flight is still owed"
    h.origin.respond(OK_RESPONSE)
    status, headers, _ = parse_response(busy_transport.value())
    assert status == 200 and headers[b"connection"] == [b"close"]
    assert busy_transport.write_closed
