"""
The client hop, driven byte by byte over StringTransports with a Clock: keep-alive, pipelining,
hop-by-hop headers, framing, bad input, retries, and what the access log says of each exchange.
(How a connection times out and closes: test_client_closing.py.)
"""

from __future__ import annotations

from typing import Any

from fakes import OK_RESPONSE, Harness, parse_response
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"


def test_get_is_forwarded_with_forwarding_headers_and_relayed() -> None:
    """A request reaches the origin rewritten for the hop; the response comes back intact."""
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    sent = h.origin.sent()
    assert sent.startswith(b"GET /a HTTP/1.1\r\n")
    assert b"Host: example\r\n" in sent
    assert b"Via: 1.1 persistproxy\r\n" in sent
    assert b"X-Forwarded-For: 10.1.2.3\r\n" in sent
    assert b"X-Forwarded-Proto: http\r\n" in sent
    h.origin.respond(OK_RESPONSE)
    status, headers, body = parse_response(transport.value())
    assert (status, body) == (200, b"hello")
    assert headers[b"keep-alive"] == [b"timeout=75"]
    assert b"connection" not in headers
    assert not transport.disconnecting
    assert h.pool.idle == 1


def test_upstream_connection_is_reused_across_client_connections() -> None:
    """Two client connections, one after the other, share one upstream connection."""
    h = Harness()
    for _ in range(3):
        client, transport = h.client()
        client.dataReceived(GET)
        h.origin.respond(OK_RESPONSE)
        assert parse_response(transport.value())[0] == 200
    assert len(h.origin.connections) == 1
    assert h.origin.connections[0].requests == 3


