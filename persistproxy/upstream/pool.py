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

Connections can also be lent by key (L{ServerPool.keyed}): a connection opened for a key is
only ever lent again for that key, as when it started with a PROXY protocol header naming one
client (a forward proxy would key on the destination). Keyed idle connections are kept by key
(the most recent first, as above) and, all keys together, in the order they went idle: the
reaper and the budget see them as any idle connection, and when C{pool_size} idle connections
are held, the one idle longest (the least recently used key's) is closed to keep the newest.
So keys cost nothing past their idle connections, and at most C{pool_size} are remembered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from persistproxy.config import UpstreamConfig
from persistproxy.descriptors import DescriptorBudget, out_of_descriptors
from persistproxy.interfaces import C, ConnectionWaiter
from persistproxy.logs import EventLog
from persistproxy.policy import Deadline

__all__ = ["Connector", "KeyedConnector", "KeyedPool", "ServerPool"]

T = TypeVar("T")
#: Opens one connection to the pool's server.
Connector = Callable[[], "Deferred[T]"]
#: Opens one connection to the pool's server for a key (a client, a destination).
KeyedConnector = Callable[[Hashable], "Deferred[T]"]
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
        keyed_connector: KeyedConnector[C] | None = None,
    ) -> None:
        """
        @param budget: the process's descriptor budget, which counts this pool's sockets and
            may ask it to close its oldest idle connection; none if not given.
        @param keyed_connector: opens a connection for a key (one that starts with its
            client's PROXY protocol header); C{connector} is used for keys without it.
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
        self._keyed_connect = keyed_connector
        #: Keyed idle connections by key (most recent last), and all of them in the order
        #: they went idle (oldest first) with their key.
        self._by_key: dict[Hashable, list[C]] = {}
        self._keyed_idle: dict[C, Hashable] = {}
        self._waiters: deque[tuple[ConnectionWaiter[C], Deadline | None, Hashable | None]] = (
            deque()
        )
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

    def keyed(self, key: Hashable) -> KeyedPool[C]:
        """The pool as one key sees it: connections opened for C{key}, lent only to it."""
        return KeyedPool(self, key)

    def acquire(
        self, waiter: ConnectionWaiter[C], fresh: bool = False, key: Hashable | None = None
    ) -> None:
        """
        Lend a connection to C{waiter}: a pooled one unless C{fresh}, else a new one, else a
        place in the wait queue when C{max_connections} are already out.

        @param key: lend only a connection opened for this key (and open one for it).
        """
        if not fresh:
            connection = self._pop_idle() if key is None else self._pop_keyed(key)
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
            self._waiters.append((waiter, deadline, key))
            return
        self._open(waiter, key)

    def release(self, connection: C, reusable: bool, key: Hashable | None = None) -> None:
        """
        Take back a lent connection once its response is complete.

        @param key: the key it was lent for (it goes back among that key's).
        """
        self.active -= 1
        now = self._clock.seconds()
        if (
            not reusable
            or self._closed
            or not connection.usable(now, 0.0)
            or self._budget.pressed()
        ):
            connection.close()
            self._wake_waiter()
            return
        waiters = self._waiters
        while waiters:
            waiter, deadline, wanted = waiters[0]
            if waiter.cancelled:
                waiters.popleft()
                if deadline is not None:
                    deadline.stop()
                continue
            if wanted != key:
                break  # not its key: kept idle below, and the freed slot opens one for it
            waiters.popleft()
            if deadline is not None:
                deadline.stop()
            self.active += 1
            waiter.connection_ready(connection, True)
            return
        if key is not None:
            self._push_keyed(connection, key, now)
        elif self._idle_count >= self._config.pool_size:
            connection.close()
        else:
            connection.idle_since = now
            connection.in_pool = True
            self._idle.append(connection)
            self._idle_count += 1
            if not self._reaper.armed:
                self._reaper.arm(self._config.idle_timeout)
        if waiters:
            self._wake_waiter()  # the first waiter wants another key: the freed slot is its

    def forget(self) -> None:
        """
        A lent connection died; it is not coming back.
        """
        self.active -= 1
        self._wake_waiter()

    def close(self) -> None:
        """
        Close idle connections now and lent ones as they come back.
        """
        self._closed = True
        self._reaper.stop()
        for connection in list(self._keyed_idle):
            self._drop_keyed(connection)
            connection.close()
        while self._idle:
            connection = self._idle.pop()
            connection.in_pool = False
            connection.close()
        self._idle_count = 0
        while self._waiters:
            waiter, deadline, _ = self._waiters.popleft()
            if deadline is not None:
                deadline.stop()
            if not waiter.cancelled:
                waiter.connection_failed("shutting down", 503)

    # -- what the descriptor budget calls ------------------------------------------------------

    def oldest_idle_since(self) -> float | None:
        idle = self._idle
        while idle and not idle[0].in_pool:
            idle.popleft()  # closed while idle; already uncounted
        oldest = idle[0].idle_since if idle else None
        keyed = self._oldest_keyed()
        if keyed is not None and (oldest is None or keyed.idle_since < oldest):
            return keyed.idle_since
        return oldest

    def shed_oldest_idle(self) -> None:
        keyed = self._oldest_keyed()
        idle = self._idle
        if keyed is not None and (not idle or keyed.idle_since < idle[0].idle_since):
            self._drop_keyed(keyed)
            keyed.close()
            return
        connection = idle.popleft()
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
        due: float | None = None
        idle = self._idle
        while idle:
            oldest = idle[0]
            if not oldest.in_pool:
                idle.popleft()
                continue
            if oldest.idle_since + timeout > now:
                due = oldest.idle_since + timeout
                break
            idle.popleft()
            oldest.in_pool = False
            self._idle_count -= 1
            oldest.close()
        while (keyed := self._oldest_keyed()) is not None:
            if keyed.idle_since + timeout > now:
                expires = keyed.idle_since + timeout
                due = expires if due is None else min(due, expires)
                break
            self._drop_keyed(keyed)
            keyed.close()
        if due is not None:
            self._reaper.arm(due - now)

    def _on_lost(self, connection: C) -> None:
        self._budget.upstream_closed()
        # An idle connection that the origin closed stays in the deque, marked CLOSED, and is
        # skipped later: removing it from the middle would be a linear search. A keyed one is
        # found by its key, and leaves at once.
        if connection.in_pool:
            if connection in self._keyed_idle:
                self._drop_keyed(connection)
                return
            connection.in_pool = False
            self._idle_count -= 1

    # -- keyed idle connections ---------------------------------------------------------------

    def _push_keyed(self, connection: C, key: Hashable, now: float) -> None:
        if self._idle_count >= self._config.pool_size:
            # Full: the least recently used key's connection makes room for this one (that
            # client is active now), or, with none keyed, this one is closed.
            oldest = self._oldest_keyed()
            if oldest is None:
                connection.close()
                return
            self._drop_keyed(oldest)
            oldest.close()
        connection.idle_since = now
        connection.in_pool = True
        stack = self._by_key.get(key)
        if stack is None:
            self._by_key[key] = [connection]
        else:
            stack.append(connection)
        self._keyed_idle[connection] = key
        self._idle_count += 1
        if not self._reaper.armed:
            self._reaper.arm(self._config.idle_timeout)

    def _pop_keyed(self, key: Hashable) -> C | None:
        stack = self._by_key.get(key)
        if stack is None:
            return None
        now = self._clock.seconds()
        margin = self._config.keepalive_margin
        timeout = self._config.idle_timeout
        horizon = now - timeout + min(margin, timeout / 2)
        found = None
        while stack:
            connection = stack.pop()
            del self._keyed_idle[connection]
            connection.in_pool = False
            self._idle_count -= 1
            if connection.usable(now, margin) and connection.idle_since > horizon:
                found = connection
                break
            connection.close()
        if not stack:
            del self._by_key[key]
        return found

    def _oldest_keyed(self) -> C | None:
        keyed = self._keyed_idle
        return next(iter(keyed)) if keyed else None

    def _drop_keyed(self, connection: C) -> None:
        """An idle keyed connection leaves the pool (to be lent, closed, or gone)."""
        key = self._keyed_idle.pop(connection)
        stack = self._by_key[key]
        stack.remove(connection)  # a key's own connections: a few at most
        if not stack:
            del self._by_key[key]
        connection.in_pool = False
        self._idle_count -= 1

    # -- internals ----------------------------------------------------------------------------

    def _open(self, waiter: ConnectionWaiter[C], key: Hashable | None = None) -> None:
        self.active += 1
        self.connects += 1
        self._budget.upstream_opening()
        keyed = self._keyed_connect
        d = self._connect() if key is None or keyed is None else keyed(key)

        def connected(connection: C) -> None:
            connection.on_lost = self._on_lost
            if waiter.cancelled:
                self.release(connection, True, key)
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
            waiter, deadline, key = self._waiters.popleft()
            if deadline is not None:
                deadline.stop()
            if not waiter.cancelled:
                self.acquire(waiter, key=key)
                return

    def _queue_timeout(self, waiter: ConnectionWaiter[C]) -> None:
        for i, (queued, _, _) in enumerate(self._waiters):
            if queued is waiter:
                del self._waiters[i]
                break
        if not waiter.cancelled:
            waiter.connection_failed(f"{self.address}: no connection free in time", 503)


class KeyedPool(Generic[C]):
    """
    What C{pick(key)} gives a protocol (an L{persistproxy.interfaces.Pool}): one key's share
    of a L{ServerPool}, whose limits, queue and idle timeout it shares.
    """

    __slots__ = ("_pool", "address", "key")

    def __init__(self, pool: ServerPool[C], key: Hashable) -> None:
        self._pool = pool
        self.key = key
        self.address = pool.address

    def acquire(self, waiter: ConnectionWaiter[C], fresh: bool = False) -> None:
        self._pool.acquire(waiter, fresh, self.key)

    def release(self, connection: C, reusable: bool) -> None:
        self._pool.release(connection, reusable, self.key)

    def forget(self) -> None:
        self._pool.forget()
