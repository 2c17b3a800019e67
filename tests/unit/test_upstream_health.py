"""
Passive health (upstream/health.py) and what it steers: nginx's C{max_fails} /
C{fail_timeout} on one server's state, the group's C{pick()} skipping a server that is down
(and trying them all when all are), the pool reporting its connects, and an HTTP request
whose connect failed going to the next server.
"""

from __future__ import annotations

import io
from typing import Any

from fakes import OK_RESPONSE, Harness, parse_response
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from persistproxy.config import HealthCheckConfig, UpstreamConfig
from persistproxy.logs import make_event_log
from persistproxy.policy import RetryPolicy
from persistproxy.upstream.group import Server, UpstreamGroup
from persistproxy.upstream.health import ActiveCheck, PassiveHealth
from persistproxy.upstream.pool import ServerPool

GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"
TWO = {"servers": (("127.0.0.1", 8081), ("127.0.0.1", 8082))}


# -- the state of one server ------------------------------------------------------------------


def test_one_failure_takes_a_server_down_for_fail_timeout() -> None:
    health = PassiveHealth("s:1", max_fails=1, fail_timeout=10)
    assert health.available(0)
    health.failed(100)
    assert not health.available(100)
    assert not health.available(109.9)
    assert health.available(110)


def test_after_the_down_time_one_more_failure_takes_it_down_again() -> None:
    health = PassiveHealth("s:1", max_fails=3, fail_timeout=10)
    for t in (0, 1, 2):
        health.failed(t)
    assert not health.available(11)
    assert health.available(12)
    health.failed(30)  # long after the window, but no connect succeeded since
    assert not health.available(30)
    health.succeeded()
    assert health.available(30)
    health.failed(31)
    assert health.available(31), "a success forgot the failures: one of three again"


def test_failures_older_than_the_window_do_not_count() -> None:
    health = PassiveHealth("s:1", max_fails=2, fail_timeout=10)
    health.failed(0)
    health.failed(11)
    assert health.available(11)
    health.failed(12)
    assert not health.available(12)


def test_max_fails_zero_never_takes_a_server_down() -> None:
    health = PassiveHealth("s:1", max_fails=0, fail_timeout=10)
    for t in range(10):
        health.failed(t)
    assert health.available(10)


def test_down_and_up_are_logged() -> None:
    stream = io.StringIO()
    health = PassiveHealth("s:1", 1, 10, make_event_log(stream))
    health.failed(0)
    health.failed(0)
    health.succeeded()
    health.succeeded()
    events = [line for line in stream.getvalue().splitlines()]
    assert len(events) == 2
    assert "upstream.server_down" in events[0] and "upstream.server_up" in events[1]


# -- the group's pick and the pool's reports --------------------------------------------------


def _group(clock: Clock, count: int = 3, **kw: Any) -> UpstreamGroup[Any]:
    config = UpstreamConfig(
        name="app", servers=tuple(("127.0.0.1", p) for p in range(1, count + 1)), **kw
    )
    servers = [
        Server(h, p, None, config.max_fails, config.fail_timeout)  # type: ignore[arg-type]
        for h, p in config.servers
    ]
    return UpstreamGroup(
        clock,
        config,
        servers,
        make_event_log(io.StringIO()),
        lambda server: lambda: fail(ConnectionRefusedError()),
    )


def test_pick_skips_a_server_that_is_down_until_fail_timeout() -> None:
    clock = Clock()
    group = _group(clock)
    group.servers[1].health.failed(clock.seconds())
    picked = [group.pick().address for _ in range(4)]
    assert picked == ["127.0.0.1:1", "127.0.0.1:3"] * 2
    clock.advance(10)
    picked = [group.pick().address for _ in range(3)]
    assert picked == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


def test_pick_tries_every_server_in_turn_when_all_are_down() -> None:
    clock = Clock()
    group = _group(clock)
    for server in group.servers:
        server.health.failed(0)
    picked = [group.pick().address for _ in range(4)]
    assert picked == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:1"]


def test_pick_avoids_the_pools_a_request_failed_on() -> None:
    clock = Clock()
    group = _group(clock)
    first = group.pick()
    assert group.pick(avoid=[first, group.pools[1]]).address == "127.0.0.1:3"
    assert group.pick(avoid=group.pools).address in {p.address for p in group.pools}