def test_http10_closes_unless_keep_alive_asked() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    assert b"Host: 127.0.0.1:8081\r\n" in h.origin.sent(), "HTTP/1.1 upstream needs a Host"
    h.origin.respond(OK_RESPONSE)
    _, headers, _ = parse_response(transport.value())
    assert headers[b"connection"] == [b"close"]
    assert transport.write_closed or transport.disconnecting

    client, transport = h.client()
    client.dataReceived(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    h.origin.respond(OK_RESPONSE)
    _status, headers, _ = parse_response(transport.value())
    assert headers[b"connection"] == [b"keep-alive"]
    assert headers[b"keep-alive"] == [b"timeout=75"]
    assert not transport.write_closed and not transport.disconnecting


def test_client_close_is_honoured_on_the_client_hop_only() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"onnection" not in h.origin.sent()
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[1][b"connection"] == [b"close"]
    assert transport.write_closed
    assert h.pool.idle == 1


def test_max_requests_closes_after_the_last_response() -> None:
    h = Harness(listener={"max_requests": 2})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert b"connection" not in parse_response(transport.value())[1]
    transport.clear()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[1][b"connection"] == [b"close"]
    assert transport.write_closed


def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert h.origin.sent().count(b"HTTP/1.1\r\n") == 1, "only the first is in flight"
    h.origin.clear()
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert h.origin.sent().startswith(b"POST /2 HTTP/1.1\r\n")
    assert h.origin.sent().endswith(b"\r\n\r\nabc")
    h.origin.clear()
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert h.origin.sent().startswith(b"GET /3 ")
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n3")
    out = transport.value()
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.index(b"\r\n\r\n1") < out.index(b"\r\n\r\n2") < out.index(b"\r\n\r\n3")
    assert len(h.origin.connections) == 1


def test_hop_by_hop_headers_and_connection_nominees_never_cross() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\n"
        b"Proxy-Connection: keep-alive\r\nUpgrade: foo\r\nX-Kept: yes\r\n\r\n"
    )
    sent = h.origin.sent().lower()
    for name in (b"connection", b"x-secret", b"keep-alive", b"te:", b"proxy-", b"upgrade"):
        assert name not in sent, name
    assert b"x-kept: yes" in sent
    h.origin.respond(
        b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: leak\r\nKeep-Alive: timeout=9\r\n"
        b"Proxy-Authenticate: Basic\r\nTrailer: X-T\r\nUpgrade: h2c\r\nX-End: yes\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    _, headers, _ = parse_response(transport.value())
    for name in (b"x-hop", b"proxy-authenticate", b"trailer", b"upgrade"):
        assert name not in headers, name
    assert headers[b"keep-alive"] == [b"timeout=75"], "ours, not the origin's"
    assert headers[b"x-end"] == [b"yes"]


def test_existing_x_forwarded_for_is_appended_to() -> None:
    h = Harness()
    client, _ = h.client()
    client.dataReceived(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: ftp\r\n\r\n"
    )
    sent = h.origin.sent()
    assert b"X-Forwarded-For: 1.1.1.1, 10.1.2.3\r\n" in sent
    assert sent.count(b"X-Forwarded-Proto") == 1 and b"X-Forwarded-Proto: http\r\n" in sent


def test_chunked_request_body_is_streamed_rechunked() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(
        b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    assert b"Transfer-Encoding: chunked\r\n" in h.origin.sent()
    assert h.origin.sent().endswith(b"3\r\nabc\r\n")
    client.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
    assert h.origin.sent().endswith(b"2\r\nde\r\n0\r\n\r\n")
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[0] == 200
    assert h.pool.idle == 1


def test_close_delimited_response_is_rechunked_for_http11() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome")
    h.origin.respond(b"data")
    h.origin.close()
    _, headers, body = parse_response(transport.value())
    assert headers[b"transfer-encoding"] == [b"chunked"]
    assert body == b"4\r\nsome\r\n4\r\ndata\r\n0\r\n\r\n"
    assert not transport.write_closed, "the client connection outlives the upstream one"
    assert h.pool.idle == 0


def test_close_delimited_response_to_http10_ends_with_close() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    h.origin.respond(b"HTTP/1.1 200 OK\r\n\r\nbody")
    h.origin.close()
    _, headers, body = parse_response(transport.value())
    assert headers[b"connection"] == [b"close"]
    assert body == b"body"
    assert transport.write_closed


def test_head_response_has_no_body_and_connection_is_reused() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    _, headers, body = parse_response(transport.value())
    assert headers[b"content-length"] == [b"1000"] and body == b""
    transport.clear()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[2] == b"hello"
    assert len(h.origin.connections) == 1


def test_204_and_304_carry_no_body() -> None:
    h = Harness()
    client, transport = h.client()
    for status in (204, 304):
        transport.clear()
        client.dataReceived(GET)
        h.origin.respond(b"HTTP/1.1 %d X\r\n\r\n" % status)
        got, headers, body = parse_response(transport.value())
        assert (got, body) == (status, b"")
        assert b"transfer-encoding" not in headers
    assert len(h.origin.connections) == 1


def test_100_continue_is_relayed_before_the_final_response() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(
        b"PUT /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    assert b"Expect: 100-continue" in h.origin.sent()
    h.origin.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.dataReceived(b"ok")
    assert h.origin.sent().endswith(b"ok")
    h.origin.respond(OK_RESPONSE)
    assert transport.value().count(b"HTTP/1.1 ") == 2


def test_stale_pooled_connection_is_retried_for_idempotent_requests() -> None:
    """The origin closed a pooled connection as we wrote to it: retry on a new one."""
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    transport.clear()
    client.dataReceived(GET)
    assert h.origin.connections[0].requests == 2
    h.origin.close(0)  # no response byte arrived
    assert len(h.origin.connections) == 2
    h.origin.respond(OK_RESPONSE, 1)
    assert parse_response(transport.value())[0] == 200
    retry = h.events("upstream.retry")
    assert len(retry) == 1 and retry[0]["stale_connection"] is True
    assert h.events("access")[-1]["retries"] == 1


def test_stale_pooled_connection_is_not_retried_for_post() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    transport.clear()
    client.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
    h.origin.close(0)
    assert len(h.origin.connections) == 1, "a POST is never replayed"
    assert parse_response(transport.value())[0] == 502
    assert not transport.write_closed, "an upstream failure does not cost the client its link"


def test_failure_after_response_bytes_is_not_retried() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    h.origin.close()
    assert len(h.origin.connections) == 1
    assert transport.disconnecting, "a truncated response is signalled by a cut connection"


def test_origin_keep_alive_timeout_is_honoured_by_the_pool() -> None:
    h = Harness(upstream={"keepalive_margin": 1.0})
    client, _transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n")
    h.clock.advance(3.5)
    client.dataReceived(GET)
    assert len(h.origin.connections) == 1, "3.5 s idle is within timeout=5 minus the margin"
    h.origin.respond(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n")
    h.clock.advance(4.2)
    client.dataReceived(GET)
    assert len(h.origin.connections) == 2, "4.2 s is too close to the origin's 5 s"
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]


def test_connect_failure_is_502_and_response_timeout_is_504() -> None:
    h = Harness(upstream={"response_timeout": 2})
    h.origin.refuse = True
    client, transport = h.client()
    client.dataReceived(GET)
    status, headers, body = parse_response(transport.value())
    assert status == 502 and b"Bad Gateway" in body
    assert int(headers[b"content-length"][0]) == len(body)
    h.origin.refuse = False
    transport.clear()
    client.dataReceived(GET)
    h.clock.advance(1.9)
    assert transport.value() == b""
    h.clock.advance(0.2)
    assert parse_response(transport.value())[0] == 504
    assert len(h.events("upstream.error")) == 2


def test_origin_close_retires_upstream_but_not_client() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert b"connection" not in parse_response(transport.value())[1]
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]
    assert h.pool.idle == 0
    client.dataReceived(GET)
    assert len(h.origin.connections) == 2


# -- bad input ---------------------------------------------------------------------------------


def _rejected(request: bytes, status: int, **listener: object) -> bytes:
    h = Harness(listener=dict(listener))
    client, transport = h.client()
    client.dataReceived(request)
    got, headers, _ = parse_response(transport.value())
    assert got == status, transport.value()
    assert headers[b"connection"] == [b"close"]
    assert transport.write_closed
    assert not h.origin.connections, "nothing of a rejected request reaches the origin"
    return transport.value()


def test_malformed_requests_get_400_and_close() -> None:
    _rejected(b"GARBAGE\r\n\r\n", 400)
    _rejected(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400)
    _rejected(b"GET / HTTP/1.1\r\n\r\n", 400)  # no Host
    _rejected(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)
    _rejected(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    )
    _rejected(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400)
    _rejected(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n", 400)


def test_unsupported_things_get_501_and_505() -> None:
    _rejected(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501)
    _rejected(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501)
    _rejected(b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n", 501)
    _rejected(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505)
    preface = _rejected(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505)
    assert b"HTTP/2 is not supported" in preface


def test_oversized_head_gets_431_whole_or_trickled() -> None:
    _rejected(
        b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 431, max_head_size=1024
    )
    h = Harness(listener={"max_head_size": 1024})
    client, transport = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX: ")
    for _ in range(20):
        client.dataReceived(b"a" * 100)  # a header line that never ends
    assert parse_response(transport.value())[0] == 431


def test_bad_chunk_mid_body_aborts_upstream_and_answers_400() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n"
    )
    client.dataReceived(b"zz\r\n")
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]
    assert parse_response(transport.value())[0] == 400


def test_pipelined_bad_request_is_answered_after_the_good_one_and_nothing_after() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    client.dataReceived(b"BAD REQUEST\r\n\r\n" + GET)
    h.origin.respond(OK_RESPONSE)
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 400 Bad Request" in out
    assert h.origin.connections[0].requests == 1
    assert transport.write_closed


def test_client_disconnect_mid_response_drops_the_upstream_connection() -> None:
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    h = Harness()
    client, _transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    client.connectionLost(Failure(ConnectionLost()))
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]
    assert h.pool.idle == 0 and h.pool.active == 0


# -- found in review ---------------------------------------------------------------------------


def test_connection_cannot_nominate_framing_or_routing_headers() -> None:
    """'Connection: content-length' must not turn a body into a smuggled second request."""
    h = Harness()
    client, _ = h.client()
    client.dataReceived(
        b"POST /u HTTP/1.1\r\nHost: x\r\nConnection: content-length, host\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    sent = h.origin.sent()
    assert b"Content-Length: 5\r\n" in sent and b"Host: x\r\n" in sent
    assert sent.endswith(b"\r\n\r\nhello")


def test_absolute_form_target_becomes_origin_form_with_its_host() -> None:
    h = Harness()
    client, _ = h.client()
    client.dataReceived(b"GET http://other.example:81/p?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    sent = h.origin.sent()
    assert sent.startswith(b"GET /p?q=1 HTTP/1.1\r\n")
    assert b"Host: other.example:81\r\n" in sent and b"Host: x" not in sent


def test_chunked_body_counts_against_max_body_size() -> None:
    h = Harness(listener={"max_body_size": 4})
    client, transport = h.client()
    client.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.dataReceived(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
    assert parse_response(transport.value())[0] == 413


def test_connection_state_lives_in_slots() -> None:
    """
    Per-connection state stays in __slots__: past ~30 attributes an instance dict stops
    sharing keys and every idle connection costs ~0.8 KiB more (the 2 KiB per idle
    connection budget of bench/run.sh idle).
    """
    h = Harness()
    client, _ = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert set(vars(client)) <= {"transport", "connected", "factory"}
    assert set(vars(h.origin.connections[0])) <= {"transport", "connected", "factory"}


def test_a_last_request_stops_reading_only_when_more_arrives() -> None:
    """
    After a request that ends the connection, reading goes on (no epoll_ctl pair per
    request) until bytes that will never be answered arrive; they reach nobody, and the
    half-close after the response reads again for the client's FIN.
    """
    h = Harness()
    client, transport = h.client()
    client.dataReceived(b"GET /last HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n")
    assert transport.producerState == "producing"
    client.dataReceived(b"GET /never HTTP/1.1\r\nHost: example\r\n\r\n")
    assert transport.producerState == "paused"
    assert b"/never" not in h.origin.sent()
    h.origin.respond(OK_RESPONSE)
    status, headers, _ = parse_response(transport.value())
    assert (status, headers[b"connection"]) == (200, [b"close"])
    assert transport.write_closed
    assert transport.producerState == "producing"
    assert h.origin.connections[0].requests == 1


class _CountingSocket:
    """A real socket whose sends are counted (write_directly sends through .send)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.sends: list[tuple[bytes, int]] = []

    def send(self, data: bytes, flags: int = 0) -> int:
        self.sends.append((bytes(data), flags))
        return int(self._sock.send(data, flags))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_a_response_written_in_one_event_leaves_in_one_send_over_tcp() -> None:
    """
    Over a real TCP transport, the head and the body of a response (one upstream read) are
    one send at the end of the event; a closing response's last send carries MSG_MORE so
    the kernel puts the FIN in the same segment.
    """
    import socket

    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock

    from persistproxy.http.client_connection import ClientConnection
    from persistproxy.net.accept import ProxyServer
    from persistproxy.net.fastwrite import MSG_MORE

    h = Harness()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        peer = socket.create_connection(listening.getsockname())
        ours, _ = listening.accept()
    with peer:
        client = ClientConnection(h.ctx, peer=IPv4Address("TCP", "127.0.0.1", 40000))
        transport = ProxyServer(ours, client, ("127.0.0.1", 40000), None, 0, MemoryReactorClock())
        counting = _CountingSocket(ours)
        transport.socket = counting  # type: ignore[assignment]
        client.makeConnection(transport)
        client.dataReceived(GET)
        h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        assert counting.sends == [], "nothing before the end of the event"
        h.clock.advance(0)  # the end of the event (call_after_event under ProxyReactor)
        assert len(counting.sends) == 1
        data, flags = counting.sends[0]
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nhello")
        assert flags == 0

        client.dataReceived(b"GET /b HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n")
        h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
        assert len(counting.sends) == 2, "a closing response goes at once, with the FIN"
        data, flags = counting.sends[1]
        assert data.endswith(b"bye") and flags == MSG_MORE
        peer.settimeout(5)
        received = b""
        while chunk := peer.recv(65536):
            received += chunk
        assert received.endswith(b"bye"), "all of it, then the FIN"
        transport.connectionLost(Failure(ConnectionDone()))


def test_a_client_gone_before_its_response_gets_a_499_access_line_and_count() -> None:
    h = Harness()
    client, _transport = h.client()
    client.dataReceived(GET)
    upstream = h.origin.connections[0]
    client.connectionLost(Failure(ConnectionDone()))
    [line] = h.events("access")
    assert (line["status"], line["bytes"], line["aborted"]) == (499, 0, "client")
    assert line["path"] == "/a"
    assert h.stats.responses == {4: 1} and h.stats.aborted == {"client": 1}
    assert upstream.transport.disconnecting, "the origin's work is abandoned"  # type: ignore[union-attr]


def test_a_client_gone_mid_response_is_logged_with_the_status_and_bytes_sent() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    sent = len(transport.value())
    client.connectionLost(Failure(ConnectionDone()))
    [line] = h.events("access")
    assert (line["status"], line["bytes"], line["aborted"]) == (200, sent, "client")
    assert h.stats.responses == {2: 1} and h.stats.aborted == {"client": 1}


def test_an_origin_cutting_its_response_short_is_logged_once_as_aborted_upstream() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    h.origin.close()
    assert transport.disconnecting, "the client sees the cut, not a complete response"
    client.connectionLost(Failure(ConnectionDone()))
    [line] = h.events("access")
    assert (line["status"], line["aborted"]) == (200, "upstream")
    assert h.stats.aborted == {"upstream": 1} and h.stats.responses == {2: 1}
    assert h.events("upstream.error")[0]["reason"]


def test_complete_exchanges_have_no_aborted_field() -> None:
    h = Harness()
    client, _transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    client.connectionLost(Failure(ConnectionDone()))
    [line] = h.events("access")
    assert line["status"] == 200 and "aborted" not in line
    assert h.stats.aborted == {}


def test_an_exchange_cut_by_the_drain_timeout_says_so() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    client.drain_cut()
    assert transport.disconnecting
    client.connectionLost(Failure(ConnectionDone()))  # the reset, a turn later
    [line] = h.events("access")
    assert (line["status"], line["aborted"]) == (499, "drain")


def _lines(h: Harness) -> list[tuple[str, int, str | None]]:
    return [(a["path"], a["status"], a.get("aborted")) for a in h.events("access")]


def test_a_cut_exchange_has_one_line_and_those_pipelined_behind_it_none() -> None:
    """Requests behind the one being answered never began: no 499 for them."""
    b = b"GET /b HTTP/1.1\r\nHost: example\r\n\r\n"
    h = Harness()
    client, _transport = h.client()
    client.dataReceived(GET + b)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    h.origin.close()  # the origin cuts /a
    client.connectionLost(Failure(ConnectionDone()))
    assert _lines(h) == [("/a", 200, "upstream")]
    assert h.stats.aborted == {"upstream": 1} and h.stats.responses == {2: 1}

    h = Harness(listener={"send_timeout": 10})
    client, _transport = h.client()
    client.dataReceived(GET + b)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    client._queue[0].pauseProducing()
    h.clock.advance(10.1)
    client.connectionLost(Failure(ConnectionDone()))
    assert _lines(h) == [("/a", 200, "timeout")]


def test_a_half_close_in_the_middle_of_the_body_being_forwarded_is_a_499() -> None:
    h = Harness()
    client, _transport = h.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: example\r\nContent-Length: 10\r\n\r\nabc")
    upstream = h.origin.connections[0]
    client.readConnectionLost()
    assert upstream.transport.disconnecting  # type: ignore[union-attr]
    client.connectionLost(Failure(ConnectionDone()))
    assert _lines(h) == [("/up", 499, "client")]


