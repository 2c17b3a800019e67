"""
Upgrade (WebSocket) on an HTTP listener, driven over StringTransports with a Clock: what
crosses the hop, the switch to a byte relay on a 101, a refusal that leaves both connections
HTTP, nothing pipelined behind an Upgrade read as HTTP, the tunnel's timers and its access
line. (The real thing, a websockets client and origin: tests/e2e/test_websocket.py.)
"""

from __future__ import annotations

from typing import Any

from fakes import OK_RESPONSE, Harness, parse_response
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
DONE = Failure(ConnectionDone())


def _tunnel(h: Harness, early: bytes = b"", after: bytes = b"") -> tuple[Any, Any, Any]:
    """A client connection switched to a tunnel; its transport and the upstream connection."""
    client, transport = h.client()
    client.dataReceived(UPGRADE + early)
    upstream = h.origin.connections[-1]
    h.origin.respond(SWITCH + after)
    return client, transport, upstream


def test_upgrade_is_forwarded_with_its_two_headers_and_the_rest_of_hop_by_hop_stays() -> None:
    h = Harness()
    client, _transport = h.client()
    client.dataReceived(UPGRADE.replace(b"Upgrade\r\n", b"Upgrade, X-Hop\r\nX-Hop: s\r\n"))
    sent = h.origin.sent()
    assert b"Connection: upgrade\r\nUpgrade: websocket\r\n" in sent
    assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" in sent
    assert b"x-hop" not in sent.lower() and b"keep-alive" not in sent.lower()


def test_h2c_and_http10_upgrades_are_not_forwarded_and_a_101_for_them_is_502() -> None:
    for request in (
        UPGRADE.replace(b"websocket", b"h2c"),
        UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"),
        UPGRADE.replace(b"keep-alive, Upgrade", b"Upgrade, close"),
    ):
        h = Harness()
        client, transport = h.client()
        client.dataReceived(request)
        assert b"upgrade" not in h.origin.sent().lower(), request
        h.origin.respond(SWITCH)
        assert parse_response(transport.value())[0] == 502, request


def test_a_101_makes_both_connections_a_relay_and_nothing_is_lost_either_way() -> None:
    h = Harness()
    client, transport, upstream = _tunnel(h, early=b"EARLY", after=b"HELLO")
    out = transport.value()
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Upgrade: websocket" in head and b"Connection: upgrade" in head
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    assert b"Keep-Alive" not in head
    assert rest == b"HELLO", "the origin's bytes after its 101"
    assert h.origin.sent().endswith(b"\r\n\r\nEARLY"), "the client's bytes after its request"
    assert upstream.state == "TUNNEL"
    transport.clear()
    h.origin.clear()
    client.dataReceived(b"\x81\x05up")
    assert h.origin.sent() == b"\x81\x05up"
    h.origin.respond(b"\x81\x05down")
    assert transport.value() == b"\x81\x05down"
    assert (h.pool.active, h.pool.idle) == (1, 0), "counted, never pooled"
    assert h.events("access") == [], "the 101's line comes at the end of the tunnel"
    # The client's FIN is passed on; the origin closes; the client connection is closed.
    client.readConnectionLost()
    assert upstream.transport.disconnecting
    h.origin.close()
    assert transport.disconnecting
    client.connectionLost(DONE)
    [line] = h.events("access")
    assert (line["status"], line["reason"], line["path"]) == (101, "client_fin", "/ws")
    down = len(b"HELLO\x81\x05down")
    assert (line["bytes_up"], line["bytes_down"]) == (len(b"EARLY\x81\x05up"), down)
    assert line["bytes"] == len(head) + 4 + down
    assert h.pool.active == 0, "the upstream connection was forgotten, not pooled"
    assert h.stats.responses == {1: 1}


