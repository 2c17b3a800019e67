# -*- test-case-name: tests.unit.test_proxied -*-
"""
C{proxy_protocol = true}: every connection of the listener starts with a PROXY protocol header
(v1 or v2) from a load balancer in front, and the address it carries is the client's, for
every protocol: per-client limits, logs, C{X-Forwarded-For}.

The header is read first, before TLS (a load balancer sends it in clear, then relays the
client's handshake) and before admission keys on the client: L{ProxyHeaderFactory} sits
between the port and the rest of the listener's chain (TLS, then
L{persistproxy.listener.admission.ListenerFactory}, then the plugin's factory), and builds that
chain only once the header is in, with the carried address, as if the client had connected
itself. Until then the connection:

 - comes from a peer of C{proxy_protocol_from}, or is closed at accept without a byte read
   (C{proxy_protocol.refused}): anyone else could claim any client address;
 - holds its place among the listener's C{max_connections} and in the descriptor budget (held
   unread when full, as any connection), but is counted for no client yet;
 - is registered for the drain, which closes it (nothing is owed to it);
 - waits at most C{header_timeout} (one timer per listener, L{TimeoutQueue}), buffers at most
   one header (L{persistproxy.net.proxyproto.MAX_V2_SIZE}) and is closed without an answer
   when the header is missing, malformed or late (C{proxy_protocol.invalid}, with the
   reason); nothing of it reaches a plugin, let alone an origin.

Then the chain's first protocol gets the real transport, so the plugin's writes go straight to
the socket as on any listener, and the transport's C{getPeer()} and C{getHost()} say what the
header said (set on that transport object only), for whatever layer asks. A v2 C{LOCAL}
header (a health check), or one whose address is of no use (C{UNKNOWN}, an unspecified
family, C{AF_UNIX}, UDP), leaves the connection its own address, as HAProxy does. What the
reader passes on afterwards costs one Python call per read, and only on such listeners.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.listener.admission import ConnectionRegistry
from persistproxy.listener.limits import HOLD, ConnectionLimits
from persistproxy.logs import EventLog
from persistproxy.metrics import ListenerStats
from persistproxy.net.proxyproto import HeaderParser, InvalidHeader, ProxyHeader
from persistproxy.timers import TimeoutQueue

__all__ = ["HeaderReader", "ProxyHeaderFactory", "Senders"]


class Senders:
    """
    The networks allowed to send a PROXY protocol header (C{proxy_protocol_from}), matched
    with the C library's address parser and integer masks: this runs at every accept.
    """

    def __init__(self, networks: Iterable[str]) -> None:
        self._v4: list[tuple[int, int]] = []
        self._v6: list[tuple[int, int]] = []
        for text in networks:
            net = ipaddress.ip_network(text, strict=False)
            entry = (int(net.network_address), int(net.netmask))
            (self._v4 if net.version == 4 else self._v6).append(entry)

    def allows(self, host: str | None) -> bool:
        """
        Whether a peer at C{host} may send a header. A UNIX socket's peer (no host) may: who
        can connect to it is up to the socket file's permissions.
        """
        if host is None:
            return True
        try:
            ip = int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
        except OSError:
            try:
                ip = int.from_bytes(socket.inet_pton(socket.AF_INET6, host), "big")
            except OSError:
                return False  # not an address (or one with a scope): not a sender we know
            if any(ip & mask == net for net, mask in self._v6):
                return True
            if ip >> 32 != 0xFFFF:
                return False
            ip &= 0xFFFFFFFF  # IPv4-mapped (a dual-stack socket): its IPv4 networks too
        return any(ip & mask == net for net, mask in self._v4)


def _expired(reader: HeaderReader) -> None:
    reader.timed_out()


@implementer(IProtocolFactory)
class ProxyHeaderFactory:
    """
    Reads the PROXY protocol header of each accepted connection, then hands the connection to
    C{wrapped} (the listener's TLS or admission factory) as coming from the carried address.
    """

    noisy = False

    def __init__(
        self,
        wrapped: IProtocolFactory,
        clock: IReactorTime,
        limits: ConnectionLimits,
        stats: ListenerStats,
        registry: ConnectionRegistry,
        log: EventLog,
        listener: str,
        senders: Senders,
        timeout: float,
    ) -> None:
        """
        @param wrapped: builds the rest of the chain; its admission must be
            C{identified=True} (this factory admitted every connection already).
        @param timeout: seconds a connection may take to send its whole header (> 0).
        """
        self.wrappedFactory = wrapped
        self.limits = limits
        self.stats = stats
        self.registry = registry
        self.log = log
        self.listener = listener
        self.timeout = timeout
        self._senders = senders
        self.queue: TimeoutQueue[HeaderReader] = TimeoutQueue(clock, timeout, _expired)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = getattr(wrapped, "logPrefix", None)
        return f"{prefix() if prefix else type(wrapped).__name__} (PROXY)"

    def buildProtocol(self, addr: Any) -> HeaderReader | None:
        host = getattr(addr, "host", None)
        if not self._senders.allows(host):
            # Closed by the port at once: no byte of it is read, no timer or buffer spent.
            self.stats.connections_rejected += 1
            self.log.warning(
                "proxy_protocol.refused",
                listener=self.listener,
                peer=host,
                reason="not in proxy_protocol_from",
            )
            return None
        return HeaderReader(self, addr, self.limits.admit(None) == HOLD)

    def rejected(self, reader: HeaderReader, reason: str) -> None:
        self.stats.connections_rejected += 1
        self.log.warning(
            "proxy_protocol.invalid",
            listener=self.listener,
            peer=getattr(reader.address, "host", None),
            reason=reason,
        )


# HeaderReader states.
_HELD = "HELD"
_READING = "READING"
_SERVING = "SERVING"
_CLOSED = "CLOSED"


@implementer(IProtocol, IHalfCloseableProtocol)
class HeaderReader:
    """
    One connection until its header is read, then the pass-through to the protocol built for
    the carried address.

    @ivar state: C{"HELD"}: accepted past C{max_connections} (or the descriptor budget), not
        read until a slot frees. C{"READING"}: the header is awaited (C{header_timeout}
        runs). C{"SERVING"}: the header was read and the chain built for its address gets
        every event. C{"CLOSED"}: refused or gone; nothing more is read.
    @ivar address: the peer's own address (the sender of the header).
    """

    __slots__ = ("_counted", "_factory", "_inner", "_parser", "address", "state", "transport")

    def __init__(self, factory: ProxyHeaderFactory, address: Any, held: bool) -> None:
        self._factory = factory
        self.address = address
        self.state = _HELD if held else _READING
        #: The connection's slot among max_connections is this reader's to give back.
        self._counted = not held
        self._parser: HeaderParser | None = HeaderParser()
        self._inner: IProtocol | None = None
        self.transport: Any = None

    @property
    def inner(self) -> IProtocol | None:
        """The protocol serving the connection once the header is read."""
        return self._inner

    # -- IProtocol ----------------------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        factory = self._factory
        factory.registry.add(self)
        if self.state == _HELD:
            factory.limits.hold(self)
            transport.pauseProducing()
            return
        factory.queue.add(self)

    def connectionMade(self) -> None:
        """Never called: L{makeConnection} does the work."""

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == _SERVING:
            self._inner.dataReceived(data)  # type: ignore[union-attr]
            return
        if state != _READING:
            return
        parser = self._parser
        assert parser is not None
        try:
            found = parser.feed(data)
        except InvalidHeader as e:
            self._reject(str(e))
            return
        if found is not None:
            self._serve(*found)

    def readConnectionLost(self) -> None:
        if self.state == _SERVING:
            half = IHalfCloseableProtocol(self._inner, None)
            if half is not None:
                half.readConnectionLost()
                return
        elif self.state == _READING:
            parser = self._parser
            got = parser.buffered if parser is not None else 0
            self._reject(f"the connection closed before a complete header ({got} bytes)")
            return
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.state == _SERVING:
            half = IHalfCloseableProtocol(self._inner, None)
            if half is not None:
                half.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        factory = self._factory
        if self.state == _SERVING:
            inner, self._inner = self._inner, None
            self.state = _CLOSED
            self.transport = None
            if inner is not None:
                inner.connectionLost(reason)
            return
        factory.queue.discard(self)
        if self._counted:
            self._counted = False
            factory.limits.release(None)
        elif self.state == _HELD:
            factory.limits.forget_held(self)
        self.state = _CLOSED
        self._parser = None
        factory.registry.discard(self)
        self.transport = None

    # -- what the listener's limits call (Holdable) -------------------------------------------

    @property
    def peer(self) -> None:
        """No client yet: the header that names it has not been read."""
        return None

    def unhold(self) -> None:
        """A slot is free (the limits counted this connection in): read its header."""
        if self.state != _HELD:
            return
        self.state = _READING
        self._counted = True
        transport = self.transport
        if transport is not None:
            transport.resumeProducing()
            self._factory.queue.add(self)

    # -- what the drain calls (DrainAware) ------------------------------------------------------

    def close_if_idle(self) -> bool:
        """Nothing is owed to a connection whose header is still awaited: close it."""
        if self.transport is not None and self.state != _SERVING:
            self.transport.loseConnection()
        return True

    def drain_cut(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    # -- the header's wait --------------------------------------------------------------------

    def timed_out(self) -> None:
        """C{header_timeout} passed without a complete header."""
        if self.state != _READING:
            return
        parser = self._parser
        got = parser.buffered if parser is not None else 0
        self._reject(f"no complete header within {self._factory.timeout:g}s ({got} bytes)")

    def logPrefix(self) -> str:
        inner = self._inner
        prefix = getattr(inner, "logPrefix", None) if inner is not None else None
        return prefix() if prefix is not None else "PROXY header"  # type: ignore[no-any-return]

    # -- internals ----------------------------------------------------------------------------

    def _reject(self, reason: str) -> None:
        """Closed without an answer: whatever the peer sent is not for anyone."""
        factory = self._factory
        self.state = _CLOSED
        self._parser = None
        factory.queue.discard(self)
        factory.rejected(self, reason)
        self.transport.loseConnection()

    def _serve(self, header: ProxyHeader, rest: bytes) -> None:
        """
        The header is in: build the listener's chain for the client it names and hand the
        connection (and the bytes after the header) to it.
        """
        factory = self._factory
        transport = self.transport
        factory.queue.discard(self)
        self._parser = None
        source = header.source
        if source is None:
            source = self.address  # LOCAL, UNKNOWN...: the connection is its own client
        else:
            _carry(transport, source, header.destination)
        # From here the admission owns the connection's slot (it counts, refuses or releases).
        self._counted = False
        inner = factory.wrappedFactory.buildProtocol(source)
        if inner is None:
            self.state = _CLOSED
            factory.registry.discard(self)
            transport.loseConnection()
            return
        self.state = _SERVING
        self._inner = inner
        inner.makeConnection(transport)
        # Now that the admitted connection is registered (the drain must not see none open).
        factory.registry.discard(self)
        if rest and self.state == _SERVING and not getattr(transport, "disconnecting", False):
            inner.dataReceived(rest)


def _carry(transport: Any, source: Any, destination: Any) -> None:
    """
    Make this transport's C{getPeer()} (and C{getHost()}) say what the header said, for every
    layer above it: instance attributes over the methods, on this connection's transport
    object only (a transport without an instance dictionary keeps its own addresses; the
    plugin gets the carried address from C{buildProtocol} either way).
    """
    try:
        transport.getPeer = lambda: source
        if destination is not None:
            transport.getHost = lambda: destination
    except AttributeError:  # pragma: no cover - a transport with __slots__
        pass
