# -*- test-case-name: tests.unit.test_upstream_health -*-
"""
Whether an upstream server is worth dialling: passive health, from the connects the pools
make (nginx's C{max_fails} / C{fail_timeout}).

One L{PassiveHealth} belongs to a L{persistproxy.upstream.group.Server}, so every protocol
that dials the server (every pool of it) reports to, and is steered by, the same state.

nginx's meaning: C{max_fails} failed connects within C{fail_timeout} seconds mark the server
down for C{fail_timeout} seconds. When that time is up the server is tried again, but its
count of failures is kept until a connect succeeds, so one more failure takes it down again
at once (a dead server costs one connect per C{fail_timeout}, not C{max_fails}). A
successful connect forgets the failures. C{max_fails = 0} turns this off.
"""

from __future__ import annotations

from persistproxy.logs import EventLog

__all__ = ["PassiveHealth"]


class PassiveHealth:
    """
    The failure count and down time of one server.

    @ivar fails: connects that failed since the last success (or since the window began).
    @ivar down_until: the clock's seconds until which the server is not picked; 0 when up.
    """

    __slots__ = ("_log", "address", "down_until", "fail_timeout", "fails", "max_fails", "since")

    def __init__(
        self, address: str, max_fails: int, fail_timeout: float, log: EventLog | None = None
    ) -> None:
        self.address = address
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.fails = 0
        #: When the current window of failures began.
        self.since = 0.0
        self.down_until = 0.0
        self._log = log

    def available(self, now: float) -> bool:
        """Whether the server may be picked now."""
        return now >= self.down_until

    def failed(self, now: float) -> None:
        """A connect to the server failed (refused, timed out, unreachable)."""
        if not self.max_fails:
            return
        if self.fails < self.max_fails and now - self.since > self.fail_timeout:
            # The earlier failures are older than the window: they no longer count.
            self.fails = 0
        if self.fails == 0:
            self.since = now
        self.fails += 1
        if self.fails >= self.max_fails:
            was_up = self.down_until <= now
            self.down_until = now + self.fail_timeout
            if was_up and self._log is not None:
                self._log.warning(
                    "upstream.server_down",
                    server=self.address,
                    fails=self.fails,
                    seconds=self.fail_timeout,
                )

    def succeeded(self) -> None:
        """A connect to the server succeeded: it is up, its failures forgotten."""
        if self.fails >= self.max_fails and self.max_fails and self._log is not None:
            self._log.info("upstream.server_up", server=self.address)
        self.fails = 0
        self.down_until = 0.0
