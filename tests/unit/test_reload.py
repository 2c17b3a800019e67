"""
Reload in place, with an in-memory reactor: listeners bound, switched, re-bound and drained by
name; upstream groups swapped for the next request while a request in flight finishes on its
old pool; all or nothing when a port cannot be bound; and the SIGHUP reloader, which keeps the
running configuration when the file is invalid, never overlaps two reloads, and tells systemd.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import OK_RESPONSE, HalfCloseTransport, parse_response
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport

from persistproxy.config import ConfigError, ProxyConfig, parse_config
from persistproxy.http.upstream_connection import UpstreamConnection
from persistproxy.logs import make_event_log
from persistproxy.notify import SystemdNotifier
from persistproxy.reload import ConfigReloader
from persistproxy.service import ProxyService, ReloadError
from persistproxy.tap import protocol_plugins
from persistproxy.tls.reload import CertificateReloader

PLUGINS = protocol_plugins()
GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"


def config(
    listeners: list[dict[str, Any]],
    servers: list[str] | None = None,
    **top: Any,
) -> ProxyConfig:
    doc = {
        "listener": [{"upstream": "app", **lc} for lc in listeners],
        "upstream": [{"name": "app", "servers": servers or ["127.0.0.1:1"]}],
        **top,
    }
    return parse_config(doc, "<test>", {n: p.validate for n, p in PLUGINS.items()})


class Reactor(MemoryReactorClock):
    """Records binds and closes in order; refuses the ports in C{refuse}."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: set[int] = set()
        self.order: list[str] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.refuse:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        listening = super().listenTCP(port, factory, backlog, interface)
        listening.factory = factory
        listening.reading = True
        listening.stopReading = lambda: setattr(listening, "reading", False)
        listening.startReading = lambda: setattr(listening, "reading", True)
        self.order.append(f"listen {port}")
        stop = listening.stopListening

        def stopped() -> Any:
            self.order.append(f"close {port}")
            return stop()

        listening.stopListening = stopped
        return listening


class Origins:
    """
    Upstream endpoints in memory: each connection is an UpstreamConnection on a
    StringTransport, recorded under the port it was dialled on.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.connections: list[tuple[int, UpstreamConnection]] = []

    def wrap(self, endpoint: Any, host: str) -> Any:
        port = endpoint._port
        origins = self

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                protocol = factory.buildProtocol(None)
                protocol.makeConnection(StringTransport())
                origins.connections.append((port, protocol))
                return succeed(protocol)

        return Endpoint()

    def on(self, port: int) -> list[UpstreamConnection]:
        return [c for p, c in self.connections if p == port]


class Proxy:
    def __init__(self, first: ProxyConfig) -> None:
        self.reactor = Reactor()
        self.stream = io.StringIO()
        self.origins = Origins(self.reactor)
        self.service = ProxyService(
            self.reactor,
            first,
            PLUGINS,
            make_event_log(self.stream, "debug"),
            upstream_tls=self.origins.wrap,
        )
        self.service.startService()
        self.service.privilegedStartService()

    def accept(self, listener: str) -> tuple[Any, HalfCloseTransport]:
        """A client connection accepted by the listener's port, as the reactor would."""
        [service] = [s for s in self.service.listeners if s.config.name == listener]
        assert service.port is not None
        protocol = service.port.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1234))
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1234))
        protocol.makeConnection(transport)
        return protocol, transport

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [e for e in lines if e["event"] == name]