class _Waiter:
    cancelled = False

    def __init__(self) -> None:
        self.failed: list[tuple[str, int]] = []
        self.ready: list[Any] = []

    def connection_ready(self, connection: Any, reused: bool) -> None:
        self.ready.append(connection)

    def connection_failed(self, reason: str, status: int) -> None:
        self.failed.append((reason, status))


def test_the_pool_reports_its_connects_to_the_server_health() -> None:
    clock = Clock()
    health = PassiveHealth("127.0.0.1:1", 1, 10)
    pending: list[Deferred[Any]] = []

    def connect() -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d

    config = UpstreamConfig(name="app", servers=(("127.0.0.1", 1),))
    pool: ServerPool[Any] = ServerPool(
        clock, "127.0.0.1:1", config, connect, make_event_log(io.StringIO()), health=health
    )
    waiter = _Waiter()
    pool.acquire(waiter)
    pending[-1].errback(ConnectionRefusedError())
    assert waiter.failed and waiter.failed[0][1] == 502
    assert not health.available(clock.seconds())
    pool.acquire(waiter)

    class Conn:
        on_lost = None

    pending[-1].callback(Conn())
    assert health.available(clock.seconds()) and health.fails == 0


# -- failover of an HTTP request --------------------------------------------------------------


def test_a_get_whose_connect_fails_goes_to_the_next_server() -> None:
    h = Harness(upstream=TWO)
    h.origin.refuse_ports = {8081}
    client, transport = h.client()
    client.dataReceived(GET)
    assert h.origin.ports == [8082]
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[0] == 200
    assert h.events("upstream.next_server")[0]["server"] == "127.0.0.1:8081"
    assert h.stats.upstream_errors == 0


def test_the_dead_server_is_skipped_then_tried_again_after_fail_timeout() -> None:
    h = Harness(upstream={**TWO, "fail_timeout": 10})
    h.origin.refuse_ports = {8081}
    client, transport = h.client()
    for _ in range(6):
        transport.clear()
        client.dataReceived(GET)
        h.origin.respond(OK_RESPONSE)
        assert parse_response(transport.value())[0] == 200
    assert len(h.events("upstream.next_server")) == 1, "down after one failure: skipped"
    h.origin.refuse_ports = set()
    h.clock.advance(10)
    client, transport = h.client()
    seen = set()
    for _ in range(4):
        transport.clear()
        client.dataReceived(GET)
        (busy,) = [i for i, c in enumerate(h.origin.connections) if c.state == "ACTIVE"]
        seen.add(h.origin.ports[busy])
        h.origin.respond(OK_RESPONSE, busy)
        assert parse_response(transport.value())[0] == 200
    assert 8081 in seen, "back in the rotation once fail_timeout passed"


def test_a_post_whose_connect_fails_goes_to_the_next_server_with_its_body() -> None:
    h = Harness(upstream=TWO)
    h.origin.refuse_ports = {8081}
    client, transport = h.client()
    client.dataReceived(b"POST /p HTTP/1.1\r\nHost: example\r\nContent-Length: 4\r\n\r\nbody")
    assert h.origin.ports == [8082]
    assert h.origin.sent().endswith(b"\r\n\r\nbody")
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[0] == 200


def test_every_server_refusing_is_502_after_one_try_each() -> None:
    h = Harness(upstream=TWO)
    h.origin.refuse_ports = {8081, 8082}
    client, transport = h.client()
    client.dataReceived(GET)
    assert parse_response(transport.value())[0] == 502
    assert len(h.events("upstream.next_server")) == 1
    assert h.stats.upstream_errors == 1


def test_retry_policy_tries_each_server_once() -> None:
    assert RetryPolicy.may_try_next_server(1, 2)
    assert not RetryPolicy.may_try_next_server(2, 2)
    assert not RetryPolicy.may_try_next_server(1, 1)


# -- active health checks ---------------------------------------------------------------------


