"""
Where a connection goes upstream (upstream/group.py), in a memory reactor: round-robin over
the servers of a group, the endpoint each server is dialled through, TCP_NODELAY on every
upstream connection, and the L{Router} building a group once per connector, so that
listeners whose connectors compare equal share the pools.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from persistproxy.config import UpstreamConfig
from persistproxy.http.upstream_connection import HTTPConnector, UpstreamConnection
from persistproxy.logs import make_event_log
from persistproxy.upstream.group import Router, Server, UpstreamGroup, tcp_endpoint


class Waiter:
    cancelled = False

    def __init__(self) -> None:
        self.got: list[tuple[Any, bool]] = []
        self.failed: list[tuple[str, int]] = []

    def connection_ready(self, connection: Any, reused: bool) -> None:
        self.got.append((connection, reused))

    def connection_failed(self, reason: str, status: int) -> None:
        self.failed.append((reason, status))


class NoDelayTransport(StringTransport):
    nodelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


def _config(*servers: tuple[str, int], **kw: Any) -> UpstreamConfig:
    return UpstreamConfig(name="app", servers=servers, **kw)


def _router(reactor: MemoryReactorClock, **configs: UpstreamConfig) -> Router:
    return Router(reactor, configs, make_event_log(io.StringIO()))


def _complete_connect(reactor: MemoryReactorClock, index: int = -1) -> NoDelayTransport:
    """Finish the TCP connection the reactor was asked for, as the kernel would."""
    host, port, factory, _, _ = reactor.tcpClients[index]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = NoDelayTransport()
    protocol.makeConnection(transport)
    return transport


def test_pick_goes_round_the_servers() -> None:
    reactor = MemoryReactorClock()
    config = _config(("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3))
    servers = [Server(h, p, tcp_endpoint(reactor, h, p, 5)) for h, p in config.servers]
    group: UpstreamGroup[Any] = UpstreamGroup(
        reactor, config, servers, make_event_log(io.StringIO()), lambda server: lambda: None
    )
    picked = [group.pick().address for _ in range(7)]
    assert picked == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"] * 2 + ["127.0.0.1:1"]


@pytest.mark.parametrize(
    ("host", "kind", "address"),
    [
        ("127.0.0.1", TCP4ClientEndpoint, "127.0.0.1:8081"),
        ("::1", TCP6ClientEndpoint, "[::1]:8081"),
        ("origin.example", HostnameEndpoint, "origin.example:8081"),
    ],
)
def test_each_server_is_dialled_without_a_resolver_for_an_address(
    host: str, kind: type, address: str
) -> None:
    reactor = MemoryReactorClock()
    router = _router(reactor, app=_config((host, 8081), connect_timeout=3))
    [server] = router.servers["app"]
    assert isinstance(server.endpoint, kind)
    assert server.address == address and repr(server) == f"<Server {address}>"


def test_the_wrapper_of_an_upstream_wraps_each_servers_endpoint() -> None:
    wrapped: list[tuple[IStreamClientEndpoint, str]] = []

    def wrapper(endpoint: IStreamClientEndpoint, host: str) -> IStreamClientEndpoint:
        wrapped.append((endpoint, host))
        return endpoint

    config = _config(("127.0.0.1", 1), ("localhost", 2))
    router = Router(
        MemoryReactorClock(),
        {"app": config, "plain": _config(("127.0.0.1", 3))},
        make_event_log(io.StringIO()),
        wrap=lambda c: wrapper if c is config else None,
    )
    assert [host for _, host in wrapped] == ["127.0.0.1", "localhost"]
    assert [s.endpoint for s in router.servers["app"]] == [e for e, _ in wrapped]


def test_upstream_connections_are_dialled_with_tcp_nodelay() -> None:
    reactor = MemoryReactorClock()
    router = _router(reactor, app=_config(("127.0.0.1", 8081), connect_timeout=3))
    group = router.group("app", HTTPConnector(reactor))
    waiter = Waiter()
    group.pick().acquire(waiter)
    host, port, _, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 8081, 3)
    transport = _complete_connect(reactor)
    [(connection, reused)] = waiter.got
    assert isinstance(connection, UpstreamConnection) and not reused
    assert transport.nodelay


def test_listeners_with_equal_connectors_share_the_groups_and_their_pools() -> None:
    reactor = MemoryReactorClock()
    router = _router(reactor, app=_config(("127.0.0.1", 8081)), api=_config(("127.0.0.1", 9)))
    web = router.group("app", HTTPConnector(reactor))
    admin = router.group("app", HTTPConnector(reactor))  # another HTTP listener
    assert admin is web, "equal connectors share one group"
    api = router.group("api", HTTPConnector(reactor))
    assert api is not web
    assert router.groups == [web, api]
    # A pooled HTTP connection is lent to the other listener.
    first = Waiter()
    web.pick().acquire(first)
    _complete_connect(reactor)
    [(connection, _)] = first.got
    web.pools[0].release(connection, True)
    second = Waiter()
    admin.pick().acquire(second)
    assert second.got == [(connection, True)]
    assert len(reactor.tcpClients) == 1


@dataclass(frozen=True)
class _OtherProtocol:
    """Another plugin's connector: its pooled connections are not HTTP ones."""

    def factory_for(self, server: Server, config: UpstreamConfig) -> Factory:
        return Factory.forProtocol(Protocol)


def test_another_protocols_connector_gets_its_own_pools_on_the_same_servers() -> None:
    reactor = MemoryReactorClock()
    router = _router(reactor, app=_config(("127.0.0.1", 8081)))
    http = router.group("app", HTTPConnector(reactor))
    other = router.group("app", _OtherProtocol())
    assert other is not http
    assert other.pools[0] is not http.pools[0]
    assert other.servers is http.servers, "the servers (and their endpoints) are shared"
    assert router.group("app", _OtherProtocol()) is other


def test_closing_the_router_closes_every_pool() -> None:
    reactor = MemoryReactorClock()
    router = _router(reactor, app=_config(("127.0.0.1", 8081), ("127.0.0.1", 8082)))
    group = router.group("app", HTTPConnector(reactor))
    waiter = Waiter()
    group.pick().acquire(waiter)
    transport = _complete_connect(reactor)
    [(connection, _)] = waiter.got
    group.pools[0].release(connection, True)
    assert group.pools[0].idle == 1
    router.close()
    assert transport.disconnecting, "idle connections are closed"
    assert all(pool.idle == 0 for pool in group.pools)
