# -*- test-case-name: tests.unit.test_limits -*-
"""
Admission control for one listener: how many connections in all, how many per client
address, and how many idle keep-alive connections a client may park.

Every decision is made when a connection is accepted, goes idle, becomes busy or closes: each
is O(1) on dicts keyed by the client's address, with no periodic scan. Per-client counts key
on C{address.host} (Twisted's own C{LimitConnectionsByPeer} indexes the address like a tuple,
which modern address objects do not support). Besides its own C{max_connections}, a listener
admits only while the process's descriptor budget (L{persistproxy.descriptors}, shared by
every listener) has room.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from zope.interface import implementer

from persistproxy.descriptors import DescriptorBudget
from persistproxy.logs import EventLog
from persistproxy.metrics import ListenerStats
from persistproxy.policy import Deadline

__all__ = ["HOLD", "ConnectionLimits", "Holdable", "Reapable", "Rejection"]

#: L{ConnectionLimits.admit}'s answer for a connection accepted past C{max_connections} or
#: past the descriptor budget.
HOLD = "hold"


class Reapable(Protocol):
    def reap_idle(self) -> None:
        """Close this idle connection now: its client has too many idle ones."""


class Holdable(Protocol):
    @property
    def peer(self) -> str | None:
        """The client's address; L{None} while it is not known (a PROXY header awaited)."""


    def unhold(self) -> None:
        """Start serving: a connection slot is free."""


