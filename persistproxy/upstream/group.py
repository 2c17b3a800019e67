# -*- test-case-name: tests.unit.test_upstream_group -*-
"""
Where a connection goes upstream: the servers of one C{[[upstream]]} table, and a pool per
server for each protocol that dials them.

A L{Server} is shared by every protocol that uses the group (its address, the endpoint to
dial, its state); the pools are per protocol, because a pooled HTTP connection cannot be lent
to a Redis plugin. The core never imports a protocol: it dials with whatever
L{persistproxy.interfaces.UpstreamConnector} the plugin passes to C{context.upstream()}.

A group with C{send_proxy_protocol} dials each connection with the PROXY protocol header of
the key it is picked for (L{persistproxy.upstream.header}), and its pools lend a connection
only for the key it was opened for (L{persistproxy.upstream.pool.KeyedPool}).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IReactorCore, IStreamClientEndpoint

from persistproxy.config import UpstreamConfig
from persistproxy.descriptors import DescriptorBudget
from persistproxy.interfaces import C, UpstreamConnector
from persistproxy.logs import EventLog
from persistproxy.upstream.header import HeaderFirstEndpoint, header_for
from persistproxy.upstream.pool import Connector, KeyedConnector, KeyedPool, ServerPool

__all__ = [
    "EndpointWrapper",
    "LiveUpstream",
    "Router",
    "RouterSwitch",
    "Server",
    "UpstreamGroup",
    "tcp_endpoint",
]

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


class Server:
    """
    One server of an upstream group, shared by every protocol that dials it.
    """

    __slots__ = ("address", "endpoint", "host", "port", "tcp")

    def __init__(
        self,
        host: str,
        port: int,
        endpoint: IStreamClientEndpoint,
        tcp: IStreamClientEndpoint | None = None,
    ) -> None:
        """
        @param tcp: the plain TCP endpoint under C{endpoint}, if that is TLS over it.
        """
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        #: TCP, or TLS over TCP when the upstream says C{tls = true}.
        self.endpoint = endpoint
        self.tcp = tcp if tcp is not None else endpoint

    def with_header(self, header: bytes) -> IStreamClientEndpoint:
        """
        The endpoint that writes C{header} first on the TCP connection, then goes on as
        C{endpoint} does: its TLS, if any, rebuilt over the header with the endpoint's
        C{over(endpoint)} (L{persistproxy.tls.upstream.TLSClientEndpoint.over}).
        """
        first = HeaderFirstEndpoint(self.tcp, header)
        if self.endpoint is self.tcp:
            return first
        return self.endpoint.over(first)  # type: ignore[attr-defined, no-any-return]

    def __repr__(self) -> str:
        return f"<Server {self.address}>"


def dial(endpoint: IStreamClientEndpoint, factory: Any) -> Connector[Any]:
    """
    The function a pool calls to open one connection: C{endpoint.connect(factory)}, with
    C{TCP_NODELAY} set (a proxy writes whole messages; Nagle only delays them).
    """

    def connect() -> Deferred[Any]:
        d: Deferred[Any] = endpoint.connect(factory)

        def nodelay(connection: Any) -> Any:
            set_nodelay = getattr(connection.transport, "setTcpNoDelay", None)
            if set_nodelay is not None:
                set_nodelay(True)
            return connection

        return d.addCallback(nodelay)

    return connect


class UpstreamGroup(Generic[C]):
    """
    The servers of one C{[[upstream]]} table, each with a pool of one protocol's connections.
    """

    def __init__(
        self,
        clock: Any,
        config: UpstreamConfig,
        servers: list[Server],
        log: EventLog,
        connect: Callable[[Server], Connector[C]],
        budget: DescriptorBudget | None = None,
        connect_keyed: Callable[[Server], KeyedConnector[C]] | None = None,
    ) -> None:
        """
        @param connect: makes the function that opens a connection to a server; the
            connector's factory over the server's endpoint, or an in-memory one in tests.
        @param budget: the process's descriptor budget, which every pool reports to.
        @param connect_keyed: makes the function that opens a connection to a server for a
            key (with its PROXY protocol header); keyed connections use C{connect} without.
        """
        self.config = config
        self.servers = servers
        self.pools: list[ServerPool[C]] = [
            ServerPool(
                clock,
                server.address,
                config,
                connect(server),
                log,
                budget,
                connect_keyed(server) if connect_keyed is not None else None,
            )
            for server in servers
        ]
        self._next = 0

    def pick(self, key: Hashable | None = None) -> ServerPool[C] | KeyedPool[C]:
        """
        The pool of the next server, round-robin; with C{key}, that pool's share for it
        (connections opened for C{key}, lent only to it).
        """
        pools = self.pools
        pool = pools[self._next % len(pools)]
        self._next += 1
        return pool if key is None else pool.keyed(key)

    def close(self) -> None:
        for pool in self.pools:
            pool.close()

    def retire(self) -> None:
        """
        A reload replaced this group: close its idle connections now and its lent ones as
        they come back, while what is queued for a connection is still served.
        """
        for pool in self.pools:
            pool.retire()


class Router:
    """
    The upstream groups by name, each built once per connector that asks for it.
    """

    def __init__(
        self,
        reactor: Any,
        configs: Mapping[str, UpstreamConfig],
        log: EventLog,
        wrap: Callable[[UpstreamConfig], EndpointWrapper | None] = lambda config: None,
        budget: DescriptorBudget | None = None,
        previous: Router | None = None,
    ) -> None:
        """
        @param wrap: gives the endpoint wrapper of an upstream (its TLS), if any.
        @param budget: the process's descriptor budget, shared by every pool.
        @param previous: the router this one replaces on a reload: its groups whose
            configuration is unchanged are taken over, warm pools and all.
        """
        self._reactor = reactor
        self._configs = dict(configs)
        self._log = log
        self._budget = budget
        self.servers: dict[str, list[Server]] = {}
        self._groups: dict[tuple[str, UpstreamConnector[Any]], UpstreamGroup[Any]] = {}
        #: The names whose groups were taken over from C{previous}.
        self.kept: set[str] = set()
        for name, config in self._configs.items():
            if previous is not None and previous._configs.get(name) == config:
                self.kept.add(name)
                self.servers[name] = previous.servers[name]
                continue
            wrapper = wrap(config)
            servers = []
            for host, port in config.servers:
                tcp = tcp_endpoint(reactor, host, port, config.connect_timeout)
                endpoint = tcp if wrapper is None else wrapper(tcp, host)
                rebuilt = endpoint is tcp or callable(getattr(endpoint, "over", None))
                if config.send_proxy_protocol and not rebuilt:
                    raise ValueError(
                        f"upstream {name}: send_proxy_protocol needs its endpoint "
                        f"({type(endpoint).__name__}) to be rebuilt over the header"
                    )
                servers.append(Server(host, port, endpoint, tcp))
            self.servers[name] = servers
        if previous is not None:
            for key, group in previous._groups.items():
                if key[0] in self.kept:
                    self._groups[key] = group

    def __contains__(self, name: str) -> bool:
        return name in self._configs

    def group(self, name: str, connector: UpstreamConnector[C]) -> UpstreamGroup[C]:
        """
        The group C{name} with pools of C{connector}'s connections (connectors that compare
        equal share them).
        """
        key = (name, connector)
        found = self._groups.get(key)
        if found is not None:
            return found  # type: ignore[no-any-return]
        config = self._configs[name]
        version = config.send_proxy_protocol

        def connect(server: Server) -> Connector[C]:
            factory = connector.factory_for(server, config)
            if not version:
                return dial(server.endpoint, factory)
            return dial(server.with_header(header_for(version, None)), factory)

        def connect_keyed(server: Server) -> KeyedConnector[C]:
            factory = connector.factory_for(server, config)

            def open_for(key: Hashable) -> Deferred[C]:
                return dial(server.with_header(header_for(version, key)), factory)()

            return open_for

        group: UpstreamGroup[C] = UpstreamGroup(
            self._reactor,
            config,
            self.servers[name],
            self._log,
            connect,
            self._budget,
            connect_keyed if version else None,
        )
        self._groups[key] = group
        return group

    @property
    def groups(self) -> list[UpstreamGroup[Any]]:
        return list(self._groups.values())

    def close(self) -> None:
        for group in self.groups:
            group.close()

    def retire_replaced(self, successor: Router) -> list[str]:
        """
        Retire the groups C{successor} did not take over (see L{UpstreamGroup.retire});
        returns their names.
        """
        retired = set()
        for (name, _), group in self._groups.items():
            if name not in successor.kept:
                group.retire()
                retired.add(name)
        return sorted(retired)


class RouterSwitch:
    """
    The router in use now. A reload swaps it; every L{LiveUpstream} handed out follows.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        #: Changes with every swap, so a handle notices with one comparison.
        self.generation = 0

    def swap(self, router: Router) -> Router:
        """Use C{router} for new requests from now on; returns the one it replaces."""
        previous, self.router = self.router, router
        self.generation += 1
        return previous

    def upstream(self, name: str, connector: UpstreamConnector[C]) -> LiveUpstream[C]:
        return LiveUpstream(self, name, connector)


