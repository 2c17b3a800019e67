# -*- test-case-name: tests.unit.test_admission -*-
"""
What a listener does for every accepted connection, whatever protocol it speaks: admission
(per-client limits, holding past C{max_connections}, the refusal), drain registration and the
drain cut, and the connection counters.

L{ListenerFactory} wraps the factory a protocol plugin returns; each admitted connection is
an L{Admitted} around the plugin's protocol. The plugin's protocol is given the real
transport, so it writes straight to the socket (or the TLS transport); only C{dataReceived}
and the close events pass through the wrapper, one Python call each.

On a listener with C{proxy_protocol = true}, a L{persistproxy.listener.proxied} reader comes
first: it takes the connection's place among C{max_connections} (holding it unread when full),
reads the header, and only then builds the rest of the chain with the carried address; this
factory is then told C{identified=True} and counts that address for the per-client limit.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.interfaces import DrainAware, TLSAware
from persistproxy.listener.limits import HOLD, ConnectionLimits, Rejection
from persistproxy.metrics import ListenerStats

__all__ = ["Admitted", "ConnectionRegistry", "ListenerFactory"]


class ConnectionRegistry:
    """
    The open connections of every listener, for the graceful drain (admitted ones, and those
    whose PROXY protocol header is still awaited); or of one listener, whose C{parent} is the
    registry of all (a listener a reload removes drains alone).
    """

    def __init__(self, parent: ConnectionRegistry | None = None) -> None:
        self._open: set[DrainAware] = set()
        self._parent = parent
        #: Called when the last registered connection closes (the drain waits on it).
        self.on_empty: Any = None

    def add(self, connection: DrainAware) -> None:
        self._open.add(connection)
        if self._parent is not None:
            self._parent.add(connection)

    def discard(self, connection: DrainAware) -> None:
        self._open.discard(connection)
        if not self._open and self.on_empty is not None:
            on_empty, self.on_empty = self.on_empty, None
            on_empty()
        if self._parent is not None:
            self._parent.discard(connection)

    def __len__(self) -> int:
        return len(self._open)

    def snapshot(self) -> list[DrainAware]:
        return list(self._open)


@implementer(IProtocolFactory)
class ListenerFactory:
    """
    Admits connections for a plugin's factory.
    """

    noisy = False

    def __init__(
        self,
        wrapped: IProtocolFactory,
        clock: IReactorTime,
        limits: ConnectionLimits,
        stats: ListenerStats,
        registry: ConnectionRegistry,
        refusal: Any,
        identified: bool = False,
    ) -> None:
        """
        @param refusal: the plugin's C{refusal(reason) -> bytes}.
        @param identified: every connection was admitted already, without a client (a PROXY
            protocol header was read first): only the per-client limit is left to apply.
        """
        self._identified = identified
        self.wrappedFactory = wrapped
        self.limits = limits
        self.stats = stats
        self.registry = registry
        self._clock = clock
        self._refusal = refusal

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = getattr(wrapped, "logPrefix", None)
        return prefix() if prefix is not None else type(wrapped).__name__  # type: ignore[no-any-return]

    def buildProtocol(self, addr: Any) -> IProtocol | None:
        host = getattr(addr, "host", None) or ""
        verdict = self.limits.identify(host) if self._identified else self.limits.admit(host)
        if verdict is not None and verdict != HOLD:
            return Rejection(
                self._clock, self._refusal(verdict), on_close=self.limits.refusal_closed
            )
        held = verdict == HOLD
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            if not held:
                self.limits.release(host)
            return None
        return Admitted(self, inner, host, held)


@implementer(IProtocol, IHalfCloseableProtocol)
class Admitted:
    """
    One admitted connection: counts it, registers it for the drain, holds it unread while the
    listener is full, and tells the listener when it closes. The plugin's protocol gets the
    transport itself once the connection is served (never while held).
    """

    __slots__ = ("_factory", "_held", "_inner", "_made", "host", "transport")

    def __init__(self, factory: ListenerFactory, inner: IProtocol, host: str, held: bool) -> None:
        self._factory = factory
        self._inner = inner
        self._held = held
        self._made = False
        self.host = host
        self.transport: Any = None

    @property
    def inner(self) -> IProtocol:
        """The plugin's protocol."""
        return self._inner

    # -- IProtocol ----------------------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        factory = self._factory
        stats = factory.stats
        stats.connections_total += 1
        stats.connections_open += 1
        factory.registry.add(self)
        if self._held:
            # Past max_connections: unread, as if still in the kernel's backlog.
            factory.limits.hold(self)
            transport.pauseProducing()
            return
        self._made = True
        self._inner.makeConnection(transport)

    def connectionMade(self) -> None:
        """Never called: L{makeConnection} hands the connection on."""

    @property
    def peer(self) -> str:
        return self.host

    @property
    def held(self) -> bool:
        """Accepted past C{max_connections}, waiting unread for a slot."""
        return self._held

    def unhold(self) -> None:
        """A slot is free (the limits counted this connection in): start serving it."""
        self._held = False
        transport = self.transport
        if transport is None or self._made:
            return
        self._made = True
        transport.resumeProducing()
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._inner.dataReceived(data)

    def readConnectionLost(self) -> None:
        if not self._made:
            self.transport.loseConnection()
            return
        half = IHalfCloseableProtocol(self._inner, None)
        if half is not None:
            half.readConnectionLost()
        else:
            # What Twisted does for a protocol that cannot half-close: the connection ends.
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self._made:
            half = IHalfCloseableProtocol(self._inner, None)
            if half is not None:
                half.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        factory = self._factory
        factory.stats.connections_open -= 1
        if self._held:
            factory.limits.forget_held(self)
        else:
            factory.limits.release(self.host)
        if self._made:
            self._inner.connectionLost(reason)
        factory.registry.discard(self)
        self.transport = None

    # -- what the TLS layer and the drain call ----------------------------------------------

    def tls_established(self, facts: dict[str, Any]) -> None:
        inner = self._inner
        if isinstance(inner, TLSAware):
            inner.tls_established(facts)

    def close_if_idle(self) -> bool:
        if not self._made:
            if self.transport is not None:
                self.transport.loseConnection()  # held: nothing was read, nothing is owed
            return True
        inner = self._inner
        if isinstance(inner, DrainAware):
            return inner.close_if_idle()
        return False

    def drain_cut(self) -> None:
        inner = self._inner
        if self._made and isinstance(inner, DrainAware):
            inner.drain_cut()
        elif self.transport is not None:
            self.transport.abortConnection()

    def logPrefix(self) -> str:
        prefix = getattr(self._inner, "logPrefix", None)
        return prefix() if prefix is not None else type(self._inner).__name__  # type: ignore[no-any-return]