def test_a_new_listener_binds_a_removed_one_drains_and_the_rest_is_untouched() -> None:
    p = Proxy(config([{"name": "web", "bind": "tcp:8001"}, {"name": "old", "bind": "tcp:8002"}]))
    web, _old = p.service.listeners
    web_port = web.port
    idle, idle_transport = p.accept("old")
    idle.dataReceived(GET)
    p.origins.connections[-1][1].dataReceived(OK_RESPONSE)  # answered: idle, kept alive
    idle_transport.clear()
    busy, busy_transport = p.accept("old")
    busy.dataReceived(GET)  # in flight upstream
    p.reactor.order.clear()

    summary = p.service.reload(
        config(
            [{"name": "web", "bind": "tcp:8001"}, {"name": "new", "bind": "tcp:8003"}],
            drain_timeout=7,
        )
    )

    assert (summary.listeners_added, summary.listeners_removed) == (["new"], ["old"])
    assert summary.listeners_changed == [] and summary.upstreams_changed == []
    assert p.reactor.order == ["listen 8003", "close 8002"]
    assert p.service.listeners[0] is web and web.port is web_port
    budgeted = p.service.budget._listeners
    assert [limits.listener for limits in budgeted] == ["web", "new"], "old leaves the budget"
    assert [s.config.name for s in p.service.listeners] == ["web", "new"]
    # The removed listener's idle connection closes at once; the busy one finishes first.
    assert idle_transport.write_closed and not busy_transport.write_closed
    [draining] = p.events("listener.draining")
    # (Both still open: the idle one lingers until the client has read our FIN.)
    assert (draining["listener"], draining["open_connections"], draining["timeout"]) == (
        "old",
        2,
        7,
    )
    # ... and its response says Connection: close, as in a drain.
    [(_port, upstream)] = p.origins.connections
    assert upstream.transport.value().count(b"GET /a") == 2  # type: ignore[attr-defined]
    upstream.dataReceived(OK_RESPONSE)
    _, headers, _ = parse_response(busy_transport.value())
    assert headers[b"connection"] == [b"close"]
    assert busy_transport.write_closed
    # The new listener's connections are not draining.
    fresh, fresh_transport = p.accept("new")
    fresh.dataReceived(GET)
    p.origins.connections[-1][1].dataReceived(OK_RESPONSE)
    _, headers, _ = parse_response(fresh_transport.value())
    assert b"connection" not in headers and not fresh_transport.write_closed


def test_a_removed_listener_that_does_not_drain_in_time_is_cut() -> None:
    p = Proxy(config([{"name": "web", "bind": "tcp:8001"}, {"name": "old", "bind": "tcp:8002"}]))
    busy, transport = p.accept("old")
    busy.dataReceived(GET)
    p.service.reload(config([{"name": "web", "bind": "tcp:8001"}], drain_timeout=5))
    p.reactor.advance(4.9)
    assert not transport.disconnecting
    p.reactor.advance(0.2)
    assert transport.disconnecting
    assert p.events("listener.drain_timeout")[0]["open_connections"] == 1


def test_a_changed_listener_keeps_its_port_and_new_connections_get_the_new_settings() -> None:
    p = Proxy(config([{"name": "web", "bind": "tcp:8001", "max_connections": 10}]))
    [web] = p.service.listeners
    port = web.port
    before, _ = p.accept("web")
    summary = p.service.reload(
        config([{"name": "web", "bind": "tcp:8001", "keepalive_timeout": 5, "max_connections": 1}])
    )
    assert summary.listeners_changed == ["web"]
    assert p.service.listeners == [web] and web.port is port
    assert p.reactor.order == ["listen 8001"], "no rebind"
    after, _ = p.accept("web")
    assert after.inner._ctx.config.keepalive_timeout == 5
    assert before.inner._ctx.config.keepalive_timeout == 75, "open connections keep theirs"
    # The new limit applies to the connections counted already: two are open, one allowed.
    third, _ = p.accept("web")
    assert third.held and not web.port.reading  # type: ignore[union-attr]


def test_a_changed_bind_is_bound_before_the_old_port_closes() -> None:
    p = Proxy(config([{"name": "web", "bind": "tcp:8001"}]))
    [web] = p.service.listeners
    open_before, transport = p.accept("web")
    p.reactor.order.clear()
    p.service.reload(config([{"name": "web", "bind": "tcp:8004"}]))
    assert p.reactor.order == ["listen 8004", "close 8001"]
    [new] = p.service.listeners
    assert new is not web and web.port is None
    # The connection accepted on the old port goes on (it is not drained).
    open_before.dataReceived(GET)
    p.origins.connections[-1][1].dataReceived(OK_RESPONSE)
    _, headers, _ = parse_response(transport.value())
    assert b"connection" not in headers


