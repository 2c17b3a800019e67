# -*- test-case-name: tests.unit.test_pool -*-
"""
The pool of persistent connections to one origin server.

Idle connections are kept on a stack: the most recently used one is handed out first, so
under falling load the surplus sits at the bottom and ages out, instead of every socket
being kept warm by FIFO rotation. Because connections are only ever pushed on top, the
stack is ordered by the time each became idle, and one timer aimed at the bottom entry reaps
all expired connections: no periodic scan, O(1) per event.

Nothing caps idle connections below C{pool_size}, so the pool holds as many as recent
concurrency needed; a small fixed idle cap makes a proxy close and reopen upstream
connections under load (nginx's default of 32 loses a quarter of its throughput at 50
concurrent clients on this kind of machine). Instead, idle connections count against the
process's descriptor budget (L{persistproxy.descriptors.DescriptorBudget}): when a client or
another connect needs a descriptor, the oldest idle connection of all pools is closed first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from persistproxy.config import UpstreamConfig
from persistproxy.descriptors import DescriptorBudget, out_of_descriptors
from persistproxy.interfaces import C, ConnectionWaiter
from persistproxy.logs import EventLog
from persistproxy.policy import Deadline

__all__ = ["Connector", "ServerPool"]

T = TypeVar("T")
#: Opens one connection to the pool's server.
Connector = Callable[[], "Deferred[T]"]
class ServerPool(Generic[C]):
    """
    Persistent connections to one C{host:port}, shared by every client connection; lends
    whatever L{persistproxy.interfaces.PooledConnection} its connector makes.

    @ivar active: connections lent out or being opened; bounded by C{max_connections}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        address: str,
        config: UpstreamConfig,
        connector: Connector[C],
        log: EventLog,
        budget: DescriptorBudget | None = None,
    ) -> None:
        """
        @param budget: the process's descriptor budget, which counts this pool's sockets and
            may ask it to close its oldest idle connection; none if not given.
        """
        self.address = address
        self.active = 0
        self.connects = 0
        self._clock = clock
        self._config = config
        self._connect = connector
        self._log = log
        self._idle: deque[C] = deque()
        self._idle_count = 0
        self._waiters: deque[tuple[ConnectionWaiter[C], Deadline | None]] = deque()
        self._reaper = Deadline(clock, self._reap)
        self._closed = False
        self._budget = budget if budget is not None else DescriptorBudget()
        self._budget.add_pool(self)

    @property
    def idle(self) -> int:
        return self._idle_count

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire(self, waiter: ConnectionWaiter[C], fresh: bool = False) -> None:
        """
        Lend a connection to C{waiter}: a pooled one unless C{fresh}, else a new one, else a
        place in the wait queue when C{max_connections} are already out.
        """
        if not fresh:
            connection = self._pop_idle()
            if connection is not None:
                self.active += 1
                waiter.connection_ready(connection, True)
                return
        limit = self._config.max_connections
        if limit and self.active >= limit:
            if len(self._waiters) >= self._config.queue_size:
                waiter.connection_failed(f"{self.address}: connection limit and queue full", 503)
                return
            deadline = None
            if self._config.queue_timeout:
                deadline = Deadline(self._clock, lambda: self._queue_timeout(waiter))
                deadline.arm(self._config.queue_timeout)
            self._waiters.append((waiter, deadline))
            return
        self._open(waiter)

    def release(self, connection: C, reusable: bool) -> None:
        """
        Take back a lent connection once its response is complete.
        """
        self.active -= 1
        now = self._clock.seconds()
        if (
            not reusable
            or (self._closed and not self._waiters)
            or not connection.usable(now, 0.0)
            or self._budget.pressed()
        ):
            connection.close()
            self._wake_waiter()
            return
        while self._waiters:
            waiter, deadline = self._waiters.popleft()
            if deadline is not None:
                deadline.stop()
            if not waiter.cancelled:
                self.active += 1
                waiter.connection_ready(connection, True)
                return
        if self._closed or self._idle_count >= self._config.pool_size:
            connection.close()
            return
        connection.idle_since = now
        connection.in_pool = True
        self._idle.append(connection)
        self._idle_count += 1
        if not self._reaper.armed:
            self._reaper.arm(self._config.idle_timeout)

    def forget(self) -> None:
        """
        A lent connection died; it is not coming back.
        """
        self.active -= 1
        self._wake_waiter()

    def close(self) -> None:
        """
        Close idle connections now and lent ones as they come back; what waits for a
        connection is refused.
        """
        self.retire()
        while self._waiters:
            waiter, deadline = self._waiters.popleft()
            if deadline is not None:
                deadline.stop()
            if not waiter.cancelled:
                waiter.connection_failed("shutting down", 503)

    def retire(self) -> None:
        """
        A reload replaced the pool: close idle connections now and lent ones as they come
        back, except that each one returned goes to the next request still waiting here
        (those were admitted before the reload, and must not fail because of it).
        """
        self._closed = True
        self._reaper.stop()
        while self._idle:
            connection = self._idle.pop()
            connection.in_pool = False
            connection.close()
        self._idle_count = 0
        # It never holds an idle connection again: nothing for the budget to shed here.
        self._budget.remove_pool(self)

    # -- what the descriptor budget calls ------------------------------------------------------

    def oldest_idle_since(self) -> float | None:
        idle = self._idle
        while idle and not idle[0].in_pool:
            idle.popleft()  # closed while idle; already uncounted
        return idle[0].idle_since if idle else None

    def shed_oldest_idle(self) -> None:
        connection = self._idle.popleft()
        connection.in_pool = False
        self._idle_count -= 1
        connection.close()

    # -- internals ----------------------------------------------------------------------------

    def _pop_idle(self) -> C | None:
        now = self._clock.seconds()
        margin = self._config.keepalive_margin
        timeout = self._config.idle_timeout
        # The margin never eats more than half of a short timeout, or nothing would be reused.
        horizon = now - timeout + min(margin, timeout / 2)
        while self._idle:
            connection = self._idle.pop()
            if not connection.in_pool:
                continue  # closed while idle; already uncounted
            connection.in_pool = False
            self._idle_count -= 1
            if connection.usable(now, margin) and connection.idle_since > horizon:
                return connection
            connection.close()
        return None

    def _reap(self) -> None:
        now = self._clock.seconds()
        timeout = self._config.idle_timeout
        idle = self._idle
        while idle:
            oldest = idle[0]
            if not oldest.in_pool:
                idle.popleft()
                continue
            if oldest.idle_since + timeout > now:
                self._reaper.arm(oldest.idle_since + timeout - now)
                return
            idle.popleft()
            oldest.in_pool = False
            self._idle_count -= 1
            oldest.close()

    def _on_lost(self, connection: C) -> None:
        self._budget.upstream_closed()
        # An idle connection that the origin closed stays in the deque, marked CLOSED, and is
        # skipped later: removing it from the middle would be a linear search.
        if connection.in_pool:
            connection.in_pool = False
            self._idle_count -= 1

    def _open(self, waiter: ConnectionWaiter[C]) -> None:
        self.active += 1
        self.connects += 1
        self._budget.upstream_opening()
        d = self._connect()

        def connected(connection: C) -> None:
            connection.on_lost = self._on_lost
            if waiter.cancelled:
                self.release(connection, True)
            else:
                waiter.connection_ready(connection, False)

        def failed(failure: Failure) -> None:
            self.active -= 1
            self._budget.upstream_closed()
            reason = failure.getErrorMessage() or repr(failure.value)
            # Out of descriptors is our state, not the origin's: 503 with Retry-After (the
            # client may try again once others leave), and an idle connection is given back.
            exhausted = failure.value is not None and out_of_descriptors(failure.value)
            self._log.warning(
                "upstream.connect_failed",
                server=self.address,
                reason=reason,
                out_of_descriptors=exhausted,
            )
            if exhausted:
                self._budget.shed_idle()
            if not waiter.cancelled:
                waiter.connection_failed(
                    f"cannot connect to {self.address}: {reason}", 503 if exhausted else 502
                )
            self._wake_waiter()

        d.addCallbacks(connected, failed)

    def _wake_waiter(self) -> None:
        limit = self._config.max_connections
        while self._waiters and (not limit or self.active < limit):
            waiter, deadline = self._waiters.popleft()
            if deadline is not None:
                deadline.stop()
            if not waiter.cancelled:
                self.acquire(waiter)
                return

    def _queue_timeout(self, waiter: ConnectionWaiter[C]) -> None:
        for i, (queued, _) in enumerate(self._waiters):
            if queued is waiter:
                del self._waiters[i]
                break
        if not waiter.cancelled:
            waiter.connection_failed(f"{self.address}: no connection free in time", 503)
