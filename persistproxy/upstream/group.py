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

import hashlib
import math
import random
from collections.abc import Callable, Collection, Hashable, Mapping
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
from persistproxy.upstream.health import ActiveCheck, PassiveHealth
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

    __slots__ = (
        "address",
        "backup",
        "endpoint",
        "health",
        "host",
        "pools",
        "port",
        "tcp",
        "weight",
    )

    def __init__(
        self,
        host: str,
        port: int,
        endpoint: IStreamClientEndpoint,
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        log: EventLog | None = None,
        weight: int = 1,
        backup: bool = False,
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
        #: Passive health, reported to by the server's pools of every protocol.
        self.health = PassiveHealth(self.address, max_fails, fail_timeout, log)
        #: Its share of the group's connections, relative to the others' (C{weight}).
        self.weight = weight
        #: Used only while no server that is not a backup is up.
        self.backup = backup
        #: Its pools, one per protocol (connector) that dials it: C{least_conn} and
        #: C{random_two} count the connections in use over all of them.
        self.pools: list[ServerPool[Any]] = []

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

    def active(self) -> int:
        """Connections to the server in use or being opened, over every protocol."""
        return sum(pool.active for pool in self.pools)

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
        rng: random.Random | None = None,
    ) -> None:
        """
        @param rng: the random numbers C{random_two} draws (a seeded one in tests).
        @param connect: makes the function that opens a connection to a server; the
            connector's factory over the server's endpoint, or an in-memory one in tests.
        @param budget: the process's descriptor budget, which every pool reports to.
        @param connect_keyed: makes the function that opens a connection to a server for a
            key (with its PROXY protocol header); keyed connections use C{connect} without.
        """
        self.config = config
        self.servers = servers
        self._clock = clock
        self.pools: list[ServerPool[C]] = [
            ServerPool(
                clock,
                server.address,
                config,
                connect(server),
                log,
                budget,
                connect_keyed(server) if connect_keyed is not None else None,
                server.health,
            )
            for server in servers
        ]
        for server, pool in zip(servers, self.pools, strict=True):
            server.pools.append(pool)
        #: Smooth weighted round-robin's running weights, one per server.
        self._current_weights = [0] * len(servers)
        self._random = rng if rng is not None else random.Random()

    def pick(
        self,
        client: str | None = None,
        avoid: Collection[object] = (),
        key: Hashable | None = None,
    ) -> ServerPool[C] | KeyedPool[C]:
        """
        The pool of the server the next connection goes to, by the group's C{balance},
        among the servers that are up (passive health) and not backups, skipping the pools
        in C{avoid} (those a request already failed to connect to). Backups are used only
        when no other server is up; when every server is down, they are all tried anyway
        (in turn, as nginx does: refusing outright would make a group whose only server
        restarted wait out C{fail_timeout}).

        @param client: the client's address (host), which C{ip_hash} uses; without one it
            balances round-robin.
        @param avoid: pools as C{pick} returned them: a L{KeyedPool} stands for its server's
            pool (a request that failed to connect for its key avoids the whole server).
        @param key: give the chosen pool's share for it (connections opened for C{key}, lent
            only to it; see L{ServerPool.keyed}).
        """
        pool = self._choose(client, avoid)
        return pool if key is None else pool.keyed(key)

    def _choose(self, client: str | None, avoid: Collection[object]) -> ServerPool[C]:
        """The server pool L{pick} gives (or gives a key's share of)."""
        pools = self.pools
        if len(pools) == 1:
            return pools[0]
        avoided = [p.server_pool if isinstance(p, KeyedPool) else p for p in avoid]
        servers = self.servers
        now = self._clock.seconds()
        # One pass over the servers (a handful): this runs for every request.
        candidates: list[int] = []
        backups: list[int] = []
        allowed: list[int] = []
        for i, server in enumerate(servers):
            if avoided and pools[i] in avoided:
                continue
            allowed.append(i)
            health = server.health
            if health.checked_up and now >= health.down_until:
                (backups if server.backup else candidates).append(i)
        if not candidates:
            # No other server is up: a backup that is, else any (every pool avoided: any).
            candidates = backups or allowed or list(range(len(pools)))
        if len(candidates) == 1:
            return pools[candidates[0]]
        method = self.config.balance
        if method == "least_conn":
            index = self._least_conn(candidates)
        elif method == "ip_hash" and client is not None:
            index = self._ip_hash(candidates, client)
        elif method == "random_two":
            index = self._random_two(candidates)
        else:
            index = self._round_robin(candidates)
        return pools[index]

    def _round_robin(self, candidates: list[int]) -> int:
        """
        nginx's smooth weighted round-robin: every candidate gains its weight, the one with
        the most is chosen and loses the total. Weights 5, 1, 1 give a a b a c a a: the
        heavy server's turns are spread out, not bunched.
        """
        current = self._current_weights
        servers = self.servers
        total = 0
        best = candidates[0]
        for i in candidates:
            weight = servers[i].weight
            current[i] += weight
            total += weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return best

    def _load(self, index: int) -> tuple[int, int]:
        """The server's connections in use (over its pools of every protocol), and weight."""
        server = self.servers[index]
        return server.active(), server.weight

    def _least_conn(self, candidates: list[int]) -> int:
        """
        The server with the fewest connections in use for its weight (nginx's C{least_conn});
        ties go round-robin among the tied.
        """
        best: list[int] = []
        best_active, best_weight = 0, 1
        for i in candidates:
            active, weight = self._load(i)
            if not best or active * best_weight < best_active * weight:
                best = [i]
                best_active, best_weight = active, weight
            elif active * best_weight == best_active * weight:
                best.append(i)
        return best[0] if len(best) == 1 else self._round_robin(best)

    def _ip_hash(self, candidates: list[int], client: str) -> int:
        """
        Rendezvous (highest random weight) hashing of the client's address over the
        candidates: a client keeps its server while the set of servers that are up is
        stable, and when one goes down only its own clients move (weighted: a server of
        weight 2 gets about twice the clients).
        """
        servers = self.servers
        key = client.encode("utf-8", "surrogateescape")
        best = candidates[0]
        best_score = -math.inf
        for i in candidates:
            digest = hashlib.blake2b(
                b"%s\0%s" % (servers[i].address.encode("latin-1"), key), digest_size=8
            ).digest()
            # A uniform number in (0, 1), then the weighted score -weight / ln(u).
            u = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)
            score = -servers[i].weight / math.log(u)
            if score > best_score:
                best, best_score = i, score
        return best

    def _random_two(self, candidates: list[int]) -> int:
        """
        The power of two choices: two different candidates drawn at random (by weight), and
        the one with fewer connections in use for its weight; the first drawn on a tie.
        """
        rng = self._random
        servers = self.servers
        weights = [servers[i].weight for i in candidates]
        first = rng.choices(range(len(candidates)), weights)[0]
        rest = [j for j in range(len(candidates)) if j != first]
        second = rng.choices(rest, [weights[j] for j in rest])[0]
        a, b = candidates[first], candidates[second]
        a_active, a_weight = self._load(a)
        b_active, b_weight = self._load(b)
        return b if b_active * a_weight < a_active * b_weight else a

    def close(self) -> None:
        self._unregister()
        for pool in self.pools:
            pool.close()

    def _unregister(self) -> None:
        """The pools no longer count for their servers' balancing (a reload or the end)."""
        for server, pool in zip(self.servers, self.pools, strict=True):
            if pool in server.pools:
                server.pools.remove(pool)

    def retire(self) -> None:
        """
        A reload replaced this group: close its idle connections now and its lent ones as
        they come back, while what is queued for a connection is still served.
        """
        self._unregister()
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
        check_kind: Callable[[str], str] = lambda name: "http",
    ) -> None:
        """
        @param check_kind: what an upstream's active health check is, by its name:
            C{"http"} (a GET) when HTTP listeners use it, C{"tcp"} (a connect) otherwise.
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
        #: The active health checks of each upstream that has them, one per server; they
        #: run from L{start_checks} until the router is closed or replaced.
        self.checks: dict[str, list[ActiveCheck]] = {}
        for name, config in self._configs.items():
            if previous is not None and previous._configs.get(name) == config:
                self.kept.add(name)
                self.servers[name] = previous.servers[name]
                if name in previous.checks:
                    self.checks[name] = previous.checks[name]
                continue
            wrapper = wrap(config)
            servers = []
            for i, (host, port) in enumerate(config.servers):
                tcp = tcp_endpoint(reactor, host, port, config.connect_timeout)
                endpoint = tcp if wrapper is None else wrapper(tcp, host)
                rebuilt = endpoint is tcp or callable(getattr(endpoint, "over", None))
                if config.send_proxy_protocol and not rebuilt:
                    raise ValueError(
                        f"upstream {name}: send_proxy_protocol needs its endpoint "
                        f"({type(endpoint).__name__}) to be rebuilt over the header"
                    )
                servers.append(
                    Server(
                        host,
                        port,
                        endpoint,
                        config.max_fails,
                        config.fail_timeout,
                        log,
                        config.weights[i] if config.weights else 1,
                        bool(config.backups and config.backups[i]),
                        tcp,
                    )
                )
            self.servers[name] = servers
            check = config.health_check
            if check is not None:
                self.checks[name] = [
                    ActiveCheck(
                        reactor,
                        server.health,
                        server.endpoint.connect,
                        check,
                        check_kind(name),
                        server.address,
                        log,
                    )
                    for server in servers
                ]
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

    def start_checks(self) -> None:
        """Start the active health checks (those already running, taken over, go on)."""
        for checks in self.checks.values():
            for check in checks:
                check.start()

    def close(self) -> None:
        for checks in self.checks.values():
            for check in checks:
                check.stop()
        for group in self.groups:
            group.close()

    def retire_replaced(self, successor: Router) -> list[str]:
        """
        Retire the groups C{successor} did not take over (see L{UpstreamGroup.retire});
        returns their names.
        """
        retired = set()
        for name, checks in self.checks.items():
            if name not in successor.kept:
                for check in checks:
                    check.stop()
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

    def pick(
        self,
        client: str | None = None,
        avoid: Collection[object] = (),
        key: Hashable | None = None,
    ) -> ServerPool[C] | KeyedPool[C]:
        return self._current().pick(client, avoid, key)