def test_a_port_that_cannot_be_bound_changes_nothing() -> None:
    first = config([{"name": "web", "bind": "tcp:8001"}])
    p = Proxy(first)
    listeners, router = list(p.service.listeners), p.service.router
    p.reactor.order.clear()
    p.reactor.refuse.add(8006)
    with pytest.raises(ReloadError, match=r"listener\.b\.bind: cannot listen on 'tcp:8006'"):
        p.service.reload(
            config(
                [
                    {"name": "web", "bind": "tcp:8001", "add_via": False},
                    {"name": "a", "bind": "tcp:8005"},
                    {"name": "b", "bind": "tcp:8006"},
                ],
                servers=["127.0.0.1:2"],
            )
        )
    assert p.reactor.order == ["listen 8005", "close 8005"], "what it bound is closed again"
    assert p.service.listeners == listeners and p.service.config is first
    assert p.service.router is router
    assert set(p.service.proxy_stats.listeners) == {"web"}
    assert [limits.listener for limits in p.service.budget._listeners] == ["web"]
    client, _ = p.accept("web")
    client.dataReceived(GET)
    assert p.origins.connections[-1][0] == 1
    assert b"Via:" in p.origins.connections[-1][1].transport.value()  # type: ignore[attr-defined]


def test_a_moved_upstream_takes_the_next_request_and_the_old_pool_closes_behind() -> None:
    p = Proxy(config([{"name": "web", "bind": "tcp:8001"}], servers=["127.0.0.1:1"]))
    in_flight, in_flight_transport = p.accept("web")
    in_flight.dataReceived(GET)
    kept_alive, kept_alive_transport = p.accept("web")
    kept_alive.dataReceived(GET)
    first, second = p.origins.on(1)
    second.dataReceived(OK_RESPONSE)
    assert parse_response(kept_alive_transport.value())[0] == 200
    assert not second.transport.disconnecting, "pooled, idle"  # type: ignore[union-attr]

    moved_away = config([{"name": "web", "bind": "tcp:8001"}], servers=["127.0.0.1:2"])
    summary = p.service.reload(moved_away)

    assert summary.upstreams_changed == ["app"]
    assert second.transport.disconnecting, "the old pool's idle connection closes at once"  # type: ignore[union-attr]
    assert [pool.address for pool in p.service.budget._pools] == [], "nothing idle to shed"
    # The request in flight finishes on its old connection, which then closes.
    first.dataReceived(OK_RESPONSE)
    assert parse_response(in_flight_transport.value())[0] == 200
    assert first.transport.disconnecting  # type: ignore[union-attr]
    # The next request on a connection accepted before the reload goes to the new server.
    kept_alive_transport.clear()
    kept_alive.dataReceived(GET)
    [moved] = p.origins.on(2)
    assert moved.transport.value().startswith(b"GET /a")  # type: ignore[attr-defined]
    moved.dataReceived(OK_RESPONSE)
    assert parse_response(kept_alive_transport.value())[0] == 200
    assert not moved.transport.disconnecting  # type: ignore[union-attr]
    assert [g.pools[0].address for g in p.service.router.groups] == ["127.0.0.1:2"]


def test_an_unchanged_upstream_keeps_its_warm_pool() -> None:
    p = Proxy(config([{"name": "web", "bind": "tcp:8001"}]))
    client, transport = p.accept("web")
    client.dataReceived(GET)
    [upstream] = p.origins.on(1)
    upstream.dataReceived(OK_RESPONSE)
    groups = p.service.router.groups
    summary = p.service.reload(config([{"name": "web", "bind": "tcp:8001", "add_via": False}]))
    assert summary.upstreams_changed == [] and summary.listeners_changed == ["web"]
    assert p.service.router.groups == groups
    assert not upstream.transport.disconnecting  # type: ignore[union-attr]
    transport.clear()
    client.dataReceived(GET)
    assert len(p.origins.connections) == 1, "the pooled connection is reused"


