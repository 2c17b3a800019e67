"""
A listener's connection limits (listener/limits.py): per-client and total counts, holding
past C{max_connections} with the port stopped and restarted, reaping a client's oldest idle
connection, and the L{Rejection} that answers a refused connection and lingers, with a Clock.
"""

from __future__ import annotations

import io
import json
from typing import Any

from fakes import OK_RESPONSE, FakePort, connect_from, limited_listener
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from persistproxy.listener.limits import HOLD, ConnectionLimits, Rejection
from persistproxy.logs import make_event_log
from persistproxy.metrics import ListenerStats

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class _Limits:
    """ConnectionLimits with its log and counters at hand."""

    def __init__(self, total: int = 0, per_client: int = 0, idle_per_client: int = 0) -> None:
        self.stream = io.StringIO()
        self.stats = ListenerStats()
        self.limits = ConnectionLimits(
            "web", total, per_client, idle_per_client, make_event_log(self.stream), self.stats
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [e for e in lines if e["event"] == name]


class _Held:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.served = False

    def unhold(self) -> None:
        self.served = True


class _Idle:
    def __init__(self) -> None:
        self.reaped = False

    def reap_idle(self) -> None:
        self.reaped = True


def test_per_client_limit_refuses_counts_logs_and_frees_on_release() -> None:
    t = _Limits(per_client=2)
    limits = t.limits
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") == "too many connections from your address"
    assert limits.admit("10.0.0.2") is None, "the limit is per address"
    assert limits.total == 3, "a refused connection is not counted as open"
    assert t.stats.connections_rejected == 1
    [event] = t.events("client.refused")
    assert (event["client"], event["listener"], event["level"]) == ("10.0.0.1", "web", "warning")
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.1") is None, "a released connection frees its slot"
    for host in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        limits.release(host)
    assert limits.total == 0
    assert limits._clients == {}, "no entry is left behind for a client that has gone"


def test_max_connections_stops_the_port_holds_the_burst_and_serves_it_in_order() -> None:
    t = _Limits(total=2)
    limits = t.limits
    port = FakePort()
    limits.port = port
    assert limits.admit("a") is None
    assert port.reading
    assert limits.admit("b") is None
    assert not port.reading, "further clients wait in the kernel's backlog"
    assert [e["max_connections"] for e in t.events("listener.full")] == [2]
    # Accepted in the same burst, before the port stopped: held, not refused.
    assert limits.admit("c") == HOLD and limits.admit("d") == HOLD
    assert limits.total == 2 and t.stats.connections_rejected == 0
    first, second, gone = _Held("c"), _Held("d"), _Held("e")
    for held in (first, second, gone):
        limits.hold(held)
    limits.forget_held(gone)  # closed while it waited
    limits.forget_held(gone)  # twice is harmless
    limits.release("a")
    assert first.served and not second.served, "held connections are served in order"
    assert limits.total == 2 and not port.reading
    limits.release("b")
    assert second.served and not gone.served
    assert not port.reading
    limits.release("c")
    assert port.reading
    assert [e["open"] for e in t.events("listener.accepting")] == [1]


def test_without_limits_every_connection_is_admitted_and_nothing_is_kept_per_client() -> None:
    t = _Limits()
    for i in range(1000):
        assert t.limits.admit(f"10.0.{i // 256}.{i % 256}") is None
    assert t.limits.total == 1000
    assert t.limits._clients == {}, "no per-client entry without a per-client limit"


def test_went_idle_reaps_the_oldest_idle_connection_of_that_client_only() -> None:
    t = _Limits(idle_per_client=2)
    limits = t.limits
    a1, a2, a3, b1 = _Idle(), _Idle(), _Idle(), _Idle()
    limits.went_idle("a", a1)
    limits.went_idle("a", a2)
    limits.went_idle("b", b1)
    assert not any(c.reaped for c in (a1, a2, b1))
    limits.went_busy("a", a1)  # a busy connection is not idle any more
    limits.went_idle("a", a3)
    assert not any(c.reaped for c in (a1, a2, a3))
    limits.went_idle("a", a1)  # idle again: now the newest
    assert a2.reaped and not a1.reaped and not a3.reaped and not b1.reaped
    [event] = t.events("client.idle_reaped")
    assert (event["client"], event["idle_limit"]) == ("a", 2)
    for c in (a1, a3):
        limits.went_busy("a", c)
    limits.went_busy("b", b1)
    assert limits._idle == {}, "no entry is left behind for a client with no idle connection"


def test_without_an_idle_limit_nothing_is_tracked() -> None:
    t = _Limits()
    connection = _Idle()
    for _ in range(5):
        t.limits.went_idle("a", connection)
    assert t.limits._idle == {} and not connection.reaped


def test_oldest_idle_connection_of_a_client_is_reaped() -> None:
    h, factory, _ = limited_listener(max_idle_per_client=2)
    conns = []
    for _ in range(3):
        c, t = connect_from(factory, "10.0.0.1")
        c.dataReceived(GET)
        h.origin.respond(OK_RESPONSE)
        conns.append((c, t))
        h.clock.advance(1)
    assert [c.inner._phase for c, _ in conns] == ["lingering", "idle", "idle"]
    # A busy connection is not counted as idle.
    conns[1][0].dataReceived(b"GET / HTTP/1.1\r\n")
    c4, _ = connect_from(factory, "10.0.0.1")
    c4.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert conns[2][0].inner._phase == "idle" and c4.inner._phase == "idle"


# -- Rejection ---------------------------------------------------------------------------------


class _HalfCloseTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def test_a_rejection_answers_half_closes_and_closes_after_lingering() -> None:
    clock = Clock()
    rejection = Rejection(clock, b"HTTP/1.1 503 busy\r\n\r\n", linger=1.0)
    transport = _HalfCloseTransport()
    rejection.makeConnection(transport)
    assert transport.value() == b"HTTP/1.1 503 busy\r\n\r\n"
    assert transport.write_closed and not transport.disconnecting
    rejection.dataReceived(b"GET / HTTP/1.1\r\n")  # what the client still sends: dropped
    clock.advance(0.9)
    assert not transport.disconnecting, "the client gets a moment to read the answer"
    clock.advance(0.2)
    assert transport.disconnecting
    rejection.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_a_rejection_closes_when_the_client_does() -> None:
    clock = Clock()
    rejection = Rejection(clock, b"HTTP/1.1 503 busy\r\n\r\n")
    transport = _HalfCloseTransport()
    rejection.makeConnection(transport)
    rejection.readConnectionLost()
    assert transport.disconnecting
    rejection.connectionLost(None)
    assert clock.getDelayedCalls() == [], "the linger timer is stopped with the connection"


def test_a_rejection_without_an_answer_or_a_half_close_just_closes() -> None:
    clock = Clock()
    silent, transport = Rejection(clock, b""), _HalfCloseTransport()
    silent.makeConnection(transport)  # raw TCP refuses with nothing to say
    assert transport.disconnecting and not transport.write_closed and transport.value() == b""
    plain, plain_transport = Rejection(clock, b"no\r\n"), StringTransport()
    plain.makeConnection(plain_transport)  # a transport that cannot half-close
    assert plain_transport.value() == b"no\r\n" and plain_transport.disconnecting
    assert clock.getDelayedCalls() == []