def test_keep_alive_and_send_timers_do_not_apply_in_a_tunnel_but_its_idle_timeout_does() -> None:
    h = Harness(listener={"keepalive_timeout": 5, "header_timeout": 5, "tunnel_idle_timeout": 30})
    client, transport, upstream = _tunnel(h)
    h.clock.advance(20)
    assert not transport.disconnecting, "the keep-alive timeout is not a tunnel's"
    client.dataReceived(b"ping")
    h.clock.advance(20)
    assert not transport.disconnecting, "any byte restarts the idle timeout"
    h.clock.advance(11)
    assert transport.disconnecting and upstream.transport.disconnecting
    h.origin.close()
    client.connectionLost(DONE)
    [line] = h.events("access")
    assert (line["status"], line["reason"]) == (101, "idle_timeout")
    assert h.stats.timeouts == 1


def test_a_refused_upgrade_leaves_both_connections_http_and_the_held_request_is_answered() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(UPGRADE + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.origin.sent().count(b"HTTP/1.1\r\n") == 1, "nothing behind the Upgrade is sent"
    assert transport.producerState == "paused"
    h.origin.clear()
    h.origin.respond(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno")
    status, headers, body = parse_response(transport.value())
    assert (status, body) == (426, b"no") and b"connection" not in headers
    assert h.origin.sent().startswith(b"GET /next HTTP/1.1\r\n"), "read as HTTP now"
    assert len(h.origin.connections) == 1, "the upstream connection went back to the pool"
    transport.clear()
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[0] == 200
    assert transport.producerState == "producing" and not transport.disconnecting
    assert [line["status"] for line in h.events("access")] == [426, 200]


def test_a_refused_upgrade_with_a_fin_meanwhile_closes_after_the_answer() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(UPGRADE)
    client.readConnectionLost()
    assert not transport.disconnecting and not transport.write_closed
    h.origin.respond(b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n")
    assert parse_response(transport.value())[0] == 400
    assert transport.disconnecting or transport.write_closed


def test_a_request_pipelined_behind_an_upgrade_is_never_read_as_http() -> None:
    h = Harness()
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    _tunnel(h, early=smuggled)
    assert h.origin.sent().endswith(b"\r\n\r\n" + smuggled), "relayed as bytes, once"
    assert h.origin.sent().count(b"/smuggled") == 1
    assert h.stats.requests_total == 1
    assert len(h.origin.connections) == 1


def test_the_drain_cuts_a_tunnel_and_writes_its_line_at_once() -> None:
    h = Harness()
    client, transport, upstream = _tunnel(h)
    assert client.close_if_idle() is False, "a tunnel is busy"
    client.drain_cut()
    assert transport.disconnecting and upstream.transport.disconnecting
    [line] = h.events("access")
    assert (line["status"], line["reason"]) == (101, "drain")
    h.origin.close()
    client.connectionLost(DONE)
    assert len(h.events("access")) == 1
    assert h.pool.active == 0


def test_a_101_without_upgrade_header_or_after_a_plain_request_is_502() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(UPGRADE)
    h.origin.respond(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n")
    assert parse_response(transport.value())[0] == 502


def test_a_client_fin_while_the_upgrade_waits_is_passed_on_once_the_tunnel_starts() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(UPGRADE + b"last words")
    client.readConnectionLost()
    upstream = h.origin.connections[-1]
    half_closed = []
    upstream.transport.loseWriteConnection = lambda: half_closed.append(True)  # as TCP's
    assert not upstream.transport.disconnecting, "the Upgrade is still answered"
    h.origin.respond(SWITCH + b"reply")
    assert h.origin.sent().endswith(b"\r\n\r\nlast words")
    assert half_closed == [True], "the client's FIN, passed on as a half-close"
    assert transport.value().endswith(b"\r\n\r\nreply")
    h.origin.close()
    client.connectionLost(DONE)
    [line] = h.events("access")
    assert (line["status"], line["reason"], line["bytes_up"]) == (101, "client_fin", 10)


def test_the_client_gone_while_the_upgrade_waits_is_a_499_and_the_upstream_is_dropped() -> None:
    h = Harness()
    client, _transport = h.client()
    client.dataReceived(UPGRADE)
    upstream = h.origin.connections[-1]
    client.connectionLost(DONE)
    assert upstream.transport.disconnecting
    [line] = h.events("access")
    assert (line["status"], line["aborted"]) == (499, "client")
    h.origin.respond(SWITCH)  # too late: nobody asked any more
    assert h.pool.active == 0
