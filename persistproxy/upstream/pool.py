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

The keep-alive race (a connection lent just as its server closes it) is avoided rather than
recovered from, because a request that must not be replayed can only get a 502 from it:

 - Every server's idle limit is known or learned: its C{Keep-Alive: timeout} (the connection's
   C{usable}), our C{idle_timeout}, and the age at which it closes idle pooled connections
   (L{persistproxy.upstream.idle_estimate}). A connection within C{keepalive_margin} of the
   limit (at most half of it) is not lent.
 - A request that must not be replayed takes only the most recently used connection, and
   only if it has been idle for at most L{SAFE_SHARE} of the limit; otherwise a new one.
   Until the server has closed an idle connection (so nothing is learned), its limit for such
   a request is what it has shown it tolerates: the longest the pool has seen it keep an idle
   connection open, or C{assumed_idle_limit} if that is more. So even the first time a server
   closes idle connections, a POST cannot be on one of them.
 - Connections too old under the learned limit are left in the pool, not closed: the server
   closes them, which is how the pool keeps learning (and corrects an estimate that relaxed
   too far); the reaper takes those it never closes at C{idle_timeout}.

Connections can also be lent by key (L{ServerPool.keyed}): a connection opened for a key is
only ever lent again for that key, as when it started with a PROXY protocol header naming one
client (a forward proxy would key on the destination). Keyed idle connections are kept by key
(the most recent first, under the same rules as above) and, all keys together, in the order
they went idle: the reaper, the learning of the server's idle limit and the budget see them as
any idle connection, and when C{pool_size} idle connections are held, the one idle longest
(the least recently used key's) is closed to keep the newest. So keys cost nothing past their
idle connections, and at most C{pool_size} are remembered.
"""

from __future__ import annotations

import math
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
from persistproxy.upstream.health import PassiveHealth
from persistproxy.upstream.idle_estimate import IdleEstimate

__all__ = ["SAFE_SHARE", "Connector", "KeyedConnector", "KeyedPool", "ServerPool"]

#: The share of a server's known or learned idle limit that a request which must not be
#: replayed may find a pooled connection idle for. The learned limit is the lowest age at
#: which the server was seen to close: half of it keeps a margin for a server whose timer
#: varies, for the time the proxy takes to notice a close, and for one relaxation step of
#: the estimate (see L{persistproxy.upstream.idle_estimate}).
SAFE_SHARE = 0.5

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
    @ivar connects: connections opened (the connect succeeded); C{connect_failures}, the
        attempts that failed.
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
        health: PassiveHealth | None = None,
    ) -> None:
        """
        @param budget: the process's descriptor budget, which counts this pool's sockets and
            may ask it to close its oldest idle connection; none if not given.
        @param keyed_connector: opens a connection for a key (one that starts with its
            client's PROXY protocol header); C{connector} is used for keys without it.
        @param health: the server's passive health, shared by its pools of every protocol:
            told of each connect that succeeds or fails.
        """
        self.address = address
        self.active = 0
        self.connects = 0
        self.connect_failures = 0
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
        #: Who waits for a connection: its deadline, whether its request may be replayed, and
        #: the key it wants a connection for.
        self._waiters: deque[
            tuple[ConnectionWaiter[C], Deadline | None, bool, Hashable | None]
        ] = deque()
        self._reaper = Deadline(clock, self._reap)
        self._closed = False
        self._budget = budget if budget is not None else DescriptorBudget()
        self._budget.add_pool(self)
        self._health = health
        self._estimate = IdleEstimate(clock, config.idle_learn_window, config.idle_timeout)
        #: The longest the server has been seen to keep an idle pooled connection open.
        self._tolerated = 0.0

    @property
    def idle(self) -> int:
        return self._idle_count

    @property
    def learned_idle(self) -> float | None:
        """
        Seconds this server is believed to keep an idle connection open, learned from its
        closes of idle pooled connections; C{None} when nothing is learned (yet, or any more).
        """
        return self._estimate.limit()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def idle_ages(self) -> list[float]:
        """
        How long each idle connection has been idle, in seconds: for the status page, at
        request time (a walk of at most C{pool_size} entries, never on the hot path).
        """
        now = self._clock.seconds()
        ages = [now - c.idle_since for c in self._idle if c.in_pool]
        return ages + [now - c.idle_since for c in self._keyed_idle]

    def keyed(self, key: Hashable) -> KeyedPool[C]:
        """The pool as one key sees it: connections opened for C{key}, lent only to it."""
        return KeyedPool(self, key)

    def acquire(
        self,
        waiter: ConnectionWaiter[C],
        fresh: bool = False,
        replayable: bool = True,
        key: Hashable | None = None,
    ) -> None:
        """
        Lend a connection to C{waiter}: a pooled one unless C{fresh}, else a new one, else a
        place in the wait queue when C{max_connections} are already out.

        @param replayable: whether the request may be sent again if the connection turns out
            to be closed (the protocol's retry rules say); one that may not is lent only the
            most recently used connection, idle for at most L{SAFE_SHARE} of the server's
            limit, or else a new one.
        @param key: lend only a connection opened for this key (and open one for it).
        """
        if not fresh:
            if key is None:
                connection = self._pop_idle(replayable)
            else:
                connection = self._pop_keyed(key, replayable)
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
            self._waiters.append((waiter, deadline, replayable, key))
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
            or (self._closed and not self._waiters)
            or not connection.usable(now, 0.0)
            or self._budget.pressed()
        ):
            connection.close()
            self._wake_waiter()
            return
        waiters = self._waiters
        while waiters:
            waiter, deadline, _, wanted = waiters[0]
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
            # Idle for no time at all: safe for any request.
            self.active += 1
            waiter.connection_ready(connection, True)
            return
        if self._closed:
            connection.close()
            self._wake_waiter()
            return
        if key is not None:
            self._push_keyed(connection, key, now)
            if waiters:
                self._wake_waiter()  # the first waiter wants another key: the slot is its
            return
        if self._idle_count >= self._config.pool_size:
            oldest = self._bottom()
            if oldest is None:  # pool_size = 0
                connection.close()
                return
            # Keep the young one: the oldest would be lent last, and if it is past the learned
            # limit, never (it waits for the server's close).
            self._idle.popleft()
            oldest.in_pool = False
            self._idle_count -= 1
            oldest.close()
        connection.idle_since = now
        connection.in_pool = True
        self._idle.append(connection)
        self._idle_count += 1
        if not self._reaper.armed:
            self._reaper.arm(self._config.idle_timeout)
        if waiters:
            self._wake_waiter()  # the first waiter wants a key: the slot is its

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
            waiter, deadline, _, _ = self._waiters.popleft()
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
        for keyed in list(self._keyed_idle):
            self._drop_keyed(keyed)
            keyed.close()
        while self._idle:
            connection = self._idle.pop()
            connection.in_pool = False
            connection.close()
        self._idle_count = 0
        # It never holds an idle connection again: nothing for the budget to shed here.
        self._budget.remove_pool(self)

    # -- what the descriptor budget calls ------------------------------------------------------

    def oldest_idle_since(self) -> float | None:
        oldest = self._oldest()
        return oldest.idle_since if oldest is not None else None

    def shed_oldest_idle(self) -> None:
        oldest = self._oldest()
        if oldest is None:
            return
        if oldest in self._keyed_idle:
            self._drop_keyed(oldest)
        else:
            self._idle.popleft()
            oldest.in_pool = False
            self._idle_count -= 1
        oldest.close()

    # -- keyed idle connections ---------------------------------------------------------------

    def _push_keyed(self, connection: C, key: Hashable, now: float) -> None:
        if self._idle_count >= self._config.pool_size:
            # Full: the connection idle longest (the least recently used key's, or one lent to
            # anyone) makes room for this one, whose client is active now.
            oldest = self._oldest()
            if oldest is None:  # pool_size = 0
                connection.close()
                return
            if oldest in self._keyed_idle:
                self._drop_keyed(oldest)
            else:
                self._idle.popleft()
                oldest.in_pool = False
                self._idle_count -= 1
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

    def _pop_keyed(self, key: Hashable, replayable: bool) -> C | None:
        """L{_pop_idle} among C{key}'s own connections."""
        stack = self._by_key.get(key)
        if stack is None:
            return None
        now = self._clock.seconds()
        margin = self._config.keepalive_margin
        horizon, keep_after = self._bounds(now, replayable)
        found = None
        while stack:
            connection = stack[-1]
            if connection.idle_since <= horizon or not connection.usable(now, margin):
                self._drop_keyed(connection)
                connection.close()
                continue
            if connection.idle_since <= keep_after or (
                not replayable and not connection.usable(now, math.inf)
            ):
                break
            self._drop_keyed(connection)
            found = connection
            break
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

    def _pop_idle(self, replayable: bool) -> C | None:
        now = self._clock.seconds()
        margin = self._config.keepalive_margin
        horizon, keep_after = self._bounds(now, replayable)
        idle = self._idle
        while idle:
            connection = idle[-1]
            if not connection.in_pool:
                idle.pop()
                continue  # closed while idle; already uncounted
            if connection.idle_since <= horizon or not connection.usable(now, margin):
                # Too old for any request, and soon reaped anyway (or the server announced
                # its close): close it now.
                idle.pop()
                connection.in_pool = False
                self._idle_count -= 1
                connection.close()
                continue
            if connection.idle_since <= keep_after or (
                # Within the safe share of the limit the server announced, if any.
                not replayable and not connection.usable(now, math.inf)
            ):
                return None
            idle.pop()
            connection.in_pool = False
            self._idle_count -= 1
            return connection
        return None

    def _bounds(self, now: float, replayable: bool) -> tuple[float, float]:
        """
        Idle since before the first, a connection is closed rather than lent; since before
        the second, it is left in the pool (see the module docstring).
        """
        margin = self._config.keepalive_margin
        timeout = self._config.idle_timeout
        # The margin never eats more than half of a short timeout, or nothing would be reused.
        horizon = now - timeout + min(margin, timeout / 2)
        learned = self._estimate.limit()
        # Idle since before these, a connection is left in the pool for another request (or
        # for the server to close, which it learns from); the stack is ordered by idle_since,
        # so the top one is the youngest and, when it is too old, so are all the others.
        keep_after = -math.inf
        if learned is not None:
            keep_after = now - learned + min(margin, learned / 2)
        if not replayable:
            limit = learned
            if limit is None:
                limit = max(self._config.assumed_idle_limit, self._tolerated_now(now))
            keep_after = max(keep_after, now - min(timeout, limit) * SAFE_SHARE)
        return horizon, keep_after

    def _tolerated_now(self, now: float) -> float:
        """
        The longest the server has kept an idle pooled connection open, counting the oldest
        one open now. (A close it sent that the reactor has not read yet can make that a few
        milliseconds too long; the safe share absorbs it.)
        """
        oldest = self._oldest()
        if oldest is not None and now - oldest.idle_since > self._tolerated:
            self._tolerated = now - oldest.idle_since
        return self._tolerated

    def _bottom(self) -> C | None:
        """The oldest idle connection still open, if any, of those lent to anyone."""
        idle = self._idle
        while idle and not idle[0].in_pool:
            idle.popleft()  # closed while idle; already uncounted
        return idle[0] if idle else None

    def _oldest(self) -> C | None:
        """The oldest idle connection still open, keyed or not."""
        bottom = self._bottom()
        keyed = self._oldest_keyed()
        if keyed is not None and (bottom is None or keyed.idle_since < bottom.idle_since):
            return keyed
        return bottom

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
            self._tolerated = max(self._tolerated, now - oldest.idle_since)
            oldest.close()
        while (keyed := self._oldest_keyed()) is not None:
            expires = keyed.idle_since + timeout
            if expires > now:
                due = expires if due is None else min(due, expires)
                break
            self._drop_keyed(keyed)
            self._tolerated = max(self._tolerated, now - keyed.idle_since)
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
            else:
                connection.in_pool = False
                self._idle_count -= 1
            if not self._closed:
                self._learn(self._clock.seconds() - connection.idle_since)

    def _learn(self, age: float) -> None:
        """The server closed a connection idle for C{age} seconds: its limit is no more."""
        before = self._estimate.observe(age)
        after = self._estimate.limit()
        if after is not None and (before is None or after < before * 0.9):
            self._log.info(
                "upstream.idle_limit_learned",
                server=self.address,
                seconds=round(after, 3),
                before=None if before is None else round(before, 3),
            )

    def _open(self, waiter: ConnectionWaiter[C], key: Hashable | None = None) -> None:
        self.active += 1
        self._budget.upstream_opening()
        keyed = self._keyed_connect
        d = self._connect() if key is None or keyed is None else keyed(key)

        def connected(connection: C) -> None:
            self.connects += 1
            connection.on_lost = self._on_lost
            if self._health is not None:
                self._health.succeeded()
            if waiter.cancelled:
                self.release(connection, True, key)
            else:
                waiter.connection_ready(connection, False)

        def failed(failure: Failure) -> None:
            self.active -= 1
            self.connect_failures += 1
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
            elif self._health is not None:
                self._health.failed(self._clock.seconds())
            if not waiter.cancelled:
                waiter.connection_failed(
                    f"cannot connect to {self.address}: {reason}", 503 if exhausted else 502
                )
            self._wake_waiter()

        d.addCallbacks(connected, failed)

    def _wake_waiter(self) -> None:
        limit = self._config.max_connections
        while self._waiters and (not limit or self.active < limit):
            waiter, deadline, replayable, key = self._waiters.popleft()
            if deadline is not None:
                deadline.stop()
            if not waiter.cancelled:
                self.acquire(waiter, replayable=replayable, key=key)
                return

    def _queue_timeout(self, waiter: ConnectionWaiter[C]) -> None:
        for i, (queued, _, _, _) in enumerate(self._waiters):
            if queued is waiter:
                del self._waiters[i]
                break
        if not waiter.cancelled:
            waiter.connection_failed(f"{self.address}: no connection free in time", 503)


class KeyedPool(Generic[C]):
    """
    What C{pick(key)} gives a protocol (an L{persistproxy.interfaces.Pool}): one key's share
    of a L{ServerPool}, whose limits, queue, idle timeout and learning it shares.
    """

    __slots__ = ("_pool", "address", "key")

    def __init__(self, pool: ServerPool[C], key: Hashable) -> None:
        self._pool = pool
        self.key = key
        self.address = pool.address

    def acquire(
        self, waiter: ConnectionWaiter[C], fresh: bool = False, replayable: bool = True
    ) -> None:
        self._pool.acquire(waiter, fresh, replayable, self.key)

    def release(self, connection: C, reusable: bool) -> None:
        self._pool.release(connection, reusable, self.key)

    @property
    def server_pool(self) -> ServerPool[C]:
        """The server's pool this is a key's share of (what C{pick(avoid=...)} compares)."""
        return self._pool

    def forget(self) -> None:
        self._pool.forget()
