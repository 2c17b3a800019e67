"""
The tcp protocol plugin (persistproxy.tcp.plugin) in memory: its configuration, a client
connection paused until its upstream connection is made, then relayed; connect failures,
clients that leave first, the drain, the pool's accounting and the access line.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from persistproxy.config import ConfigError, ListenerConfig, UpstreamConfig, parse_config
from persistproxy.interfaces import DrainAware, IProtocolPlugin, ProxyContext, TLSAware
from persistproxy.logs import AccessLog, make_event_log
from persistproxy.metrics import ListenerStats
from persistproxy.tap import protocol_plugins
from persistproxy.tcp.plugin import TCPConnection, TCPConnector, TCPProtocolPlugin, TCPUpstream
from persistproxy.upstream.group import Server, UpstreamGroup


class Transport(StringTransport):
    """A client or upstream transport that records half-closes and aborts."""

    write_closed = False
    aborted = False

    def __init__(self, peer: Any = None) -> None:
        super().__init__(peerAddress=peer, lenient=True)

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class Origin:
    """Connects by hand: each dial waits until the test answers it."""

    def __init__(self) -> None:
        self.pending: list[Deferred[TCPUpstream]] = []
        self.refuse = False
        self.refuse_ports: set[int] = set()
        self.dialled: list[int] = []

    def dialer(self, port: int) -> Any:
        def dial() -> Deferred[TCPUpstream]:
            self.dialled.append(port)
            if port in self.refuse_ports:
                return fail(ConnectionRefusedError("connection refused"))
            return self.dial()

        return dial

    def dial(self) -> Deferred[TCPUpstream]:
        if self.refuse:
            return fail(ConnectionRefusedError("connection refused"))
        d: Deferred[TCPUpstream] = Deferred()
        self.pending.append(d)
        return d

    def answer(self) -> TCPUpstream:
        upstream = TCPUpstream()
        upstream.makeConnection(Transport())
        self.pending.pop(0).callback(upstream)
        return upstream


class Harness:
    def __init__(self, ports: tuple[int, ...] = (9000,), **listener: Any) -> None:
        self.clock = Clock()
        self.out = io.StringIO()
        log = make_event_log(self.out, "debug")
        self.upstream_config = UpstreamConfig(
            name="app", servers=tuple(("127.0.0.1", port) for port in ports)
        )
        self.origin = Origin()
        self.groups: list[UpstreamGroup[Any]] = []
        self.stats = ListenerStats()

        def upstream(name: str, connector: Any) -> UpstreamGroup[Any]:
            assert name == "app" and connector == TCPConnector()
            group: UpstreamGroup[Any] = UpstreamGroup(
                self.clock,
                self.upstream_config,
                [Server("127.0.0.1", port, None) for port in ports],  # type: ignore[arg-type]
                log,
                lambda server: self.origin.dialer(server.port),
            )
            self.groups.append(group)
            return group

        self.context = ProxyContext(
            reactor=self.clock,
            clock=self.clock,
            log=log,
            access_log=AccessLog(self.clock, self.out, buffer_size=0),
            _upstream=upstream,
            _limits={},
            _stats=lambda name: self.stats,
            _draining=lambda: False,
        )
        self.config = ListenerConfig(
            name="relay", bind="tcp:0", protocol="tcp", upstream="app", **listener
        )
        self.factory = TCPProtocolPlugin().build_factory(self.config, self.context)

    @property
    def pool(self) -> Any:
        return self.groups[0].pools[0]

    def client(self) -> tuple[TCPConnection, Transport]:
        address = IPv4Address("TCP", "10.1.2.3", 5555)
        connection = self.factory.buildProtocol(address)
        transport = Transport(address)
        connection.makeConnection(transport)
        return connection, transport

    def access(self) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in self.out.getvalue().splitlines())
        return [line for line in lines if line.get("event") == "access"]


def _lost(protocol: Any, error: type[Exception] = ConnectionDone) -> None:
    protocol.connectionLost(Failure(error()))


# -- the plugin and its configuration --------------------------------------------------------


def test_the_tcp_plugin_is_installed_and_provides_the_interface() -> None:
    plugin = protocol_plugins()["tcp"]
    verifyObject(IProtocolPlugin, plugin)
    assert plugin.refusal("too many connections from your address") == b""
    assert plugin.plaintext_answer == b""


def test_its_client_protocol_is_drain_and_tls_aware() -> None:
    connection, _ = Harness().client()
    assert isinstance(connection, DrainAware) and isinstance(connection, TLSAware)


def _parse(listener: str) -> Any:
    import tomllib

    plugins = protocol_plugins()
    document = tomllib.loads(
        f"""
