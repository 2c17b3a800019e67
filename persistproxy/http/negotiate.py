# -*- test-case-name: tests.unit.test_h2 -*-
"""
The choice between HTTP/1.x and HTTP/2 on a listener that offers both, made on the first
bytes of a connection.

Over TLS the handshake has decided already: the transport says which ALPN protocol it chose
(C{negotiatedProtocol}), and only C{h2} means HTTP/2. Over cleartext with C{h2c = true} the
client speaks HTTP/2 with prior knowledge, which its first 24 bytes (the connection preface)
show; anything else is HTTP/1.x.

The HTTP/1.x connection is made as the connection is accepted, as on a listener without
HTTP/2, so its timers (the first request's header timeout) count from the accept either way;
HTTP/2 takes over from it, and from the same moment, when the bytes say so. A listener that
does not offer HTTP/2 never builds this protocol: its factory returns the HTTP/1.x one
directly.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.http.client_connection import ClientConnection
from persistproxy.http.context import ListenerContext
from persistproxy.http.h2_connection import H2Connection
from persistproxy.http.h2_defences import PREFACE

__all__ = ["NegotiatingConnection"]

_HANDED_OVER = Failure(ConnectionError("the connection speaks HTTP/2"))
_CONNECTION_DONE = Failure(ConnectionError("connection closed"))


@implementer(IHalfCloseableProtocol)
class NegotiatingConnection(Protocol):
    """
    A client connection of a listener offering HTTP/2: HTTP/1.x until the first bytes say
    otherwise, then whichever it is, for good.
    """

    def __init__(self, ctx: ListenerContext, peer: Any = None, cleartext: bool = False) -> None:
        """
        @param cleartext: decide by the preface (C{h2c}) rather than by ALPN.
        """
        self._ctx = ctx
        self._peer = peer
        self._cleartext = cleartext
        self._inner: Any = ClientConnection(ctx, peer=peer)
        self._decided = False
        self._head = b""
        self._born = 0.0
        self._facts: dict[str, Any] | None = None

    @property
    def inner(self) -> Any:
        """The protocol the connection speaks (HTTP/1.x until decided)."""
        return self._inner

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.connected = 1
        self._born = self._ctx.clock.seconds()
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._decided:
            self._inner.dataReceived(data)
            return
        if self._cleartext:
            head = self._head + data
            if len(head) < len(PREFACE) and PREFACE.startswith(head):
                self._head = head  # at most 23 bytes: wait for the rest of the preface
                return
            self._head = b""
            self._decided = True
            if head.startswith(PREFACE):
                self._switch()
            self._inner.dataReceived(head)
            return
        self._decided = True
        if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
            self._switch()
        self._inner.dataReceived(data)

    def _switch(self) -> None:
        """HTTP/2 it is: the HTTP/1.x connection, which read nothing, is retired quietly."""
        h1 = self._inner
        peer = h1.peer
        h1.connectionLost(_HANDED_OVER)  # stops its timers; it never touched the transport
        h2 = self._inner = H2Connection(self._ctx, peer, self._born)
        if self._facts is not None:
            h2.tls_established(self._facts)
        h2.makeConnection(self.transport)  # type: ignore[no-untyped-call]

    # -- passed on to whichever protocol it is -----------------------------------------------

    def readConnectionLost(self) -> None:
        if not self._decided and self._head:
            # A client that sent part of the preface and stopped: HTTP/1.x judges the bytes.
            self._decided = True
            head, self._head = self._head, b""
            self._inner.dataReceived(head)
        self._inner.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self._inner.writeConnectionLost()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self.connected = 0
        self._inner.connectionLost(reason)

    def tls_established(self, facts: dict[str, Any]) -> None:
        self._facts = facts
        self._inner.tls_established(facts)

    def close_if_idle(self) -> bool:
        return bool(self._inner.close_if_idle())

    def drain_cut(self) -> None:
        self._inner.drain_cut()

    def logPrefix(self) -> str:
        return "HTTP"
