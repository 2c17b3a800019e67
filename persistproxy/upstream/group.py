# -*- test-case-name: tests.unit.test_router -*-
"""
Where a request goes: the listener's upstream group, then one server of it.

A group spreads new requests over its servers round-robin and owns one L{ServerPool} per
server. Routing rules beyond "this listener forwards to that group" plug in here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IReactorCore, IStreamClientEndpoint
from twisted.internet.protocol import Factory

from persistproxy.config import UpstreamConfig
from persistproxy.http.upstream_connection import UpstreamConnection
from persistproxy.logs import EventLog
from persistproxy.upstream.pool import Connector, ServerPool

__all__ = ["EndpointWrapper", "Router", "UpstreamGroup"]

#: Turns the plain TCP endpoint of a server into the one to dial (TLS wraps it here).
EndpointWrapper = Callable[[IStreamClientEndpoint, str], IStreamClientEndpoint]


def tcp_endpoint(
    reactor: IReactorCore, host: str, port: int, timeout: float
) -> IStreamClientEndpoint:
    """
    The plainest endpoint for C{host}: no resolver round trip for an address literal.
    """
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)  # type: ignore[arg-type]
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)  # type: ignore[arg-type]
    return HostnameEndpoint(reactor, host, port, timeout=timeout)  # type: ignore[arg-type]


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, reactor: IReactorCore, config: UpstreamConfig) -> None:
        self._reactor = reactor
        self._config = config

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        return UpstreamConnection(
            self._reactor,  # type: ignore[arg-type]
            self._config.response_timeout,
            self._config.max_requests,
        )


class UpstreamGroup:
    """
    The servers of one C{[[upstream]]} table and their pools.
    """

    def __init__(
        self,
        reactor: IReactorCore,
        config: UpstreamConfig,
        log: EventLog,
        wrap: EndpointWrapper | None = None,
        connector: Callable[[str, int], Connector] | None = None,
    ) -> None:
        """
        @param connector: makes the function that opens a connection to C{(host, port)};
            tests pass one that hands out in-memory connections.
        """
        self.config = config
        self.pools: list[ServerPool] = []
        factory = _UpstreamFactory(reactor, config)
        for host, port in config.servers:
            if connector is not None:
                connect = connector(host, port)
            else:
                endpoint = tcp_endpoint(reactor, host, port, config.connect_timeout)
                if wrap is not None:
                    endpoint = wrap(endpoint, host)
                connect = _connector(endpoint, factory)
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            clock: Any = reactor
            self.pools.append(ServerPool(clock, address, config, connect, log))
        self._next = 0

    def pick(self) -> ServerPool:
        pools = self.pools
        pool = pools[self._next % len(pools)]
        self._next += 1
        return pool

    def close(self) -> None:
        for pool in self.pools:
            pool.close()


def _connector(
    endpoint: IStreamClientEndpoint, factory: Factory
) -> Callable[[], Deferred[UpstreamConnection]]:
    def connect() -> Deferred[UpstreamConnection]:
        d: Deferred[UpstreamConnection] = endpoint.connect(factory)  # type: ignore[assignment]

        def nodelay(connection: UpstreamConnection) -> UpstreamConnection:
            set_nodelay = getattr(connection.transport, "setTcpNoDelay", None)
            if set_nodelay is not None:
                set_nodelay(True)
            return connection

        return d.addCallback(nodelay)

    return connect


class Router:
    """
    Maps each listener to the upstream group it forwards to.
    """

    def __init__(self, groups: Mapping[str, UpstreamGroup]) -> None:
        self.groups = dict(groups)

    def group(self, name: str) -> UpstreamGroup:
        return self.groups[name]

    def close(self) -> None:
        for group in self.groups.values():
            group.close()
