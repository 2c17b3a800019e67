# -*- test-case-name: tests.unit.test_descriptors -*-
"""
The process's file descriptor budget: admit no more clients than can also be given their
upstream connection.

A proxied connection needs two descriptors, the client's socket and the upstream one. When
accepted client sockets use up the process's C{RLIMIT_NOFILE}, every upstream connect fails
with C{EMFILE} and every client that got in is answered 502: more admissions make service
worse, not slower. So, as HAProxy does with C{maxconn}, the proxy derives its connection
limit from its descriptor limit:

 - at start, the soft limit is raised toward the hard one, as far as the configured
   C{max_connections} need (never lowered), and both are logged;
 - C{reserve} descriptors are kept for what is not a proxied connection: those open at start
   (standard streams, the reactor, listening sockets, log files) plus L{RESERVE_SLACK} for
   transient ones (name resolution, certificate reloads, metrics scrapes, sockets closing);
 - C{fits = (soft limit - reserve) // 2} client connections are admitted over all listeners.
   At C{fits}, every listener stops reading its port, exactly as at its own
   C{max_connections}, and clients wait in the kernel's backlog until one leaves;
 - idle pooled upstream connections are counted too. They belong to no client, so when an
   admission or an upstream connect would go past the budget, the oldest idle one is closed
   first.

Each event (an admission, a departure, an upstream connect or close) costs O(1), plus
O(listeners) when the budget fills or frees and O(pools) when an idle connection is shed:
both numbers are fixed by the configuration, not by load.
"""

from __future__ import annotations

import errno
import math
import os
import resource
from typing import Protocol

from persistproxy.logs import EventLog

__all__ = [
    "PER_CONNECTION",
    "RESERVE_SLACK",
    "DescriptorBudget",
    "ProcessDescriptors",
    "out_of_descriptors",
]

#: Descriptors a proxied connection needs: the client's socket and the upstream one.
PER_CONNECTION = 2
#: Descriptors kept, beyond those open at start, for transient needs (see the module doc).
RESERVE_SLACK = 64

_EXHAUSTED = (errno.EMFILE, errno.ENFILE)


def out_of_descriptors(error: BaseException) -> bool:
    """
    Whether C{error} says the process (C{EMFILE}) or the system (C{ENFILE}) has no file
    descriptor left: an C{OSError}, or Twisted's C{ConnectError} (whose C{osError} is the
    errno of the failed C{socket()} call, as in C{ConnectBindError}).
    """
    code = getattr(error, "osError", None)
    if code is None and isinstance(error, OSError):
        code = error.errno
    return code in _EXHAUSTED


