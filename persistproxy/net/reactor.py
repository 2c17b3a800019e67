# -*- test-case-name: tests.unit.test_reactor -*-
"""
The epoll reactor without the legacy logging context around every I/O event.

Twisted's epoll reactor wraps each readiness event in C{log.callWithLogger}, which builds a
context dictionary and asks the selectable for its log prefix, only so that legacy
C{twisted.python.log} messages emitted inside can be tagged with it. persistproxy logs through
structlog and C{twisted.logger}, which do not read that context, and a proxied request is two
events; profiling put the wrapper at several microseconds of each request. Errors escaping
an event handler are still caught and logged, and the descriptor is still dropped by
C{_doReadOrWrite} exactly as before.

Its TCP ports accept through L{persistproxy.net.accept}, which drops per-connection work Twisted's
port does only for its legacy logging.

It also offers C{call_after_event}: work deferred to the end of the I/O event (or timed call)
being handled, without a C{DelayedCall}. The TLS transport uses it to send the records one
event produced (a response head, its body) in one C{send}.

twistd uses it when the persistproxy plugin is asked for and no other reactor was chosen
(C{twistd --reactor=...} still wins), and it is available as C{twistd -r persistproxy}.

C{doPoll} is a copy of Twisted's and reads the epoll reactor's private state; L{install}
installs Twisted's own C{EPollReactor} instead when the self-check
(L{persistproxy.net.selfcheck}) finds that state changed, and the listening methods use
Twisted's port when it finds the accept path's internals changed.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

from persistproxy.net.accept import ProxyPort
from persistproxy.net.selfcheck import usable

__all__ = ["ProxyReactor", "install"]

_log = Logger()


class ProxyReactor(EPollReactor):  # type: ignore[misc]
    def __init__(self) -> None:
        self._after_event: list[Callable[[], None]] = []
        super().__init__()  # type: ignore[no-untyped-call]

    def call_after_event(self, f: Callable[[], None]) -> None:
        """
        Call C{f} once the I/O event being handled is done, before the next one; when
        called from a timed call, before the reactor next waits for I/O.
        """
        self._after_event.append(f)

    def _run_after_event(self) -> None:
        pending = self._after_event
        self._after_event = []
        for f in pending:
            try:
                f()
            except Exception:
                _log.failure("unhandled error in {f!r}, run after an event", f=f)

    # -- listening with the lean accept path (persistproxy.net.accept)

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        if not usable("accept"):
            return super().listenTCP(port, factory, backlog, interface)  # type: ignore[no-untyped-call]
        listening = ProxyPort(port, factory, backlog, interface, self)
        listening.startListening()  # type: ignore[no-untyped-call]
        return listening

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> Any:
        if addressFamily not in (socket.AF_INET, socket.AF_INET6) or not usable("accept"):
            return super().adoptStreamPort(  # type: ignore[no-untyped-call]
                fileDescriptor, addressFamily, factory
            )
        listening = ProxyPort._fromListeningDescriptor(  # type: ignore[no-untyped-call]
            self, fileDescriptor, addressFamily, factory
        )
        listening.startListening()
        return listening

    # -- the loop

    def doPoll(self, timeout: float | None) -> None:
        if self._after_event:
            self._run_after_event()  # queued by timed calls, which ran just before
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        handle: Any = self._doReadOrWrite
        selectables: dict[int, Any] = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)
                except Exception:
                    _log.failure(
                        "unhandled error in the I/O event of {selectable!r}", selectable=selectable
                    )
                if self._after_event:
                    self._run_after_event()

    doIteration = doPoll


def install() -> None:
    """
    Install L{ProxyReactor} as the global reactor (must run before any reactor import), or
    Twisted's C{EPollReactor} if the self-check found the internals it relies on changed.
    """
    from twisted.internet.main import installReactor

    reactor = ProxyReactor() if usable("reactor") else EPollReactor()
    installReactor(reactor)  # type: ignore[no-untyped-call]