def test_a_request_queued_on_a_replaced_pool_is_still_served() -> None:
    """max_connections = 1: the second request waits for the first one's connection."""
    doc = {
        "listener": [{"name": "web", "bind": "tcp:8001", "upstream": "app"}],
        "upstream": [{"name": "app", "servers": ["127.0.0.1:1"], "max_connections": 1}],
    }
    validators = {n: p.validate for n, p in PLUGINS.items()}
    p = Proxy(parse_config(doc, "<test>", validators))
    first, first_transport = p.accept("web")
    first.dataReceived(GET)
    queued, queued_transport = p.accept("web")
    queued.dataReceived(GET)
    [upstream] = p.origins.on(1)
    p.service.reload(config([{"name": "web", "bind": "tcp:8001"}], servers=["127.0.0.1:2"]))
    upstream.dataReceived(OK_RESPONSE)
    assert parse_response(first_transport.value())[0] == 200
    assert p.origins.on(1) == [upstream], "handed on, not reopened"
    assert not upstream.transport.disconnecting  # type: ignore[union-attr]
    upstream.dataReceived(OK_RESPONSE)
    assert parse_response(queued_transport.value())[0] == 200
    assert upstream.transport.disconnecting, "then closed: nobody waits any more"  # type: ignore[union-attr]


def test_no_reload_while_draining() -> None:
    p = Proxy(config([{"name": "web", "bind": "tcp:8001"}]))
    p.service.stopService()
    with pytest.raises(ReloadError, match="stopping"):
        p.service.reload(config([{"name": "web", "bind": "tcp:8001"}]))


# -- the reloader -------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def messages(sock: socket.socket) -> list[dict[str, str]]:
    out = []
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return out
        out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))


class Loads:
    """A loader whose results the test hands out."""

    def __init__(self) -> None:
        self.pending: list[Deferred[ProxyConfig]] = []

    def __call__(self) -> Deferred[ProxyConfig]:
        d: Deferred[ProxyConfig] = Deferred()
        self.pending.append(d)
        return d


def reloader(p: Proxy, load: Any, notify: socket.socket | None = None) -> ConfigReloader:
    log = make_event_log(p.stream, "debug")
    notifier = None
    if notify is not None:
        notifier = SystemdNotifier(log, {"NOTIFY_SOCKET": notify.getsockname()})
    return ConfigReloader(
        p.reactor, p.service, load, log, CertificateReloader([], log), notifier, lambda: "fine"
    )


def test_an_invalid_configuration_is_kept_out_with_the_check_line(
    notify_socket: socket.socket,
) -> None:
    first = config([{"name": "web", "bind": "tcp:8001"}])
    p = Proxy(first)
    error = ConfigError("/etc/pp.toml: listener.web.keepalive_timeout: must be >= 0, got -1")
    r = reloader(p, lambda: fail(error), notify_socket)
    outcome: list[bool] = []
    r.reload().addCallback(outcome.append)
    assert outcome == [False]
    [failed] = p.events("config.reload_failed")
    assert failed["error"] == f"persistproxy: {error}", "the line --check prints"
    assert failed["level"] == "error"
    assert p.service.config is first and r.last_error == failed["error"]
    reloading, ready = messages(notify_socket)
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert ready == {"READY": "1", "STATUS": "fine"}


def test_a_valid_configuration_is_applied_and_logged(notify_socket: socket.socket) -> None:
    p = Proxy(config([{"name": "web", "bind": "tcp:8001"}]))
    second = config(
        [{"name": "web", "bind": "tcp:8001"}, {"name": "extra", "bind": "tcp:8002"}],
        servers=["127.0.0.1:2"],
        log={"level": "debug"},
    )
    r = reloader(p, lambda: succeed(second), notify_socket)
    outcome: list[bool] = []
    r.reload().addCallback(outcome.append)
    assert outcome == [True] and p.service.config is second
    [reloaded] = p.events("config.reloaded")
    assert reloaded["listeners_added"] == ["extra"]
    assert reloaded["upstreams_changed"] == ["app"]
    [restart] = p.events("config.restart_needed")
    assert restart["keys"] == ["log.level"]
    assert [m.get("RELOADING", m.get("READY")) for m in messages(notify_socket)] == ["1", "1"]


