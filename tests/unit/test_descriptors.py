"""
The descriptor budget with fakes: the start-up arithmetic (raise the soft limit as far as
needed, reserve, what fits, the warning), holding and resuming every listener at the budget,
idle upstream connections given back under pressure, a connect that finds no descriptor
answered 503 with Retry-After, and a port whose accept() finds none backing off instead of
spinning or dropping the clients waiting in its backlog.
"""

from __future__ import annotations

import errno
import io
import json
import socket
from typing import Any

import pytest
from fakes import FakeOrigin, parse_response
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectBindError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from persistproxy.config import ListenerConfig, UpstreamConfig, parse_config
from persistproxy.descriptors import (
    PER_CONNECTION,
    RESERVE_SLACK,
    DescriptorBudget,
    ProcessDescriptors,
    out_of_descriptors,
)
from persistproxy.http.client_connection import ClientConnection
from persistproxy.http.context import ListenerContext
from persistproxy.http.upstream_connection import UpstreamConnection
from persistproxy.listener.admission import ConnectionRegistry, ListenerFactory
from persistproxy.listener.limits import HOLD, ConnectionLimits
from persistproxy.logs import make_event_log
from persistproxy.metrics import ListenerStats
from persistproxy.net.accept import ACCEPT_RETRY, ProxyPort
from persistproxy.net.reactor import ProxyReactor
from persistproxy.service import ProxyService
from persistproxy.tap import protocol_plugins
from persistproxy.upstream.group import Server, UpstreamGroup

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Log:
    """An event log in memory, read back as dicts."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.log = make_event_log(self.stream, "debug")

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [e for e in lines if e.get("event") == name]


class FakeProcess:
    def __init__(self, soft: int, hard: int, open_now: int, refuse: bool = False) -> None:
        self.soft = soft
        self.hard = hard
        self.open_now = open_now
        self.refuse = refuse
        self.set_to: list[int] = []

    def limits(self) -> tuple[int, int]:
        return self.soft, self.hard

    def set_soft(self, soft: int) -> None:
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.set_to.append(soft)
        self.soft = soft

    def count_open(self) -> int:
        return self.open_now


# -- what exhaustion looks like ------------------------------------------------------------


def test_out_of_descriptors_reads_the_errno_of_oserrors_and_twisteds_connect_errors() -> None:
    assert out_of_descriptors(OSError(errno.EMFILE, "Too many open files"))
    assert out_of_descriptors(OSError(errno.ENFILE, "Too many open files in system"))
    # What TCP4ClientEndpoint fails with when socket() finds no descriptor.
    assert out_of_descriptors(ConnectBindError(errno.EMFILE, "Too many open files"))
    assert not out_of_descriptors(ConnectionRefusedError("connection refused"))
    assert not out_of_descriptors(OSError(errno.ECONNRESET, "reset"))
    assert not out_of_descriptors(ValueError("no errno"))


def test_the_real_process_reports_its_limits_and_open_descriptors() -> None:
    soft, hard = ProcessDescriptors().limits()
    assert 0 < soft <= hard
    before = ProcessDescriptors().count_open()
    extra = socket.socket()
    try:
        assert ProcessDescriptors().count_open() == before + 1
    finally:
        extra.close()


# -- start-up arithmetic ---------------------------------------------------------------------


def test_start_raises_the_soft_limit_as_far_as_max_connections_need() -> None:
    log = Log()
    budget = DescriptorBudget(log.log)
    process = FakeProcess(soft=1024, hard=524288, open_now=10)
    budget.start(process, 10000)
    reserve = 10 + RESERVE_SLACK
    assert process.set_to == [reserve + PER_CONNECTION * 10000]
    assert budget.reserve == reserve and budget.fits == 10000
    [nofile] = log.events("descriptors.nofile")
    assert (nofile["nofile_soft"], nofile["nofile_hard"], nofile["soft_at_start"]) == (
        20074,
        524288,
        1024,
    )
    assert log.events("descriptors.budget")[0]["fits"] == 10000
    assert log.events("descriptors.budget_short") == [], "everything fits: no warning"


def test_start_stops_at_the_hard_limit_and_warns_with_the_numbers() -> None:
    log = Log()
    budget = DescriptorBudget(log.log)
    process = FakeProcess(soft=1024, hard=4096, open_now=8)
    budget.start(process, 10000)
    assert process.set_to == [4096]
    [short] = log.events("descriptors.budget_short")
    assert short["level"] == "warning"
    expected_fits = (4096 - 8 - RESERVE_SLACK) // PER_CONNECTION
    assert {k: short[k] for k in ("nofile_soft", "nofile_hard", "reserve", "fits")} == {
        "nofile_soft": 4096,
        "nofile_hard": 4096,
        "reserve": 8 + RESERVE_SLACK,
        "fits": expected_fits,
    }
    assert short["max_connections"] == 10000 and short["per_connection"] == 2
    assert budget.fits == expected_fits


def test_start_never_lowers_the_soft_limit() -> None:
    budget = DescriptorBudget(Log().log)
    process = FakeProcess(soft=65536, hard=65536, open_now=10)
    budget.start(process, 100)
    assert process.set_to == []
    assert budget.fits == (65536 - 10 - RESERVE_SLACK) // 2


def test_an_unlimited_listener_raises_to_the_hard_limit_and_warns() -> None:
    log = Log()
    budget = DescriptorBudget(log.log)
    process = FakeProcess(soft=1024, hard=8192, open_now=10)
    budget.start(process, None)
    assert process.set_to == [8192]
    [short] = log.events("descriptors.budget_short")
    assert short["max_connections"] is None


def test_a_refused_raise_is_logged_and_the_budget_uses_the_soft_limit_it_has() -> None:
    log = Log()
    budget = DescriptorBudget(log.log)
    budget.start(FakeProcess(soft=200, hard=4096, open_now=8, refuse=True), 10000)
    [failed] = log.events("descriptors.raise_failed")
    assert failed["nofile_soft"] == 200 and failed["wanted"] == 4096
    assert budget.fits == (200 - 8 - RESERVE_SLACK) // 2
    assert log.events("descriptors.budget_short")[0]["nofile_soft"] == 200


def test_without_start_there_is_no_budget() -> None:
    budget = DescriptorBudget()
    for _ in range(100000):
        budget.admitted()
        budget.upstream_opening()
    assert budget.has_room() and not budget.pressed()
    assert budget.shed == 0


def test_the_service_starts_the_budget_with_every_listeners_max_connections() -> None:
    def service(*max_connections: int) -> tuple[ProxyService, FakeProcess]:
        doc = {
            "listener": [
                {"name": f"l{i}", "bind": "tcp:0", "upstream": "app", "max_connections": n}
                for i, n in enumerate(max_connections)
            ],
            "upstream": [{"name": "app", "servers": ["127.0.0.1:1"]}],
        }
        plugins = protocol_plugins()
        config = parse_config(doc, "<test>", {n: p.validate for n, p in plugins.items()})
        process = FakeProcess(soft=1024, hard=1 << 20, open_now=10)
        return (
            ProxyService(Clock(), config, plugins, Log().log, process=process),
            process,
        )

    proxy, process = service(100, 300)
    assert proxy.budget.fits == 0, "no budget before start"
    proxy.startService()
    assert process.set_to == []  # 1024 is enough for 400 connections
    assert proxy.budget.fits == (1024 - 10 - RESERVE_SLACK) // 2
    proxy, process = service(100, 0)
    proxy.startService()
    assert process.set_to == [1 << 20], "an unlimited listener wants all it can get"


# -- holding and resuming listeners at the budget ------------------------------------------


class FakePort:
    reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class Held:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.served = False

    def unhold(self) -> None:
        self.served = True


def _listeners(
    log: Log, fits: int, *max_connections: int
) -> tuple[DescriptorBudget, list[ConnectionLimits]]:
    budget = DescriptorBudget(log.log)
    budget.configure(nofile=fits * PER_CONNECTION + 10, reserve=10)
    assert budget.fits == fits
    limits = []
    for i, n in enumerate(max_connections):
        lim = ConnectionLimits(f"l{i}", n, 0, 0, log.log, ListenerStats(), budget)
        lim.port = FakePort()
        limits.append(lim)
    return budget, limits


def test_the_budget_holds_every_listener_and_frees_them_when_a_client_leaves() -> None:
    log = Log()
    budget, (a, b) = _listeners(log, 3, 100, 100)
    assert a.admit("10.0.0.1") is None
    assert b.admit("10.0.0.2") is None
    assert a.port.reading and b.port.reading
    assert a.admit("10.0.0.3") is None  # the third fills the budget: both listeners stop
    assert not a.port.reading and not b.port.reading
    full = log.events("listener.full")
    assert {(e["listener"], e["reason"], e["budget_fits"]) for e in full} == {
        ("l0", "descriptors", 3),
        ("l1", "descriptors", 3),
    }
    # Accepted in the same burst as the one that filled it: waits unread.
    assert b.admit("10.0.0.4") == HOLD
    held = Held("10.0.0.4")
    b.hold(held)
    a.release("10.0.0.1")  # a slot frees on l0: l1's held connection takes it
    assert held.served and budget.clients == 3
    assert not a.port.reading and not b.port.reading
    b.release("10.0.0.4")  # frees again, nobody waits: both read their ports again
    assert a.port.reading and b.port.reading
    assert budget.clients == 2
    assert len(log.events("listener.accepting")) == 2


def test_a_listeners_own_max_connections_still_holds_it_alone() -> None:
    log = Log()
    _budget, (a, b) = _listeners(log, 10, 1, 100)
    assert a.admit("10.0.0.1") is None
    assert not a.port.reading and b.port.reading
    assert log.events("listener.full")[0]["reason"] == "max_connections"
    a.release("10.0.0.1")
    assert a.port.reading


def test_refused_connections_count_while_they_linger() -> None:
    """A flood of refused connections holds descriptors for the refusal's linger: they
    count, so they cannot take the descriptors of admitted clients."""
    log = Log()
    clock = Clock()
    budget = DescriptorBudget(log.log)
    budget.configure(nofile=2 * PER_CONNECTION + 10, reserve=10)
    limits = ConnectionLimits("web", 100, 1, 0, log.log, ListenerStats(), budget)
    limits.port = FakePort()
    factory = ListenerFactory(
        Factory.forProtocol(Protocol),
        clock,
        limits,
        ListenerStats(),
        ConnectionRegistry(),
        lambda reason: b"HTTP/1.1 503 x\r\n\r\n",
    )
    address = IPv4Address("TCP", "10.0.0.1", 1)
    first = factory.buildProtocol(address)
    first.makeConnection(StringTransport())  # type: ignore[union-attr]
    refused = factory.buildProtocol(address)
    refused.makeConnection(StringTransport())  # type: ignore[union-attr]
    assert budget.clients == 2 and not limits.port.reading
    refused.connectionLost(None)  # type: ignore[union-attr, arg-type]
    assert budget.clients == 1 and limits.port.reading


# -- idle upstream connections given back under pressure -----------------------------------


class FakePool:
    def __init__(self, *idle_since: float) -> None:
        self.idle = sorted(idle_since)
        self.shed: list[float] = []

    def oldest_idle_since(self) -> float | None:
        return self.idle[0] if self.idle else None

    def shed_oldest_idle(self) -> None:
        self.shed.append(self.idle.pop(0))


def test_an_upstream_connect_past_the_budget_closes_the_oldest_idle_connection() -> None:
    budget = DescriptorBudget()
    budget.configure(nofile=10 + 10, reserve=10)  # capacity 10, fits 5
    young, old = FakePool(50.0, 60.0), FakePool(20.0, 70.0)
    budget.add_pool(young)
    budget.add_pool(old)
    for _ in range(4):
        budget.admitted()
    for _ in range(6):
        budget.upstream_opening()  # 4 clients + 6 upstream = 10: within the budget
    assert young.shed == old.shed == []
    budget.upstream_opening()
    assert old.shed == [20.0] and young.shed == [], "the oldest idle of all pools"
    budget.upstream_closed()  # its socket is gone a moment later
    budget.upstream_opening()
    assert young.shed == [50.0]
    assert budget.shed == 2


def test_an_admission_past_the_budget_gives_an_idle_connection_back() -> None:
    budget = DescriptorBudget()
    budget.configure(nofile=10 + 10, reserve=10)  # capacity 10, fits 5
    pool = FakePool(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    budget.add_pool(pool)
    for _ in range(8):
        budget.upstream_opening()
    budget.admitted()
    budget.admitted()
    assert pool.shed == []
    budget.admitted()  # 3 clients + 8 idle upstream > 10
    assert pool.shed == [1.0]
    assert budget.pressed()


def _budget_group(
    budget: DescriptorBudget, connect: Any = None
) -> tuple[Clock, FakeOrigin, UpstreamGroup[UpstreamConnection], Log]:
    clock = Clock()
    log = Log()
    config = UpstreamConfig(name="app", servers=(("127.0.0.1", 8081),))
    origin = FakeOrigin(clock, config)
    group: UpstreamGroup[UpstreamConnection] = UpstreamGroup(
        clock,
        config,
        [Server("127.0.0.1", 8081, None)],  # type: ignore[arg-type]
        log.log,
        lambda server: connect or origin.connector(server.host, server.port),
        budget,
    )
    return clock, origin, group, log


class Waiter:
    def __init__(self) -> None:
        self.cancelled = False
        self.got: list[UpstreamConnection] = []
        self.failed: list[tuple[str, int]] = []

    def connection_ready(self, connection: UpstreamConnection, reused: bool) -> None:
        self.got.append(connection)

    def connection_failed(self, reason: str, status: int) -> None:
        self.failed.append((reason, status))


def _take(pool: Any) -> UpstreamConnection:
    waiter = Waiter()
    pool.acquire(waiter)
    [connection] = waiter.got
    return connection


def test_the_pool_counts_its_sockets_and_sheds_its_oldest_idle_one() -> None:
    budget = DescriptorBudget()
    budget.configure(nofile=4 + 10, reserve=10)  # capacity 4, fits 2
    clock, origin, group, _ = _budget_group(budget)
    pool = group.pools[0]
    a, b, c = _take(pool), _take(pool), _take(pool)
    assert budget.upstream == 3
    pool.release(a, True)
    clock.advance(1)
    pool.release(b, True)
    assert pool.idle == 2
    budget.admitted()  # 1 client + 3 upstream = 4: room still
    assert not a.transport.disconnecting  # type: ignore[union-attr]
    budget.admitted()  # 5 > 4: the oldest idle one (a) goes
    assert a.transport.disconnecting and not b.transport.disconnecting  # type: ignore[union-attr]
    assert pool.idle == 1
    origin.close(0)  # a's socket closes
    assert budget.upstream == 2
    # Still over budget? no: 2 clients + 2 upstream. A connection coming back is kept...
    pool.release(c, True)
    assert pool.idle == 2
    # ...but not when over: one more client makes 5.
    d = _take(pool)
    budget.admitted()  # sheds b, the oldest idle
    assert b.transport.disconnecting  # type: ignore[union-attr]
    assert budget.pressed()  # b's socket is still open until the reactor turns
    pool.release(d, True)
    assert d.transport.disconnecting, "over budget: closed, not pooled"  # type: ignore[union-attr]


def test_a_connect_without_a_descriptor_is_a_503_and_gives_an_idle_connection_back() -> None:
    budget = DescriptorBudget()
    calls: list[Deferred[Any]] = []

    def connect() -> Deferred[Any]:
        d = fail(ConnectBindError(errno.EMFILE, "Too many open files"))
        calls.append(d)
        return d

    _clock, _origin, group, log = _budget_group(budget, connect)
    pool = group.pools[0]
    shed: list[bool] = []
    budget.shed_idle = lambda: shed.append(True) or False  # type: ignore[method-assign]
    waiter = Waiter()
    pool.acquire(waiter)
    [(reason, status)] = waiter.failed
    assert status == 503 and "Too many open files" in reason
    assert shed == [True]
    assert budget.upstream == 0 and pool.active == 0
    [event] = log.events("upstream.connect_failed")
    assert event["out_of_descriptors"] is True and "Too many open files" in event["reason"]


def test_other_connect_failures_stay_502() -> None:
    budget = DescriptorBudget()
    _clock, _origin, group, log = _budget_group(
        budget, lambda: fail(ConnectionRefusedError("connection refused"))
    )
    waiter = Waiter()
    group.pools[0].acquire(waiter)
    assert [status for _, status in waiter.failed] == [502]
    assert log.events("upstream.connect_failed")[0]["out_of_descriptors"] is False


def test_the_client_of_a_connect_without_descriptor_gets_503_with_retry_after() -> None:
    budget = DescriptorBudget()
    clock, _origin, group, log = _budget_group(
        budget, lambda: fail(ConnectBindError(errno.EMFILE, "Too many open files"))
    )
    config = ListenerConfig(name="web", bind="tcp:0", upstream="app", access_log=False)
    ctx = ListenerContext(
        config=config, clock=clock, group=group, log=log.log, stats=ListenerStats()
    )
    client = ClientConnection(ctx)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
    client.makeConnection(transport)
    client.dataReceived(GET)
    status, headers, _ = parse_response(transport.value())
    assert status == 503 and headers[b"retry-after"] == [b"1"]
    assert not transport.disconnecting, "the client connection is kept: it may retry"


# -- the accept loop -----------------------------------------------------------------------


class _Exhausted:
    """A listening socket whose accept() finds no descriptor."""

    def __init__(self) -> None:
        self.calls = 0

    def _accept(self) -> Any:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")


def test_accept_without_a_descriptor_backs_off_instead_of_spinning() -> None:
    reactor = ProxyReactor()
    made: list[Any] = []
    factory = Factory.forProtocol(Protocol)
    factory.buildProtocol = lambda addr: made.append(addr) or Protocol()  # type: ignore[method-assign]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    real = port.socket
    address = port.getHost()
    waiting = socket.create_connection((address.host, address.port))
    try:
        port.socket = _Exhausted()  # type: ignore[assignment]
        port.doRead()
        assert port.socket.calls == 1  # type: ignore[attr-defined]
        assert port not in reactor.getReaders(), "not read again at the next turn"
        [retry] = reactor.getDelayedCalls()
        assert retry.getTime() - reactor.seconds() == pytest.approx(ACCEPT_RETRY, abs=0.05)
        port.startReading()  # the listener has room again: still waits for the retry
        assert port not in reactor.getReaders()
        port.socket = real
        retry.func()  # type: ignore[attr-defined]
        retry.cancel()
        assert port in reactor.getReaders()
        port.doRead()  # the client that waited in the backlog is accepted, not dropped
        assert len(made) == 1
    finally:
        port.socket = real
        waiting.close()
        port.stopListening()


def test_a_retry_after_the_owner_stopped_the_port_leaves_it_stopped() -> None:
    reactor = ProxyReactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    real = port.socket
    try:
        port.socket = _Exhausted()  # type: ignore[assignment]
        port.doRead()
        port.stopReading()  # full meanwhile
        [retry] = reactor.getDelayedCalls()
        retry.func()  # type: ignore[attr-defined]
        retry.cancel()
        assert port not in reactor.getReaders()
    finally:
        port.socket = real
        port.stopListening()


def test_the_accept_loop_ends_when_the_listener_stops_reading() -> None:
    """Connections past the limit stay in the backlog instead of each holding a
    descriptor while it waits."""
    reactor = ProxyReactor()
    made: list[Any] = []
    port: ProxyPort

    def build(addr: Any) -> Protocol:
        made.append(addr)
        port.stopReading()  # the limit is reached with this one
        return Protocol()

    factory = Factory.forProtocol(Protocol)
    factory.buildProtocol = build  # type: ignore[method-assign]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    address = port.getHost()
    clients = [socket.create_connection((address.host, address.port)) for _ in range(3)]
    try:
        port.numberAccepts = 10
        port.doRead()
        assert len(made) == 1
        port.startReading()
        port.doRead()
        assert len(made) == 2
    finally:
        for client in clients:
            client.close()
        port.stopListening()


def test_a_closed_port_is_not_read_again_when_its_listener_frees() -> None:
    """During the drain, connections closing free their listener, which resumes the port it
    stopped when it was full: the port has stopped listening by then."""
    reactor = ProxyReactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    port.stopReading()  # full
    port.stopListening()  # the drain starts
    port.startReading()  # a connection closes: room again
    assert port not in reactor.getReaders()
    for call in reactor.getDelayedCalls():  # the port closes
        func, args, kw = call.func, call.args, call.kw  # type: ignore[attr-defined]
        call.cancel()
        func(*args, **kw)
    assert not port.connected
    port.startReading()
    assert port not in reactor.getReaders()
