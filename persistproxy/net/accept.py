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
CPU time of a connection. Here they are gone or computed on demand; everything else is
Twisted's, except two things that matter when descriptors run short:

 - The accept loop stops as soon as the factory stops reading the port (a listener at its
   C{max_connections} or the descriptor budget full). Twisted's loop goes on for the whole
   batch, and every connection accepted past the limit holds a descriptor while it waits.
 - When C{accept()} fails for want of descriptors or memory (C{EMFILE}, C{ENFILE},
   C{ENOBUFS}, C{ENOMEM}), the port stops reading for L{ACCEPT_RETRY} seconds, and the
   waiting clients stay in the kernel's backlog. Twisted's recovery closes its spare
   descriptor and accepts and closes every waiting client instead; without a spare, it
   calls C{accept()} again at every reactor turn (a busy loop) until a descriptor frees.

L{persistproxy.net.reactor.ProxyReactor} listens (and adopts systemd's sockets) with these,
unless the self-check (L{persistproxy.net.selfcheck}) finds that the Twisted internals they
copy or read (C{tcp.Server.__init__}, C{socket._accept}, C{Port._buildAddr}...) changed.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv6Address
from twisted.logger import Logger

__all__ = ["ACCEPT_RETRY", "ProxyPort", "ProxyServer"]

_log = Logger()

#: Seconds a port stops accepting after C{accept()} found no descriptor (or no memory).
ACCEPT_RETRY = 0.1
_SCARCE = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


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
    """
    A listening TCP port whose accepted connections are L{ProxyServer}s.

    @ivar _wanted: whether its owner wants it read (C{startReading}/C{stopReading}); the
        accept loop ends when this turns false.
    @ivar _backoff: the timer that resumes accepting after C{accept()} failed for want of
        descriptors; reading stays off while it runs, whatever the owner wants.
    @ivar _failed_accepts: C{accept()} failures since the last success, logged once each way.
    """

    transport = ProxyServer
    _wanted = False
    _backoff: Any = None
    _failed_accepts = 0

    def startReading(self) -> None:
        self._wanted = True
        # A listener whose connections close during the drain resumes a port that is
        # closing or closed: its socket must not be registered again.
        if self._backoff is None and self.connected and not self.disconnecting:
            super().startReading()  # type: ignore[no-untyped-call]

    def stopReading(self) -> None:
        self._wanted = False
        super().stopReading()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Any) -> None:
        backoff, self._backoff = self._backoff, None
        if backoff is not None and backoff.active():
            backoff.cancel()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _accept_failed(self, error: OSError) -> None:
        """No descriptor (or memory) for the next connection: stop reading for a moment."""
        self._failed_accepts += 1
        if self._failed_accepts == 1:
            _log.warn(
                "accept() on port {port} failed ({error}); retrying every {delay} s, clients "
                "wait in the backlog",
                port=self._realPortNumber,
                error=errno.errorcode.get(error.errno or 0, str(error)),
                delay=ACCEPT_RETRY,
            )
        super().stopReading()  # type: ignore[no-untyped-call]
        if self._backoff is None:
            self._backoff = self.reactor.callLater(ACCEPT_RETRY, self._retry_accept)  # type: ignore[attr-defined]

    def _retry_accept(self) -> None:
        self._backoff = None
        if self._wanted and self.connected:
            super().startReading()  # type: ignore[no-untyped-call]

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
                    if e.errno in (errno.EPERM, errno.ECONNABORTED):
                        continue  # netfilter refused it, or the client gave up: maybe more
                    if e.errno in _SCARCE:
                        self._accept_failed(e)
                        break
                    raise
                if self._failed_accepts:
                    _log.info(
                        "accept() on port {port} works again after {failures} failures",
                        port=self._realPortNumber,
                        failures=self._failed_accepts,
                    )
                    self._failed_accepts = 0
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
                if not self._wanted:
                    break  # full: the rest wait in the backlog, holding no descriptor
        except Exception:
            _log.failure("error while accepting on {port!r}", port=self)
        # Twisted's adaptive batch size: grow while every try finds a connection.
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)