class ProcessDescriptors:
    """
    The real process's C{RLIMIT_NOFILE} and open descriptors; tests pass a fake instead.
    """

    def __init__(self, fd_dir: str = "/proc/self/fd") -> None:
        self._fd_dir = fd_dir

    def limits(self) -> tuple[int, int]:
        """
        The soft and hard limits, an unlimited one read as the kernel's ceiling
        (C{fs.nr_open}): no process can open more than that.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        ceiling = self._nr_open()
        if hard == resource.RLIM_INFINITY:
            hard = ceiling
        if soft == resource.RLIM_INFINITY:
            soft = hard
        return soft, hard

    def set_soft(self, soft: int) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def count_open(self) -> int:
        """Descriptors open now (the listing's own descriptor excluded)."""
        return len(os.listdir(self._fd_dir)) - 1

    @staticmethod
    def _nr_open() -> int:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 1 << 20  # Linux's default


class Process(Protocol):
    """What L{DescriptorBudget.start} needs of the process (L{ProcessDescriptors})."""

    def limits(self) -> tuple[int, int]: ...

    def set_soft(self, soft: int) -> None: ...

    def count_open(self) -> int: ...


class BudgetListener(Protocol):
    """A listener's admission (L{persistproxy.listener.limits.ConnectionLimits})."""

    def budget_full(self) -> None:
        """No client may be admitted anywhere: stop reading the port."""

    def budget_freed(self) -> None:
        """A client left somewhere: serve held connections and read the port, if there is
        room."""


class IdleHolder(Protocol):
    """An upstream pool (L{persistproxy.upstream.pool.ServerPool})."""

    def oldest_idle_since(self) -> float | None:
        """When its oldest idle connection went idle; C{None} without idle connections."""

    def shed_oldest_idle(self) -> None:
        """Close its oldest idle connection (there is one)."""


class DescriptorBudget:
    """
    The descriptors of one process, shared by every listener and every upstream pool.

    Until L{start} (or L{configure}) there is no budget: counting still happens, nothing is
    ever held or shed. That is how unit tests and embedders that do not ask for it run.

    @ivar fits: client connections admitted at most over all listeners; 0: no budget.
    @ivar capacity: descriptors for connections (soft limit minus reserve); 0: no budget.
    @ivar clients: client connections admitted now.
    @ivar upstream: upstream sockets open now (connecting, lent or idle).
    @ivar shed: idle upstream connections closed to make room, since start.
    """

    def __init__(self, log: EventLog | None = None) -> None:
        self.fits = 0
        self.capacity = 0
        self.reserve = 0
        self.clients = 0
        self.upstream = 0
        self.shed = 0
        self._log = log
        self._full = False
        self._listeners: list[BudgetListener] = []
        self._pools: list[IdleHolder] = []

    # -- set-up -------------------------------------------------------------------------------

    def add_listener(self, listener: BudgetListener) -> None:
        self._listeners.append(listener)

    def add_pool(self, pool: IdleHolder) -> None:
        self._pools.append(pool)

    def remove_listener(self, listener: BudgetListener) -> None:
        """A reload removed the listener (its connections still report L{left})."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def remove_pool(self, pool: IdleHolder) -> None:
        """A pool closed or a reload replaced it: it holds no idle connection any more."""
        if pool in self._pools:
            self._pools.remove(pool)

    def configure(self, nofile: int, reserve: int) -> None:
        """Budget C{nofile} descriptors, C{reserve} of them not for connections."""
        self.reserve = reserve
        self.capacity = max(PER_CONNECTION, nofile - reserve)
        self.fits = self.capacity // PER_CONNECTION

    def start(self, process: Process, max_connections: int | None) -> None:
        """
        Raise the soft limit as far as C{max_connections} (the sum over all listeners;
        C{None} when one is unlimited) need, within the hard limit, then set the budget from
        what the process got, and log it.
        """
        log = self._log
        soft_at_start, hard = process.limits()
        reserve = process.count_open() + RESERVE_SLACK
        wanted = hard if max_connections is None else reserve + PER_CONNECTION * max_connections
        soft = soft_at_start
        target = min(hard, wanted)
        if target > soft:
            try:
                process.set_soft(target)
                soft = target
            except (OSError, ValueError) as e:
                if log is not None:
                    log.warning(
                        "descriptors.raise_failed", nofile_soft=soft, wanted=target, reason=str(e)
                    )
        self.configure(soft, reserve)
        if log is None:
            return
        log.info(
            "descriptors.nofile", nofile_soft=soft, nofile_hard=hard, soft_at_start=soft_at_start
        )
        numbers = {
            "nofile_soft": soft,
            "nofile_hard": hard,
            "reserve": reserve,
            "per_connection": PER_CONNECTION,
            "fits": self.fits,
            "max_connections": max_connections,
        }
        log.info("descriptors.budget", **numbers)
        if max_connections is None or max_connections > self.fits:
            log.warning("descriptors.budget_short", **numbers)

    # -- client connections -------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether one more client connection may be admitted."""
        return not self.fits or self.clients < self.fits

    def admitted(self) -> None:
        """A listener admitted a client connection."""
        self.clients += 1
        if not self.fits:
            return
        if self.clients >= self.fits and not self._full:
            self._full = True
            for listener in self._listeners:
                listener.budget_full()
        if self.clients + self.upstream > self.capacity:
            # Its socket is open already: give back an idle upstream one before its request
            # needs a new one.
            self.shed_idle()

    def left(self, listener: BudgetListener) -> None:
        """
        An admitted client connection closed on C{listener} (which serves its own held
        connections next); if that frees the budget, the other listeners resume too.
        """
        self.clients -= 1
        if self._full and self.clients < self.fits:
            self._full = False
            for other in self._listeners:
                if other is not listener:
                    other.budget_freed()

    # -- upstream connections -----------------------------------------------------------------

    def upstream_opening(self) -> None:
        """A pool is about to open an upstream connection."""
        if self.capacity and self.clients + self.upstream >= self.capacity:
            self.shed_idle()
        self.upstream += 1

    def upstream_closed(self) -> None:
        """An upstream socket is closed (or its connect failed)."""
        self.upstream -= 1

    def pressed(self) -> bool:
        """Over budget: a connection coming back to a pool is closed rather than kept."""
        return bool(self.capacity) and self.clients + self.upstream > self.capacity

    def shed_idle(self) -> bool:
        """
        Close the oldest idle upstream connection of all pools; C{False} if there is none.
        Its descriptor is freed when the reactor next turns; the reserve covers the moment.
        """
        oldest: IdleHolder | None = None
        since = math.inf
        for pool in self._pools:
            when = pool.oldest_idle_since()
            if when is not None and when < since:
                oldest, since = pool, when
        if oldest is None:
            return False
        self.shed += 1
        oldest.shed_oldest_idle()
        return True