def test_reloads_never_overlap_and_signals_during_one_make_one_more() -> None:
    p = Proxy(config([{"name": "web", "bind": "tcp:8001"}]))
    loads = Loads()
    r = reloader(p, loads)
    outcomes: list[bool] = []
    for _ in range(3):
        r.reload().addCallback(outcomes.append)
    assert len(loads.pending) == 1
    loads.pending[0].callback(config([{"name": "web", "bind": "tcp:8001", "add_via": False}]))
    assert outcomes == [True] and len(loads.pending) == 2, "one more reload, not two"
    loads.pending[1].callback(config([{"name": "web", "bind": "tcp:8001"}]))
    assert outcomes == [True, True, True]
    assert len(p.events("config.reloaded")) == 2


def test_sighup_schedules_a_reload_on_the_reactor() -> None:
    p = Proxy(config([{"name": "web", "bind": "tcp:8001"}]))
    calls: list[Any] = []
    p.reactor.callFromThread = lambda f, *a: calls.append(f)  # type: ignore[method-assign]
    r = reloader(p, Loads())
    previous = signal.getsignal(signal.SIGHUP)
    r.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert calls == [r.reload]
        # Stopping (the drain) keeps the handler: a SIGHUP then must not end the process.
        r.stopService()
        p.service.stopService()
        os.kill(os.getpid(), signal.SIGHUP)
        assert calls == [r.reload, r.reload]
        calls[-1]()
        [refused] = p.events("config.reload_failed")
        assert refused["error"] == "persistproxy: the proxy is stopping"
        # Given back once the reactor has stopped.
        [(restore, _, _)] = p.reactor.triggers["after"]["shutdown"]
        restore()
    finally:
        r.restore_signal()
    assert signal.getsignal(signal.SIGHUP) == previous


def test_a_tls_listener_keeps_its_session_context_unless_its_tls_table_changed(
    tmp_path: Path,
) -> None:
    from pki import make_pki

    pki = make_pki(tmp_path)
    cert, key = pki.site
    tls = {"certificates": [{"cert": cert, "key": key}]}
    p = Proxy(config([{"name": "web", "bind": "tcp:8001", "tls": tls}]))
    [web] = p.service.listeners
    before = web.tls
    assert before is not None
    summary = p.service.reload(
        config([{"name": "web", "bind": "tcp:8001", "tls": tls, "keepalive_timeout": 5}])
    )
    assert summary.listeners_changed == ["web"] and summary.kept_tls == [before]
    assert web.tls is before, "the session cache and ticket keys survive"
    summary = p.service.reload(
        config(
            [
                {
                    "name": "web",
                    "bind": "tcp:8001",
                    "tls": {**tls, "min_version": "TLSv1.3"},
                    "keepalive_timeout": 5,
                }
            ]
        )
    )
    assert summary.kept_tls == [] and web.tls is not before
    assert web.tls is not None and web.tls.settings.min_version == "TLSv1.3"


def test_a_reload_that_turns_on_proxy_protocol_applies_to_new_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fakes import force_fallback

    from persistproxy.listener.admission import Admitted
    from persistproxy.listener.proxied import HeaderReader
    from persistproxy.net.selfcheck import problem

    p = Proxy(config([{"name": "web", "bind": "tcp:8001"}]))
    before, _ = p.accept("web")
    on = {"name": "web", "bind": "tcp:8001", "proxy_protocol": True}
    on["proxy_protocol_from"] = ["10.0.0.0/8"]
    p.service.reload(config([on]))
    after, _ = p.accept("web")
    assert isinstance(before, Admitted) and isinstance(after, HeaderReader)
    after.dataReceived(b"PROXY TCP4 192.0.2.9 10.0.0.2 5000 80\r\n" + GET)
    sent = p.origins.connections[-1][1].transport.value()  # type: ignore[attr-defined]
    assert b"X-Forwarded-For: 192.0.2.9\r\n" in sent
    # A reload cannot turn it on where Twisted's parsers are not usable: nothing changes.
    force_fallback(monkeypatch, "proxyproto", "no V1Parser")
    try:
        other = {**on, "name": "web", "add_via": False}
        p.service.reload(config([{"name": "web", "bind": "tcp:8001"}]))
        with pytest.raises(ReloadError, match=r"listener\.web\.proxy_protocol: Twisted's PROXY"):
            p.service.reload(config([other]))
    finally:
        monkeypatch.undo()
        problem.cache_clear()