class LiveUpstream(Generic[C]):
    """
    The upstream group C{name} as a protocol holds it for the life of a listener's factory:
    whatever group the current router has under that name, so that after a reload the next
    request (even on a connection accepted before it) goes to the new servers and pools,
    while a request already lent a connection finishes on its old pool. If a reload removed
    the name, the group it last had stays (retired: its connections close as they return).

    Resolving costs one integer comparison per C{pick()} until a reload.
    """

    __slots__ = ("_connector", "_generation", "_group", "_name", "_switch")

    def __init__(self, switch: RouterSwitch, name: str, connector: UpstreamConnector[C]) -> None:
        self._switch = switch
        self._name = name
        self._connector = connector
        self._group: UpstreamGroup[C] | None = None
        self._generation = -1
        if name in switch.router:
            self._current()
        # Otherwise a listener of a reload names an upstream that the reload adds: it is
        # resolved at the first pick, after the new router is in use.

    def _current(self) -> UpstreamGroup[C]:
        switch = self._switch
        group = self._group
        if self._generation != switch.generation or group is None:
            router = switch.router
            if self._name in router or group is None:
                group = self._group = router.group(self._name, self._connector)
            self._generation = switch.generation
        return group

    @property
    def config(self) -> UpstreamConfig:
        return self._current().config

    @property
    def servers(self) -> list[Server]:
        return self._current().servers

    @property
    def pools(self) -> list[ServerPool[C]]:
        return self._current().pools

    def pick(self, key: Hashable | None = None) -> ServerPool[C] | KeyedPool[C]:
        return self._current().pick(key)