class _Dialer:
    """A server's endpoint in memory: each connect waits until the test answers it."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred[Any]]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attempts.append((factory, d))
        return d

    def accept(self) -> tuple[Any, StringTransport]:
        factory, d = self.attempts[-1]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport

    def refuse(self) -> None:
        self.attempts[-1][1].errback(ConnectionRefusedError())


def _check(kind: str = "http", **kw: Any) -> tuple[Clock, PassiveHealth, _Dialer, ActiveCheck]:
    clock = Clock()
    health = PassiveHealth("10.0.0.1:80", 1, 10)
    dialer = _Dialer()
    config = HealthCheckConfig(**{"interval": 5, "timeout": 2, "rise": 2, "fall": 3, **kw})
    check = ActiveCheck(
        clock, health, dialer.connect, config, kind, "10.0.0.1:80", make_event_log(io.StringIO())
    )
    return clock, health, dialer, check


def _answer(dialer: _Dialer, status: bytes) -> StringTransport:
    protocol, transport = dialer.accept()
    protocol.dataReceived(b"HTTP/1.1 " + status + b" X\r\nContent-Length: 0\r\n\r\n")
    return transport


def test_http_check_sends_a_get_on_a_fresh_connection_and_reads_the_status() -> None:
    clock, health, dialer, check = _check(path="/healthz")
    check.start()
    transport = _answer(dialer, b"200")
    assert transport.value().startswith(b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.1:80\r\n")
    assert transport.disconnecting, "the probe's connection is closed, never pooled"
    assert health.checked_up
    [call] = clock.getDelayedCalls()  # the next probe; the timeout was cancelled
    assert call.getTime() == 5


def test_fall_failures_in_a_row_take_the_server_down_and_rise_bring_it_back() -> None:
    clock, health, dialer, check = _check()
    check.start()
    for _ in range(2):
        _answer(dialer, b"500")
        clock.advance(5)
    assert health.checked_up, "two failures of fall = 3"
    dialer.refuse()
    assert not health.checked_up and not health.available(clock.seconds())
    clock.advance(5)
    _answer(dialer, b"200")
    assert not health.checked_up, "one success of rise = 2"
    clock.advance(5)
    _answer(dialer, b"200")
    assert health.checked_up and health.available(clock.seconds())


def test_a_probe_that_gets_no_answer_fails_at_timeout() -> None:
    clock, health, dialer, check = _check(fall=1)
    check.start()
    _, transport = dialer.accept()
    clock.advance(2)
    assert not health.checked_up
    assert transport.disconnecting  # aborted
    clock.advance(5)
    assert len(dialer.attempts) == 2, "the next probe after interval"


def test_a_connect_that_hangs_is_cancelled_at_timeout() -> None:
    clock, health, dialer, check = _check(fall=1)
    check.start()
    clock.advance(2)
    assert dialer.attempts[0][1].called  # cancelled
    assert not health.checked_up


def test_tcp_check_is_a_connect() -> None:
    clock, health, dialer, check = _check("tcp", fall=1, rise=1)
    check.start()
    dialer.refuse()
    assert not health.checked_up
    clock.advance(5)
    _, transport = dialer.accept()
    assert transport.value() == b"" and transport.disconnecting
    assert health.checked_up


def test_stop_leaves_no_timer_and_aborts_the_probe() -> None:
    clock, _, dialer, check = _check()
    check.start()
    _, transport = dialer.accept()
    check.stop()
    assert clock.getDelayedCalls() == []
    assert transport.disconnecting


def test_the_router_runs_checks_until_closed_and_hands_them_over_on_reload() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from persistproxy.upstream.group import Router

    reactor = MemoryReactorClock()
    check = HealthCheckConfig(interval=5, timeout=2)
    configs = {
        "app": UpstreamConfig(name="app", servers=(("127.0.0.1", 1),), health_check=check),
        "api": UpstreamConfig(name="api", servers=(("127.0.0.1", 2),), health_check=check),
    }
    log = make_event_log(io.StringIO())
    router = Router(reactor, configs, log)
    assert reactor.tcpClients == [], "nothing probes before start_checks"
    router.start_checks()
    assert sorted(c[1] for c in reactor.tcpClients) == [1, 2]
    changed = {**configs, "api": UpstreamConfig(name="api", servers=(("127.0.0.1", 3),))}
    successor = Router(reactor, changed, log, previous=router)
    assert successor.checks["app"] is router.checks["app"], "unchanged: the same checks go on"
    assert "api" not in successor.checks
    router.retire_replaced(successor)
    successor.start_checks()
    assert len(reactor.tcpClients) == 2, "the running check is not started twice"
    reactor.advance(2)  # the probes time out (the memory reactor never connects)
    reactor.advance(5)
    assert sorted(c[1] for c in reactor.tcpClients[2:]) == [1], "api's check was stopped"
    successor.close()
    reactor.advance(60)
    assert len(reactor.tcpClients) == 3
    assert [c for c in reactor.getDelayedCalls() if c.active()] == []
