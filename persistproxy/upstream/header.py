# -*- test-case-name: tests.unit.test_upstream_header -*-
"""
C{send_proxy_protocol = "v1" | "v2"}: every connection to the upstream's servers starts with
a PROXY protocol header naming the client it serves.

The header goes first on the TCP connection, before anything its protocol sends, and before
a TLS handshake with a C{tls = true} upstream (a receiver such as HAProxy's C{accept-proxy}
reads it in clear, then the handshake): L{HeaderFirstEndpoint} wraps the plain TCP endpoint,
under any TLS endpoint. Its protocol writes the header when the connection is made, then hands
the transport itself to the protocol it wraps, so that protocol still writes straight to the
socket; reads pass through it (one Python call each, on such upstreams only).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.interfaces import ClientAddresses
from persistproxy.net.proxyproto import encode

__all__ = ["HeaderFirstEndpoint", "header_for"]


def header_for(version: str, key: Hashable | None) -> bytes:
    """
    The header of a connection opened for C{key}: the client a L{ClientAddresses} names, or
    "unknown" (v1 C{UNKNOWN}; the server then takes our own address as the client's).
    """
    if isinstance(key, ClientAddresses):
        return encode(version, key.source, key.destination)
    return encode(version, None, None)


@implementer(IStreamClientEndpoint)
class HeaderFirstEndpoint:
    """
    Connects through C{endpoint} (plain TCP) and writes C{header} before anything else.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, header: bytes) -> None:
        self.endpoint = endpoint
        self.header = header

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d = self.endpoint.connect(_HeaderFirstFactory(protocolFactory, self.header))
        return d.addCallback(_unwrapped)


def _unwrapped(first: Any) -> Any:
    """The protocol the caller asked for, not the pass-through in front of it."""
    return first.wrapped


@implementer(IProtocolFactory)
class _HeaderFirstFactory:
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, header: bytes) -> None:
        self.wrapped = wrapped
        self.header = header

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> _HeaderFirst | None:
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        if IHalfCloseableProtocol.providedBy(protocol):
            return _HalfCloseableHeaderFirst(protocol, self.header)
        # Not claiming half-closes it cannot hear: the transport then ends the connection at
        # the server's FIN, as it would for the protocol alone.
        return _HeaderFirst(protocol, self.header)


@implementer(IProtocol)
class _HeaderFirst:
    """The header, then the wrapped protocol's: every event passes through."""

    __slots__ = ("header", "transport", "wrapped")

    def __init__(self, wrapped: IProtocol, header: bytes) -> None:
        self.wrapped = wrapped
        self.header = header
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.header)
        self.wrapped.makeConnection(transport)

    def connectionMade(self) -> None:
        """Never called: L{makeConnection} does the work."""

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self.transport = None
        self.wrapped.connectionLost(reason)

    def logPrefix(self) -> str:
        prefix = getattr(self.wrapped, "logPrefix", None)
        return prefix() if prefix is not None else type(self.wrapped).__name__  # type: ignore[no-any-return]


@implementer(IHalfCloseableProtocol)
class _HalfCloseableHeaderFirst(_HeaderFirst):
    __slots__ = ()

    def readConnectionLost(self) -> None:
        self.wrapped.readConnectionLost()  # type: ignore[attr-defined]

    def writeConnectionLost(self) -> None:
        self.wrapped.writeConnectionLost()  # type: ignore[attr-defined]
