# -*- test-case-name: tests.unit.test_accept -*-
"""
The listener's accept path: Twisted's TCP port and server transport, minus per-connection
work a proxy does not use.

For every accepted connection Twisted's C{Port.doRead} builds a log-buffering context and
two C{Logger}s, runs a generator, and C{Server.__init__} formats two strings (a log prefix
and a repr) that are read only if something logs through the legacy log system. Closing
calls C{shutdown(SHUT_RDWR)} before C{close}, which Twisted's own comment calls unnecessary
since sockets are close-on-exec; after a graceful close it fails with C{ENOTCONN} anyway.
Profiling TLS handshakes (a connection per request) put these at several percent of the
CPU time of a connection. Here they are gone or computed on demand; everything else, error
recovery included, is Twisted's.

L{persistproxy.net.reactor.ProxyReactor} listens (and adopts systemd's sockets) with these,
unless the self-check (L{persistproxy.net.selfcheck}) finds that the Twisted internals they
copy or read (C{tcp.Server.__init__}, C{socket._accept}, C{Port._buildAddr}...) changed.
"""

from __future__ import annotations

import socket
from errno import EPERM
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv6Address
from twisted.logger import Logger

__all__ = ["ProxyPort", "ProxyServer"]

_log = Logger()


class ProxyServer(tcp.Server):
    """An accepted connection."""

    # Sockets are close-on-exec: close() alone ends the connection (see the module doc).
    _shouldShutdown = False
    _logstr: str | None = None
    _repstr: str | None = None

    def __init__(
        self,
        sock: socket.socket,
        protocol: Any,
        client: tuple[Any, ...],
        server: tcp.Port,
        sessionno: int,
        reactor: Any,
    ) -> None:
        # tcp.Server.__init__ without the eager string formatting.
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()  # type: ignore[no-untyped-call]
        self.connected = 1

    @property  # type: ignore[override]
    def logstr(self) -> str:
        if self._logstr is None:
            prefix = self._getLogPrefix(self.protocol)
            self._logstr = f"{prefix},{self.sessionno},{self.hostname}"
        return self._logstr

    @logstr.setter
    def logstr(self, value: str) -> None:
        self._logstr = value

    @property  # type: ignore[override]
    def repstr(self) -> str:
        if self._repstr is None:
            port = self.server._realPortNumber if self.server is not None else None
            self._repstr = f"<{type(self.protocol).__name__} #{self.sessionno} on {port}>"
        return self._repstr

    @repstr.setter
    def repstr(self, value: str) -> None:
        self._repstr = value


class ProxyPort(tcp.Port):
    """A listening TCP port whose accepted connections are L{ProxyServer}s."""

    transport = ProxyServer

    def doRead(self) -> None:
        accepted = 0
        # socket.accept() converts the listening socket's family and type to enums for
        # every connection; the C method and plain ints give the same socket.
        family, kind = int(self.addressFamily), int(self.socketType)
        make_socket = socket.socket
        try:
            accept: Any = self.socket._accept  # type: ignore[union-attr]
            build: Any = self.factory.buildProtocol  # type: ignore[union-attr]
            address: Any = self._buildAddr
            for _ in range(self.numberAccepts):
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == EPERM:  # netfilter refused it; there may be more
                        continue
                    # Out of file descriptors and the like: Twisted's loop knows how to
                    # recover (it keeps a descriptor in reserve for this).
                    tcp.Port.doRead(self)  # type: ignore[no-untyped-call]
                    return
                skt = make_socket(family, kind, 0, fd)
                accepted += 1
                if len(addr) == 4:
                    # IPv6: the scope id, as Twisted does.
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                protocol = build(address(addr))
                if protocol is None:
                    skt.close()
                    continue
                sessionno = self.sessionno
                self.sessionno = sessionno + 1
                transport = ProxyServer(skt, protocol, addr, self, sessionno, self.reactor)
                protocol.makeConnection(transport)
        except Exception:
            _log.failure("error while accepting on {port!r}", port=self)
        # Twisted's adaptive batch size: grow while every try finds a connection.
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)