[[listener]]
name = "relay"
bind = "tcp:0"
protocol = "tcp"
{listener}

[[upstream]]
name = "app"
servers = ["127.0.0.1:9000"]
"""
    )
    return parse_config(document, "t.toml", {n: p.validate for n, p in plugins.items()})


def test_config_a_tcp_listener_needs_an_upstream() -> None:
    with pytest.raises(ConfigError, match=r"^t.toml: listener.relay.upstream: required key"):
        _parse("")


def test_config_tunnel_idle_timeout_defaults_to_an_hour_and_is_checked() -> None:
    assert _parse('upstream = "app"').listeners[0].tunnel_idle_timeout == 3600.0
    assert _parse('upstream = "app"\ntunnel_idle_timeout = 0').listeners[0].tunnel_idle_timeout == 0
    with pytest.raises(ConfigError, match=r"listener.relay.tunnel_idle_timeout: must be >= 0"):
        _parse('upstream = "app"\ntunnel_idle_timeout = -1')
    with pytest.raises(ConfigError, match=r"tunnel_idle_timeout: expected a number of seconds"):
        _parse('upstream = "app"\ntunnel_idle_timeout = "1h"')


def test_config_unknown_keys_and_http_settings_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^t.toml: listener.relay.greeting: unknown key$"):
        _parse('upstream = "app"\ngreeting = "hi"')
    with pytest.raises(
        ConfigError, match=r"listener.relay.keepalive_timeout: an HTTP setting, not used by"
    ):
        _parse('upstream = "app"\nkeepalive_timeout = 5')
    for key in ("min_body_rate", "min_send_rate", "min_body_rate_window", "min_send_rate_window"):
        with pytest.raises(ConfigError, match=rf"listener.relay.{key}: an HTTP setting"):
            _parse(f'upstream = "app"\n{key} = 5')


# -- a relayed connection --------------------------------------------------------------------


def test_the_client_is_not_read_until_a_fresh_upstream_connection_is_made() -> None:
    h = Harness()
    connection, transport = h.client()
    assert transport.producerState == "paused"
    assert h.pool.active == 1 and len(h.origin.pending) == 1
    upstream = h.origin.answer()
    assert transport.producerState == "producing"
    connection.dataReceived(b"hello")
    assert upstream.transport.value() == b"hello"  # type: ignore[union-attr]
    upstream.dataReceived(b"hi there")
    assert transport.value() == b"hi there"


def test_a_second_client_gets_its_own_connection_never_a_pooled_one() -> None:
    h = Harness()
    first, _ = h.client()
    up1 = h.origin.answer()
    first.readConnectionLost()
    up1.readConnectionLost()
    _lost(up1)
    _lost(first)
    assert h.pool.active == 0 and h.pool.idle == 0, "released, closed, never pooled"
    h.client()
    assert len(h.origin.pending) == 1, "dialled again"


def test_the_end_releases_the_connection_and_writes_one_access_line() -> None:
    h = Harness()
    connection, _ = h.client()
    upstream = h.origin.answer()
    connection.dataReceived(b"12345")
    upstream.dataReceived(b"1234567890")
    h.clock.advance(1.5)
    connection.readConnectionLost()
    assert upstream.transport.write_closed  # type: ignore[union-attr]
    upstream.readConnectionLost()
    _lost(upstream)
    _lost(connection)
    assert h.pool.active == 0
    [line] = h.access()
    assert line["listener"] == "relay" and line["protocol"] == "tcp"
    assert line["client"] == "10.1.2.3" and line["upstream"] == "127.0.0.1:9000"
    assert (line["bytes_up"], line["bytes_down"]) == (5, 10)
    assert line["duration_ms"] == 1500.0
    assert line["reason"] == "client_fin"


def test_connect_failure_closes_the_client_with_an_access_line() -> None:
    h = Harness()
    h.origin.refuse = True
    connection, transport = h.client()
    assert transport.disconnecting
    _lost(connection)
    [line] = h.access()
    assert line["reason"] == "connect_failed"
    assert "connection refused" in line["error"]
    assert (line["bytes_up"], line["bytes_down"]) == (0, 0)
    assert h.stats.upstream_errors == 1
    assert h.pool.active == 0


def test_a_connect_failure_goes_to_the_next_server() -> None:
    h = Harness(ports=(9000, 9001))
    h.origin.refuse_ports = {9000}
    connection, transport = h.client()
    assert h.origin.dialled == [9000, 9001]
    assert not transport.disconnecting
    h.origin.answer()
    assert connection.state == "RELAYING"
    # 9000 is down now (max_fails = 1): the next client goes straight to 9001.
    h.client()
    assert h.origin.dialled == [9000, 9001, 9001]
    assert h.stats.upstream_errors == 0


def test_every_server_refusing_closes_the_client_after_one_try_each() -> None:
    h = Harness(ports=(9000, 9001))
    h.origin.refuse_ports = {9000, 9001}
    _, transport = h.client()
    assert h.origin.dialled == [9000, 9001]
    assert transport.disconnecting
    assert h.stats.upstream_errors == 1


def test_a_client_gone_before_the_connect_cancels_its_wait() -> None:
    h = Harness()
    connection, _ = h.client()
    _lost(connection)
    assert connection.cancelled
    upstream = h.origin.answer()
    assert upstream.transport.disconnecting, "the pool closes what nobody waits for"  # type: ignore[union-attr]
    _lost(upstream)
    assert h.pool.active == 0 and h.pool.idle == 0
    [line] = h.access()
    assert line["reason"] == "client_fin"


def test_idle_timeout_is_the_listeners_and_counts() -> None:
    h = Harness(tunnel_idle_timeout=30)
    connection, transport = h.client()
    upstream = h.origin.answer()
    h.clock.advance(29)
    connection.dataReceived(b"x")
    upstream.transport.clear()  # type: ignore[union-attr]
    h.clock.advance(29)
    assert not transport.disconnecting
    h.clock.advance(1)
    assert transport.disconnecting
    _lost(connection)
    _lost(upstream)
    [line] = h.access()
    assert line["reason"] == "idle_timeout"
    assert h.stats.timeouts == 1


def test_drain_closes_a_relay_that_never_carried_a_byte() -> None:
    h = Harness()
    connection, transport = h.client()
    upstream = h.origin.answer()
    assert connection.close_if_idle()
    assert transport.disconnecting and upstream.transport.disconnecting  # type: ignore[union-attr]
    _lost(connection)
    _lost(upstream)
    assert h.access()[0]["reason"] == "drain"


def test_drain_closes_a_connection_still_waiting_for_its_upstream() -> None:
    h = Harness()
    connection, transport = h.client()
    assert connection.close_if_idle()
    assert transport.disconnecting and connection.cancelled
    _lost(connection)
    assert h.access()[0]["reason"] == "drain"


def test_drain_lets_a_busy_relay_run_then_cuts_it() -> None:
    h = Harness()
    connection, transport = h.client()
    upstream = h.origin.answer()
    connection.dataReceived(b"busy")
    assert not connection.close_if_idle()
    assert not transport.disconnecting
    connection.drain_cut()
    assert transport.aborted and upstream.transport.aborted  # type: ignore[union-attr]
    assert len(h.access()) == 1, "written at the cut: the drain flushes the log right after"
    _lost(connection, ConnectionAborted)
    _lost(upstream, ConnectionAborted)
    [line] = h.access()
    assert line["reason"] == "drain" and line["bytes_up"] == 4


def test_tls_facts_go_into_the_access_line() -> None:
    h = Harness()
    connection, _ = h.client()
    connection.tls_established({"tls_version": "TLSv1.3", "sni": "db.test"})
    upstream = h.origin.answer()
    _lost(connection)
    _lost(upstream)
    [line] = h.access()
    assert line["tls_version"] == "TLSv1.3" and line["sni"] == "db.test"


def test_no_access_line_when_the_listener_says_so() -> None:
    h = Harness(access_log=False)
    connection, _ = h.client()
    upstream = h.origin.answer()
    _lost(connection)
    _lost(upstream)
    assert h.access() == []
