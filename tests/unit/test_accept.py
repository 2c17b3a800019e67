"""
The lean accept path: connections are accepted and built as Twisted's port would, the log
strings are computed only when read, and an orderly close needs no shutdown() first.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet.protocol import Factory, Protocol

from persistproxy.net.accept import ProxyPort, ProxyServer
from persistproxy.net.reactor import ProxyReactor


class Seen(Protocol):
    def connectionMade(self) -> None:
        self.factory.made.append(self)  # type: ignore[attr-defined]


def _factory() -> Any:
    factory = Factory.forProtocol(Seen)
    factory.made = []  # type: ignore[attr-defined]
    return factory


def test_accepts_every_waiting_connection_into_a_proxy_server() -> None:
    reactor = ProxyReactor()
    factory = _factory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        assert isinstance(port, ProxyPort)
        address = port.getHost()
        clients = [socket.create_connection((address.host, address.port)) for _ in range(3)]
        port.doRead()
        assert len(factory.made) == 3
        transport = factory.made[0].transport
        assert isinstance(transport, ProxyServer)
        assert transport.getPeer().port == clients[0].getsockname()[1]
        assert "_logstr" not in vars(transport), "the log prefix is not formatted eagerly"
        assert transport.logstr == "Seen,0,127.0.0.1"
        assert repr(transport) == f"<Seen #0 on {address.port}>"
        # An orderly close: close() alone, and the client sees the end of the stream.
        for made in factory.made:
            reactor.removeReader(made.transport)
        transport._closeSocket(True)
        clients[0].settimeout(5)
        assert clients[0].recv(1) == b""
        for client in clients:
            client.close()
        for made in factory.made[1:]:
            made.transport._closeSocket(False)
    finally:
        port.stopListening()


class _Refusing:
    """A listening socket whose first accept() meets netfilter's EPERM."""

    def __init__(self) -> None:
        self.calls = 0

    def _accept(self) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise PermissionError(errno.EPERM, "netfilter")
        raise BlockingIOError(errno.EAGAIN, "no more")


def test_eperm_is_skipped_and_the_batch_size_adapts() -> None:
    reactor = ProxyReactor()
    factory = _factory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    real = port.socket
    try:
        port.socket = _Refusing()  # type: ignore[assignment]
        port.doRead()
        assert port.socket.calls == 2  # type: ignore[attr-defined]
        assert factory.made == []
        assert port.numberAccepts == 1
    finally:
        port.socket = real
        port.stopListening()
