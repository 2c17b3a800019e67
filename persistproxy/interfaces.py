# -*- test-case-name: tests.unit.test_plugins -*-
"""
Everything a protocol plugin implements, is given, and must honour: a third-party protocol
depends on this module only.

A plugin is found with Twisted's plugin system (C{getPlugins(IProtocolPlugin,
persistproxy.plugins)}), so a package that drops a module into any C{persistproxy/plugins/}
directory on C{sys.path} adds a protocol that listeners name with C{protocol = "<name>"}.

What the listener does for every protocol, around whatever factory the plugin returns (the
plugin writes none of it): admission (C{max_connections} with holding, per-client limits and
the refusal), drain registration and the drain cut, TLS termination, TCP keep-alive and
C{TCP_NODELAY}, the client-connection counters, and with C{proxy_protocol} the PROXY protocol
header (the plugin's C{buildProtocol(addr)} then gets the carried address, which
C{transport.getPeer()} says too). What the plugin supplies is only what is
protocol-specific: the bytes of a refusal, the answer to plain text on a TLS port, how to close
when idle, and its own traffic.

Structural contracts (what the core calls on a plugin's objects, and what it lends to them) are
C{typing.Protocol} classes, so plugin code type-checks without C{type: ignore}; the plugin
itself is a zope interface, as Twisted's plugin system wants.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from zope.interface import Attribute, Interface

from persistproxy.config import ListenerConfig, UpstreamConfig
from persistproxy.errors import ConfigError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocolFactory, IReactorTime

    from persistproxy.listener.limits import ConnectionLimits
    from persistproxy.logs import AccessLog, EventLog
    from persistproxy.metrics import ListenerStats

__all__ = [
    "C",
    "ClientAddresses",
    "ConfigError",
    "ConnectionWaiter",
    "DrainAware",
    "IProtocolPlugin",
    "IProxyContext",
    "ListenerConfig",
    "Pool",
    "PooledConnection",
    "ProxyContext",
    "TLSAware",
    "Upstream",
    "UpstreamConfig",
    "UpstreamConnector",
    "UpstreamServer",
]


# -- what the core calls on a plugin's client-side protocol (each optional) ------------------


@runtime_checkable
class DrainAware(Protocol):
    """
    A client-side protocol that knows when it is idle. Without it, a drain leaves the
    connection to finish by itself until C{drain_timeout}, then aborts it.
    """

    def close_if_idle(self) -> bool:
        """
        The proxy drains: close now (gracefully) if nothing is in flight and say C{True};
        otherwise finish what is in flight, close then, and say C{False}.
        """

    def drain_cut(self) -> None:
        """
        The drain timeout expired with this connection still open: account for the work cut
        short (an access line), then abort the transport.
        """


@runtime_checkable
class TLSAware(Protocol):
    """
    A client-side protocol that wants the facts of its TLS handshake (version, resumed, ALPN,
    SNI), for its access lines.
    """

    def tls_established(self, facts: dict[str, Any]) -> None: ...


# -- the upstream side: what a pool lends --------------------------------------------------


class PooledConnection(Protocol):
    """
    A connection to an upstream server that a L{persistproxy.upstream.pool.ServerPool} can
    lend, take back and reap, whatever protocol it speaks. HTTP's upstream connection is one;
    a Redis plugin's is another. The pool sets C{idle_since}, C{in_pool} and C{on_lost}.
    """

    #: When it last went idle in the pool (the clock's seconds).
    idle_since: float
    #: Whether it sits in the pool's idle stack now.
    in_pool: bool
    #: Called with the connection when its transport is gone; the pool hooks in here.
    on_lost: Callable[[Any], None] | None

    def usable(self, now: float, margin: float) -> bool:
        """
        Whether it may be lent now: open, between requests, and not within C{margin} seconds
        of a keep-alive limit the server announced. The margin counts for at most half of
        that limit, so C{margin=math.inf} asks whether the connection is in the first half of
        it (what the pool asks for a request that must not be replayed). A limit the pool
        learned from the server's closes is the pool's to apply.
        """

    def close(self) -> None:
        """Close it gracefully (never while lent)."""


C = TypeVar("C", bound=PooledConnection)
C_co = TypeVar("C_co", covariant=True)
C_contra = TypeVar("C_contra", contravariant=True)


class UpstreamServer(Protocol):
    """One server of an upstream group (shared by every protocol that dials it)."""

    host: str
    port: int
    #: C{host:port} (C{[v6]:port}), as logs and metrics name it.
    address: str


class ConnectionWaiter(Protocol[C_contra]):
    """
    Who asked a pool for a connection. Exactly one of the two methods is called, once,
    unless C{cancelled} became true first.
    """

    cancelled: bool

    def connection_ready(self, connection: C_contra, reused: bool) -> None:
        """A connection is lent: a pooled one (C{reused}) or a new one."""

    def connection_failed(self, reason: str, status: int) -> None:
        """
        None could be had: C{status} is what an HTTP client would be told (502: connect
        failed; 503: the pool's limit and queue are full, or no slot freed in time).
        """


class Pool(Protocol[C]):
    """The connections of one protocol to one server."""

    address: str

    def acquire(
        self, waiter: ConnectionWaiter[C], fresh: bool = False, replayable: bool = True
    ) -> None:
        """
        Lend a connection to C{waiter}: a pooled one unless C{fresh}, else a new one. Say
        C{replayable=False} for work that must not be sent twice (an HTTP POST): it is lent
        only a connection that cannot be in the keep-alive race with its server's idle close.
        """

    def release(self, connection: C, reusable: bool) -> None:
        """Give a lent connection back once its work is complete (closed unless reusable)."""

    def forget(self) -> None:
        """A lent connection died; it is not coming back."""


@dataclass(frozen=True, slots=True)
class ClientAddresses:
    """
    Whose connection an upstream connection serves: the client's address and the address it
    connected to (Twisted's C{IPv4Address}/C{IPv6Address}; with C{proxy_protocol}, those the
    header carried: the client's C{transport.getPeer()} and C{getHost()}).

    The key a protocol passes to L{Upstream.pick} when the group's
    C{config.send_proxy_protocol} is set: each connection then starts with a PROXY protocol
    header stating these, and is lent again only for the same key (the same client
    connection, as HAProxy reuses such connections), never to another client.
    """

    source: Any
    destination: Any


class Upstream(Protocol[C]):
    """
    An C{[[upstream]]} group as one protocol sees it: its servers, with a pool each.

    A group whose C{config.send_proxy_protocol} is set wants a L{ClientAddresses} key with
    every C{pick}: a connection picked without one starts with a header that names no client
    (v1 C{UNKNOWN}), so the server sees the proxy's own address.
    """

    @property
    def config(self) -> UpstreamConfig:
        """The group's C{[[upstream]]} table."""

    @property
    def servers(self) -> Sequence[UpstreamServer]:
        """The group's servers, as configured."""

    @property
    def pools(self) -> Sequence[Pool[C]]:
        """One per server, in the order of C{servers}."""

    def pick(
        self,
        client: str | None = None,
        avoid: Collection[Pool[C]] = (),
        key: Hashable | None = None,
    ) -> Pool[C]:
        """
        The pool of the server the next connection should go to (balancing), skipping
        servers that are down and the pools in C{avoid} (those this work already failed to
        connect to) while another can be had.

        @param client: the client's address (host), which some balancing methods use.
        @param avoid: pools this work already failed to connect to, as C{pick} returned
            them (a keyed pool stands for its server's pool).
        @param key: lend and open only connections for this key: a L{ClientAddresses} for a
            group with C{send_proxy_protocol}; anything hashable otherwise (connections
            opened for one key are never lent for another).
        """


class UpstreamConnector(Protocol[C_co]):
    """
    Makes a protocol's upstream connections: the factory the pool dials a server with.

    Connectors are hashable, and connectors that compare equal share pools: two HTTP
    listeners forwarding to one upstream lend each other's idle connections.
    """

    def factory_for(self, server: UpstreamServer, config: UpstreamConfig) -> IProtocolFactory:
        """
        The factory whose protocol (a L{PooledConnection}) speaks to C{server} of the
        upstream configured by C{config}.
        """

    def __hash__(self) -> int: ...


# -- what the core lends a plugin ----------------------------------------------------------


class IProxyContext(Interface):
    """
    What the proxy lends a plugin to build a listener's protocol: no more than that, so a
    plugin can be tested with a stand-in and does not depend on the rest of the config.
    L{ProxyContext} is the typed, frozen value that provides it.
    """

    reactor = Attribute("The reactor (IReactorCore, IReactorTime, IReactorTCP) to use.")
    clock = Attribute("The same reactor, typed as IReactorTime, for timers.")
    log = Attribute("The event log (structlog): C{log.info(event, **fields)}.")
    access_log = Attribute(
        "Where access lines go (batched, never blocks): C{record(fields)} writes one line of"
        " any protocol (a dict of JSON-encodable fields); HTTP's exchanges use C{log(...)}."
    )

    def upstream(name: str, connector: UpstreamConnector[Any]) -> Upstream[Any]:
        """
        The servers of the C{[[upstream]]} called C{name}, with pools of the connections
        C{connector} makes. Balancing and server state are shared by every protocol that
        uses the group; the pools are this connector's own.
        """

    def limits(listener: str) -> ConnectionLimits:
        """
        The listener's limits, for protocols with an idle state between requests:
        C{went_idle(host, connection)} / C{went_busy(host, connection)} enforce
        C{max_idle_per_client} (the oldest idle connection's C{reap_idle()} is called).
        Admission itself is the listener's.
        """

    def stats(listener: str) -> ListenerStats:
        """The listener's counters."""

    def draining() -> bool:
        """
        Whether this listener's connections should finish what is in flight and close: the
        proxy is shutting down gracefully, or a reload removed the listener.
        """


@dataclass(frozen=True)
class ProxyContext:
    """
    The L{IProxyContext} every plugin gets: frozen, and holding no configuration beyond what
    its methods return.
    """

    reactor: Any
    clock: IReactorTime
    log: EventLog
    access_log: AccessLog
    _upstream: Callable[[str, UpstreamConnector[Any]], Upstream[Any]]
    _limits: Mapping[str, ConnectionLimits]
    _stats: Callable[[str], ListenerStats]
    _draining: Callable[[], bool]

    def upstream(self, name: str, connector: UpstreamConnector[C]) -> Upstream[C]:
        return self._upstream(name, connector)

    def limits(self, listener: str) -> ConnectionLimits:
        return self._limits[listener]

    def stats(self, listener: str) -> ListenerStats:
        return self._stats(listener)

    def draining(self) -> bool:
        return self._draining()


# -- the plugin ----------------------------------------------------------------------------


class IProtocolPlugin(Interface):
    """
    A protocol that a C{[[listener]]} can speak.
    """

    name = Attribute("The value of the listener's C{protocol} key, e.g. C{'http'}.")
    description = Attribute("One line for C{--list-protocols}.")
    plaintext_answer = Attribute(
        "Bytes a TLS listener of this protocol sends to a client that spoke plain text "
        "instead of TLS, before closing (an HTTP 400); C{b''} closes without a word."
    )

    def validate(listener: ListenerConfig) -> None:
        """
        Check the listener's keys that belong to this protocol (C{listener.extra} holds the
        keys the core does not know). Raise L{ConfigError} with
        C{"<key>: <problem>"} for the first bad one; the core adds the file and table.
        """

    def build_factory(listener: ListenerConfig, context: ProxyContext) -> IProtocolFactory:
        """
        The factory whose protocols serve the listener's admitted connections. Called once
        per listener at start-up, and again when a reload adds or changes the listener (the
        new factory serves the connections accepted from then on); never blocks. Its
        C{buildProtocol} may return C{None} to refuse a connection outright.
        """

    def refusal(reason: str) -> bytes:
        """
        The bytes sent to a connection the listener refuses (a per-client limit), before it
        is closed gracefully: HTTP answers 503 with C{Retry-After}; a byte relay says nothing.
        """