class ConnectionLimits:
    """
    The connection limits of one listener.

    @ivar port: the listening port, set once it listens; reading from it stops while
        C{max_connections} are open, or while the descriptor budget is full, so that further
        clients wait in the kernel's backlog.
    """

    def __init__(
        self,
        listener: str,
        max_connections: int,
        per_client: int,
        idle_per_client: int,
        log: EventLog,
        stats: ListenerStats,
        budget: DescriptorBudget | None = None,
    ) -> None:
        """
        @param budget: the process's descriptor budget, shared by every listener; none (no
            limit but C{max_connections}) if not given.
        """
        self.listener = listener
        self.max_connections = max_connections
        self.per_client = per_client
        self.idle_per_client = idle_per_client
        self.port: Any = None
        self.total = 0
        self._log = log
        self._stats = stats
        self._clients: dict[str, int] = {}
        self._idle: dict[str, dict[Reapable, None]] = {}
        self._held: deque[Holdable] = deque()
        self._accepting = True
        self._budget = budget if budget is not None else DescriptorBudget()
        self._budget.add_listener(self)

    def update(self, max_connections: int, per_client: int, idle_per_client: int) -> None:
        """
        A reload changed the limits: they apply from the next decision on, to the
        connections already counted too (a lower C{max_connections} holds new ones until
        enough of those close; a higher one serves held ones at once).
        """
        self.max_connections = max_connections
        if not per_client:
            self._clients.clear()
        self.per_client = per_client
        if not idle_per_client:
            self._idle.clear()
        self.idle_per_client = idle_per_client
        self.budget_freed()  # serves held connections and reads the port, if there is room
        if self._accepting and not self._has_room():
            self._set_accepting(False)

    def admit(self, host: str | None) -> str | None:
        """
        Count a new connection from C{host}, or say why it is refused.

        @param host: L{None} for a connection whose client is not known yet (its PROXY
            protocol header is awaited): it takes its place among C{max_connections} and in
            the descriptor budget now, and L{identify} counts it for its client later.
        """
        if host is not None and self.per_client and self._clients.get(host, 0) >= self.per_client:
            self._refused(host, "per-client connection limit")
            # Its socket lingers for the answer (see Rejection): a flood of refused
            # connections must not take the descriptors of admitted ones.
            self._budget.admitted()
            return "too many connections from your address"
        if not self._has_room():
            # Accepted in the same accept() burst as the connection that reached the limit,
            # before reading from the port stopped: it waits, unread, as if in the backlog.
            return HOLD
        self._count(host)
        return None

    def identify(self, host: str) -> str | None:
        """
        A connection admitted without a client (C{admit(None)}) now has one: count it for
        C{host}, or say why it is refused. A refused one leaves C{max_connections} at once
        and the descriptor budget when its refusal closes (L{refusal_closed}), as a
        connection refused by L{admit}.
        """
        if not self.per_client:
            return None
        if self._clients.get(host, 0) >= self.per_client:
            self._refused(host, "per-client connection limit")
            self.total -= 1
            self.budget_freed()
            return "too many connections from your address"
        self._clients[host] = self._clients.get(host, 0) + 1
        return None

    def _has_room(self) -> bool:
        return (
            not self.max_connections or self.total < self.max_connections
        ) and self._budget.has_room()

    def hold(self, connection: Holdable) -> None:
        """
        Keep an accepted connection unread until a slot frees (see L{HOLD}).
        """
        self._held.append(connection)

    def forget_held(self, connection: Holdable) -> None:
        """A held connection closed before it was served."""
        with contextlib.suppress(ValueError):
            self._held.remove(connection)

    def release(self, host: str | None) -> None:
        """A counted connection closed (L{None}: one never identified)."""
        self.total -= 1
        if self.per_client and host is not None:
            left = self._clients.get(host, 1) - 1
            if left:
                self._clients[host] = left
            else:
                self._clients.pop(host, None)
        self._budget.left(self)
        self.budget_freed()

    def refusal_closed(self) -> None:
        """A refused connection (see L{admit}) closed."""
        self._budget.left(self)
        self.budget_freed()

    def _count(self, host: str | None) -> None:
        self.total += 1
        if self.per_client and host is not None:
            self._clients[host] = self._clients.get(host, 0) + 1
        self._budget.admitted()
        if self.max_connections and self.total >= self.max_connections and self._accepting:
            self._set_accepting(False)

    # -- what the descriptor budget calls ------------------------------------------------------

    def budget_full(self) -> None:
        if self._accepting:
            self._set_accepting(False)

    def budget_freed(self) -> None:
        held = self._held
        while held and self._has_room():
            connection = held.popleft()
            self._count(connection.peer)
            connection.unhold()
        if not self._accepting and self._has_room():
            self._set_accepting(True)

    def went_idle(self, host: str, connection: Reapable) -> None:
        """
        C{connection} waits for its client's next request; reap that client's oldest idle
        connection if it now has too many.
        """
        limit = self.idle_per_client
        if not limit:
            return
        idle = self._idle.get(host)
        if idle is None:
            idle = self._idle[host] = {}
        idle[connection] = None
        if len(idle) > limit:
            oldest = next(iter(idle))
            del idle[oldest]
            self._log.info(
                "client.idle_reaped", listener=self.listener, client=host, idle_limit=limit
            )
            oldest.reap_idle()

    def went_busy(self, host: str, connection: Reapable) -> None:
        idle = self._idle.get(host)
        if idle is not None:
            idle.pop(connection, None)
            if not idle:
                del self._idle[host]

    def _refused(self, host: str, why: str) -> None:
        self._stats.connections_rejected += 1
        self._log.warning("client.refused", listener=self.listener, client=host, reason=why)

    def _set_accepting(self, accepting: bool) -> None:
        self._accepting = accepting
        port = self.port
        if port is None:
            return
        if accepting:
            port.startReading()
            self._log.info("listener.accepting", listener=self.listener, open=self.total)
        else:
            port.stopReading()
            full = self.max_connections and self.total >= self.max_connections
            self._log.warning(
                "listener.full",
                listener=self.listener,
                max_connections=self.max_connections,
                open=self.total,
                reason="max_connections" if full else "descriptors",
                budget_fits=self._budget.fits or None,
            )


@implementer(IHalfCloseableProtocol)
class Rejection(TwistedProtocol):
    """
    Answers a refused connection with a fixed response (a 503 for HTTP, nothing for raw TCP)
    and closes it gracefully: half-close, then drop whatever the client still sends for a
    moment, so the answer is read rather than destroyed by a reset.
    """

    def __init__(
        self,
        clock: IReactorTime,
        response: bytes,
        linger: float = 1.0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """
        @param on_close: called once the connection is closed (the listener uncounts it).
        """
        self._response = response
        self._timer = Deadline(clock, self._give_up)
        self._linger = linger
        self._on_close = on_close

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self._response:
            transport.write(self._response)
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is None or not self._response:
            transport.loseConnection()
            return
        lose_write()
        self._timer.arm(self._linger)

    def dataReceived(self, data: bytes) -> None:
        """Discarded: the request is refused whatever it says."""

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        """The answer is out; wait for the client to close, briefly."""

    def connectionLost(self, reason: Any = None) -> None:
        self._timer.stop()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def _give_up(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()
