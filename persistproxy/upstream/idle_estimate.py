# -*- test-case-name: tests.unit.test_idle_estimate -*-
"""
How long a server lets an idle connection live, learned from what it does.

Most origins close a keep-alive connection after some seconds of silence, and many never say
after how long (no C{Keep-Alive: timeout=N}). A pooled connection lent out just as its server
closes it fails: a GET is retried, but a POST can only get a 502. So the pool watches: when the
server closes a connection that sat idle in the pool for M{a} seconds, its limit is about M{a}
at most, and the pool treats the lowest such age like an announced timeout.

The rule, in full:

 - The estimate is the lowest close age observed in the current and the previous window of
   C{window} seconds: an observation counts for one to two windows.
 - When no close was observed for that long, the estimate relaxes upward: the one that stood
   after the last close, times L{RELAX} for every whole window since that close. Once it
   reaches C{ceiling} (the pool's own C{idle_timeout}, past which it would change nothing) it
   is forgotten. So one early close (a restart, a server shedding connections under load)
   limits reuse for at most two windows while the server keeps closing at its real limit,
   and for a few windows if it never closes anything again.
 - A close within L{SHORTEST} of the connection going idle is not counted: that is a server
   ending the connection after its response (at its request limit, say, without
   C{Connection: close}), not an idle limit, and taken for one it would stop all reuse.
 - Relaxing is safe because it is self-correcting: connections too old to be lent under the
   estimate stay in the pool, so if a relaxed estimate overshoots the real limit, the server's
   next idle close is seen and brings it back down; and a request that must not be replayed
   takes a connection idle for at most half of the estimate, which one relaxation step
   (x1.5) keeps below the real limit.

The estimator holds O(1) state and asks the injected clock for the time; it is protocol-neutral
(it sees ages, not connections).
"""

from __future__ import annotations

import math

from twisted.internet.interfaces import IReactorTime

__all__ = ["RELAX", "SHORTEST", "IdleEstimate"]

#: How much the estimate grows per window without a close observed.
RELAX = 1.5
#: Seconds of idleness below which a close is not taken for the server's idle limit.
SHORTEST = 0.1


class IdleEstimate:
    """
    One server's idle limit, as learned from its closes of idle pooled connections.

    @ivar observations: closes observed since the start (for tests and logs).
    """

    __slots__ = (
        "_ceiling",
        "_clock",
        "_current",
        "_held",
        "_last_close",
        "_previous",
        "_start",
        "_window",
        "observations",
    )

    def __init__(self, clock: IReactorTime, window: float, ceiling: float) -> None:
        """
        @param window: seconds an observed close age counts for (one to two windows), and the
            quiet time per relaxation step; 0 disables learning (L{limit} stays C{None}).
        @param ceiling: an estimate this high or higher changes nothing and is forgotten.
        """
        self._clock = clock
        self._window = window
        self._ceiling = ceiling
        self._start = clock.seconds()
        #: Lowest close age in the current window, and in the previous one.
        self._current: float | None = None
        self._previous: float | None = None
        #: The estimate right after the last close, and when that close was seen.
        self._held: float | None = None
        self._last_close = 0.0
        self.observations = 0

    def observe(self, age: float) -> float | None:
        """
        The server closed a connection that had been idle in the pool for C{age} seconds.

        @return: the estimate before this observation (to tell a change worth logging).
        """
        if self._window <= 0:
            return None
        before = self.limit()
        if age < SHORTEST:
            return before
        self._rotate()
        if self._current is None or age < self._current:
            self._current = age
        self._held = self._lowest()
        self._last_close = self._clock.seconds()
        self.observations += 1
        return before

    def limit(self) -> float | None:
        """
        Seconds the server is believed to keep an idle connection, or C{None} if unknown.
        """
        if self._held is None:
            return None
        self._rotate()
        lowest = self._lowest()
        if lowest is not None:
            return lowest
        steps = math.floor((self._clock.seconds() - self._last_close) / self._window)
        # (Capped so that a long silence cannot overflow the power; 1.5 ** 100 is past any
        # ceiling anyway.)
        relaxed = self._held * RELAX ** min(max(1, steps), 100)
        if relaxed >= self._ceiling:
            self._held = None  # nothing learned any more: the pool's own limits govern
            return None
        return relaxed

    # -- internals ----------------------------------------------------------------------------

    def _lowest(self) -> float | None:
        current, previous = self._current, self._previous
        if current is None:
            return previous
        if previous is None:
            return current
        return min(current, previous)

    def _rotate(self) -> None:
        """Move the windows on to now (on a fixed grid from the estimator's creation)."""
        now = self._clock.seconds()
        if now < self._start + self._window:
            return  # (the pool asks on every request: the common case costs one comparison)
        elapsed = math.floor((now - self._start) / self._window)
        self._previous = self._current if elapsed == 1 else None
        self._current = None
        self._start += elapsed * self._window
