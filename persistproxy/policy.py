# -*- test-case-name: tests.unit.test_policy -*-
"""
Small policy objects: when a connection is kept alive, when a request may be retried, and
one resettable timer per connection.

Protocols ask these objects instead of holding the rules themselves, so the rules can be read
in one place and tested without a socket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["IDEMPOTENT_METHODS", "Deadline", "KeepAlivePolicy", "RetryPolicy"]

#: RFC 9110 9.2.2; a request with a body is never replayed, whatever its method.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclass(frozen=True)
class KeepAlivePolicy:
    """
    Whether a client connection survives a response.

    @ivar timeout: seconds a kept-alive connection may idle; 0 closes after every response.
    @ivar max_requests: requests served on one connection before it is closed; 0 = no limit.
    """

    timeout: float = 75.0
    max_requests: int = 1000

    def keep_alive(self, client_wants: bool, served: int) -> bool:
        if not client_wants or self.timeout <= 0:
            return False
        return not (self.max_requests and served >= self.max_requests)

    def header(self) -> bytes:
        """
        The C{Keep-Alive} line that lets clients retire the connection before we do.
        """
        return b"Keep-Alive: timeout=%d\r\n" % int(self.timeout)


@dataclass(frozen=True)
class RetryPolicy:
    """
    When a request that failed upstream may be sent again.

    A request is replayed only if replaying cannot do harm: the method is idempotent, there
    is no body to resend, and not one byte of a response arrived. A failure on a connection
    taken from the pool (the origin closed it as we wrote: the keep-alive race) is retried on
    a new connection without spending the retry budget, up to C{max_stale} times; a failure
    on a new connection spends one of C{retries}.
    """

    retries: int = 1
    max_stale: int = 3

    @staticmethod
    def replayable(method: bytes, has_body: bool) -> bool:
        """
        Whether a request may ever be sent twice: the pool lends one that may not only a
        connection that cannot be in the keep-alive race (see
        L{persistproxy.upstream.pool.SAFE_SHARE}).
        """
        return not has_body and method in IDEMPOTENT_METHODS

    @staticmethod
    def may_try_next_server(failed_servers: int, servers: int) -> bool:
        """
        Whether a request whose connect failed (to C{failed_servers} distinct servers so far,
        of the group's C{servers}) goes to another server. A failed connect sent nothing, so
        this holds for every method, with or without a body (the body is still buffered):
        nginx's C{proxy_next_upstream error}, which passes even a non-idempotent request on
        when it was not sent to any server. Each server is tried at most once per request.
        """
        return failed_servers < servers

    def may_retry(
        self,
        method: bytes,
        has_body: bool,
        response_started: bool,
        reused: bool,
        retries_done: int,
        stale_done: int,
    ) -> bool:
        if response_started or not self.replayable(method, has_body):
            return False
        if reused:
            return stale_done < self.max_stale
        return retries_done < self.retries


class Deadline:
    """
    One lazily re-armed timer; a connection owns one of these per purpose.

    Connections arm and disarm their timers on every request, and creating or cancelling a
    reactor call each time is a measurable share of a proxied request. So arming only records
    the new due time when the scheduled call would fire no later than that; the call then
    fires early, sees the due time still ahead, and schedules itself again. Disarming only
    forgets the due time. The reactor's timer heap is touched when the due time moves
    earlier, not on every re-arm.
    """

    __slots__ = ("_call", "_callback", "_clock", "_due")

    def __init__(self, clock: IReactorTime, callback: Callable[[], object]) -> None:
        self._clock = clock
        self._callback = callback
        self._call: IDelayedCall | None = None
        self._due: float | None = None

    def arm(self, seconds: float) -> None:
        due = self._clock.seconds() + seconds
        self._due = due
        call = self._call
        if call is not None:
            if call.getTime() <= due:
                return  # it fires first and re-checks
            call.cancel()
        self._call = self._clock.callLater(seconds, self._fire)

    def cancel(self) -> None:
        """Disarm; the scheduled call, if any, stays and does nothing when it fires."""
        self._due = None

    def stop(self) -> None:
        """Disarm and drop the scheduled call, so a closed connection is not kept alive."""
        self._due = None
        call = self._call
        if call is not None:
            self._call = None
            if call.active():
                call.cancel()

    @property
    def armed(self) -> bool:
        return self._due is not None

    def _fire(self) -> None:
        self._call = None
        due = self._due
        if due is None:
            return
        remaining = due - self._clock.seconds()
        if remaining > 0:
            self._call = self._clock.callLater(remaining, self._fire)
            return
        self._due = None
        self._callback()
