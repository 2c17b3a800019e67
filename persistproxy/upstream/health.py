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

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from persistproxy.config import HealthCheckConfig
from persistproxy.logs import EventLog

__all__ = ["ActiveCheck", "HealthCheckConfig", "PassiveHealth"]

_DONE = Failure(ConnectionDone())


class PassiveHealth:
    """
    The failure count and down time of one server.

    @ivar fails: connects that failed since the last success (or since the window began).
    @ivar down_until: the clock's seconds until which the server is not picked; 0 when up.
    """

    __slots__ = (
        "_log",
        "address",
        "checked_up",
        "down_until",
        "fail_timeout",
        "fails",
        "max_fails",
        "since",
    )

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
        #: What the active health check says (L{ActiveCheck}); up without one.
        self.checked_up = True
        self._log = log

    def available(self, now: float) -> bool:
        """Whether the server may be picked now: up by the active check and passively."""
        return self.checked_up and now >= self.down_until

    def state(self, now: float) -> str:
        """C{"up"}, or why it is down: C{"down (check)"} or C{"down (fails)"}."""
        if not self.checked_up:
            return "down (check)"
        return "up" if now >= self.down_until else "down (fails)"

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


#: The most of a probe's response read: its status line must be within it.
MAX_PROBE_RESPONSE = 4096


class _HTTPProbe(Protocol):
    """
    One health probe over a fresh connection: C{GET path}, then the status line, then close.
    """

    def __init__(self, request: bytes, done: Callable[[bool, str], None], expect: int) -> None:
        self._request = request
        self._done: Callable[[bool, str], None] | None = done
        self._expect = expect
        self._buffer = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        line, sep, _ = self._buffer.partition(b"\r\n")
        if not sep and len(self._buffer) < MAX_PROBE_RESPONSE:
            return
        parts = line.split(b" ", 2)
        ok = len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == b"%d" % self._expect
        self._finish(ok, "" if ok else f"status line {line[:80]!r}")
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._finish(False, f"closed before a status line: {reason.getErrorMessage()}")

    def _finish(self, ok: bool, why: str) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(ok, why)


class _TCPProbe(Protocol):
    """A connect that succeeded is the whole probe: close at once."""

    def __init__(self, done: Callable[[bool, str], None]) -> None:
        self._done = done

    def connectionMade(self) -> None:
        self._done(True, "")
        assert self.transport is not None
        self.transport.loseConnection()


class ActiveCheck:
    """
    Probes one server every C{interval} seconds over a fresh connection (never a pooled
    one: the check asks whether the server takes new connections), and moves the server's
    L{PassiveHealth} C{checked_up} flag by C{rise} and C{fall}.

    @ivar _state: C{"idle"} (stopped or between probes), C{"probing"} (a probe is out, its
        timeout armed) or C{"stopped"} (for good).
    """

    def __init__(
        self,
        clock: IReactorTime,
        health: PassiveHealth,
        connect: Callable[[IProtocolFactory], Deferred[Any]],
        config: HealthCheckConfig,
        kind: str,
        address: str,
        log: EventLog,
    ) -> None:
        """
        @param connect: opens a fresh connection to the server with a factory (its
            endpoint's C{connect}: TLS when the upstream has it).
        @param kind: C{"http"} (a GET of C{config.path}) or C{"tcp"} (a connect).
        @param address: the server's C{host:port}, the probe's C{Host}.
        """
        if kind not in ("http", "tcp"):
            raise ValueError(f"unknown health check kind {kind!r}")
        self._clock = clock
        self._health = health
        self._connect = connect
        self._config = config
        self._kind = kind
        self._log = log
        self._request = (
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: persistproxy-health-check\r\n"
            b"Connection: close\r\n\r\n"
            % (config.path.encode("latin-1"), address.encode("latin-1"))
        )
        self._state = "idle"
        self._next: IDelayedCall | None = None
        self._timeout: IDelayedCall | None = None
        self._attempt: Deferred[Any] | None = None
        self._protocol: Protocol | None = None
        self._successes = 0
        self._failures = 0

    def start(self) -> None:
        """Probe now, then every C{interval} seconds."""
        if self._state == "stopped":
            raise RuntimeError("a stopped health check does not start again")
        if self._next is None and self._state == "idle":
            self._probe()

    def stop(self) -> None:
        """Stop for good: no timer left, an open probe aborted."""
        self._state = "stopped"
        for call in (self._next, self._timeout):
            if call is not None and call.active():
                call.cancel()
        self._next = self._timeout = None
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]

    def _probe(self) -> None:
        self._next = None
        if self._state != "idle":
            raise RuntimeError(f"a probe started in state {self._state}")
        self._state = "probing"
        self._timeout = self._clock.callLater(self._config.timeout, self._timed_out)
        done = self._result
        factory = Factory.forProtocol(
            (lambda: _HTTPProbe(self._request, done, self._config.expect))
            if self._kind == "http"
            else (lambda: _TCPProbe(done))
        )
        attempt = self._attempt = self._connect(factory)

        def connected(protocol: Protocol) -> None:
            self._attempt = None
            if self._state == "probing":
                self._protocol = protocol

        def failed(failure: Failure) -> None:
            self._attempt = None
            if self._state == "probing":
                self._result(False, f"connect: {failure.getErrorMessage()}")

        attempt.addCallbacks(connected, failed)

    def _timed_out(self) -> None:
        self._timeout = None
        if self._state != "probing":
            return
        attempt, self._attempt = self._attempt, None
        self._result(False, f"no answer within {self._config.timeout:g} s")
        if attempt is not None:
            attempt.cancel()

    def _result(self, ok: bool, why: str) -> None:
        if self._state != "probing":
            return  # stopped, or answered already (a close after the status line)
        self._state = "idle"
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]
        health = self._health
        if ok:
            self._failures = 0
            self._successes += 1
            if not health.checked_up and self._successes >= self._config.rise:
                health.checked_up = True
                self._log.info("upstream.check_up", server=health.address)
        else:
            self._successes = 0
            self._failures += 1
            if health.checked_up and self._failures >= self._config.fall:
                health.checked_up = False
                self._log.warning("upstream.check_down", server=health.address, reason=why)
        self._next = self._clock.callLater(self._config.interval, self._probe)
