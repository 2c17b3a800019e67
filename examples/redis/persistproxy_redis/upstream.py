# -*- test-case-name: test_redis_plugin -*-
"""
One pooled connection from the proxy to a Redis server: a
L{persistproxy.interfaces.PooledConnection} that the pool lends to one client session at a
time.

It sends what its session gives it and passes every byte the server sends back to that
session as it arrives, unchanged; hiredis' reader only I{counts} the replies, so the session
knows when its commands are all answered and the connection may go back to the pool. A
server that answers more than was asked, or sends anything while the connection is idle, has
its connection closed: its bytes can never reach a client as the answer to another's command.

@ivar state: C{"CONNECTING"}; C{"IDLE"} (in the pool, or made and not yet lent); C{"LENT"} to
    a session; C{"RETIRING"}: its session left and it is reading the last replies (and the
    reply to its own RESET) before it goes back to the pool; C{"CLOSED"}.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import hiredis
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.interfaces import Pool, UpstreamConfig, UpstreamServer
from persistproxy.timers import TimeoutQueue

__all__ = ["RedisConnector", "RedisUpstream", "ReplySink"]

#: What hiredis' reader returns when a reply is not complete yet (a reply may be C{False}).
MORE: Any = object()

_RESET = b"*1\r\n$5\r\nRESET\r\n"

_CONNECTING = "CONNECTING"
_IDLE = "IDLE"
_LENT = "LENT"
_RETIRING = "RETIRING"
_CLOSED = "CLOSED"


class ReplySink(Protocol):
    """What a lent connection reports to: the client session that borrowed it."""

    def replies(self, data: bytes, count: int) -> None:
        """Bytes from the server, to go to the client as they are; C{count} replies ended."""

    def upstream_backlogged(self, full: bool) -> None:
        """Our commands wait in the connection's write buffer (C{True}) or drained."""

    def upstream_failed(self, connection: RedisUpstream, reason: str, timeout: bool) -> None:
        """The connection is gone (lost, broke the protocol, or timed out) while lent."""


@implementer(IPushProducer)
class RedisUpstream(TwistedProtocol):
    """
    A connection to a Redis server, lent to one session at a time.

    @ivar sent: commands sent since the connection was made.
    @ivar answered: replies counted since then.
    @ivar count_limit: the number of replies that can be counted at all, once a command
        after which the server pushes messages was sent (SUBSCRIBE); L{None} before.
    @ivar blocking: the sequence numbers (in C{sent}) of blocking commands not answered yet.
    """

    def __init__(self, deadlines: TimeoutQueue[RedisUpstream] | None) -> None:
        self.idle_since = 0.0
        self.in_pool = False
        self.on_lost: Callable[[Any], None] | None = None
        self.state = _CONNECTING
        self.owner: ReplySink | None = None
        self.sent = 0
        self.answered = 0
        self.count_limit: int | None = None
        self.blocking: deque[int] = deque()
        self._reader = hiredis.Reader(notEnoughData=MORE)
        self._deadlines = deadlines
        self._reading_paused = False
        self._pool: Pool[RedisUpstream] | None = None
        self._reset_at = 0
        #: Bytes were passed on since all commands sent were answered (see L{mid_reply}).
        self._passed = False

    # -- what the session calls -------------------------------------------------------------

    def lend(self, owner: ReplySink) -> None:
        if self.state != _IDLE:
            raise RuntimeError(f"lent in state {self.state}")
        self.state = _LENT
        self.owner = owner

    def unlend(self) -> None:
        """
        The session lets go: nothing more is passed to it. The reader starts afresh: its
        API cannot say whether a server that answered all it was asked also began an array
        nobody asked for, and such a beginning must not swallow the next borrower's replies.
        """
        self.owner = None
        if self.state == _LENT:
            self.state = _IDLE
            if self.answered == self.sent:
                self._reader = hiredis.Reader(notEnoughData=MORE)
        self.resume_reading()

    def send(self, data: bytes, count: int) -> None:
        """Send C{count} commands, encoded in C{data}."""
        self.sent += count
        self.transport.write(data)  # type: ignore[union-attr]
        self._watch()

    def outstanding(self) -> int:
        """Commands whose replies can still be counted and have not all come."""
        limit = self.count_limit
        sent = self.sent if limit is None or limit > self.sent else limit
        return sent - self.answered

    def counting(self) -> bool:
        """Whether every reply on this connection is still counted."""
        return self.count_limit is None

    def stop_counting_after(self, replies: int) -> None:
        """Only the first C{replies} replies can be counted: the server pushes after them."""
        if self.count_limit is None or replies < self.count_limit:
            self.count_limit = replies

    def blocked(self) -> bool:
        """A blocking command may still be waiting on the server for data."""
        return bool(self.blocking)

    def add_blocking(self, seq: int) -> None:
        """Command number C{seq} (in C{sent}) may block."""
        limit = self.count_limit
        if limit is None or seq <= limit:
            self.blocking.append(seq)
        # Past the count limit its reply is never counted; such a connection is closed
        # when its session leaves anyway.

    def mid_reply(self) -> bool:
        """
        Bytes were passed on since every command sent was last answered: the client may
        hold part of a reply (the reader does not say whether it stopped inside an array),
        so an error reply can no longer be put in its place.
        """
        return self._passed

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and self.state != _CLOSED:
            self._reading_paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None and self.state != _CLOSED:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def retire(self, pool: Pool[RedisUpstream], reset: bool) -> None:
        """
        Its session left with replies still to come, or with connection state: read the
        replies (discarding them), RESET it if C{reset}, and give it back to C{pool} as
        reusable once all is answered; close it if anything goes wrong or takes longer than
        the response timeout.
        """
        self.owner = None
        self.resume_reading()
        self.state = _RETIRING
        self._pool = pool
        if reset:
            self.sent += 1
            self._reset_at = self.sent
            self.transport.write(_RESET)  # type: ignore[union-attr]
        if self.answered == self.sent:
            self._retired(True)
        else:
            self._watch()

    def abort(self) -> None:
        """Drop it at once (a timeout, or a protocol violation); nothing is reported."""
        self.owner = None
        if self.state != _CLOSED and self.transport is not None:
            self.state = _CLOSED
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- PooledConnection ---------------------------------------------------------------------

    def usable(self, now: float, margin: float) -> bool:
        """Between lends, with every reply read."""
        return self.state == _IDLE and self.count_limit is None and self.answered == self.sent

    def close(self) -> None:
        if self.state != _CLOSED and self.transport is not None:
            self.state = _CLOSED
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    # -- IPushProducer: our commands back up in the transport's buffer ------------------------

    def pauseProducing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_backlogged(True)

    def resumeProducing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_backlogged(False)

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost follows."""

    # -- events of the connection -----------------------------------------------------------

    def connectionMade(self) -> None:
        self.state = _IDLE
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == _LENT:
            owner = self.owner
            assert owner is not None
            if self.count_limit is not None and self.answered >= self.count_limit:
                owner.replies(data, 0)  # pushes: passed on uncounted
                return
            count = self._count(data)
            if count < 0:
                self._violation(owner)
                return
            owner.replies(data, count)
        elif state == _RETIRING:
            if self._count(data) < 0:
                self._retired(False)
            elif self.answered == self.sent:
                self._retired(True)
            else:
                self._watch()
        elif state != _CLOSED:
            # Nothing was asked: a server that talks anyway cannot be trusted with a client.
            self.abort()

    def _count(self, data: bytes) -> int:
        """
        Feed the reader and count the replies that ended; -1 if the server broke the
        protocol or answered more than it was asked.
        """
        reader = self._reader
        reader.feed(data)
        answered = self.answered
        sent = self.sent
        limit = self.count_limit
        last = sent if limit is None or limit > sent else limit
        count = 0
        try:
            while answered + count < last:
                reply = reader.gets()
                if reply is MORE:
                    break
                count += 1
                if answered + count == self._reset_at and reply != b"RESET":
                    return -1  # not our RESET's reply: the count is off
        except hiredis.ProtocolError:
            return -1
        if answered + count == sent and reader.has_data():
            return -1  # bytes past the last reply asked for
        self.answered = answered = answered + count
        self._passed = answered != sent
        blocking = self.blocking
        while blocking and blocking[0] <= answered:
            blocking.popleft()
        if count:
            self._watch()
        return count

    def _watch(self) -> None:
        """Arm the response timeout while a non-blocking reply is awaited."""
        deadlines = self._deadlines
        if deadlines is None:
            return
        if self.outstanding() and not self.blocking:
            deadlines.add(self)
        else:
            deadlines.discard(self)

    def timed_out(self) -> None:
        """No reply within the upstream's C{response_timeout}."""
        if self.state == _LENT:
            owner = self.owner
            self.abort()
            if owner is not None:
                owner.upstream_failed(self, "upstream timed out", timeout=True)
        elif self.state == _RETIRING:
            self._retired(False)

    def _violation(self, owner: ReplySink) -> None:
        self.abort()
        owner.upstream_failed(self, "upstream broke the protocol", timeout=False)

    def _retired(self, ok: bool) -> None:
        pool = self._pool
        self._pool = None
        if self._deadlines is not None:
            self._deadlines.discard(self)
        assert pool is not None
        self._reset_at = 0
        if ok:
            self.state = _IDLE
            pool.release(self, True)
        else:
            # Whatever it was doing, it is not to be waited for: dropped, not closed.
            self.abort()
            pool.forget()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        previous, self.state = self.state, _CLOSED
        if self._deadlines is not None:
            self._deadlines.discard(self)
        if self.on_lost is not None:
            self.on_lost(self)
        if previous == _LENT:
            owner, self.owner = self.owner, None
            if owner is not None:
                owner.upstream_failed(self, "upstream connection lost", timeout=False)
        elif previous == _RETIRING:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.forget()


def _expired(connection: RedisUpstream) -> None:
    connection.timed_out()


@dataclass(frozen=True)
class RedisConnector:
    """
    Dials a Redis server for the pool (a L{persistproxy.interfaces.UpstreamConnector}):
    every redis listener's connector on one reactor is equal, so listeners proxying to one
    upstream share its pools.
    """

    clock: IReactorTime

    def factory_for(self, server: UpstreamServer, config: UpstreamConfig) -> Factory:
        deadlines = None
        if config.response_timeout > 0:
            deadlines = TimeoutQueue(self.clock, config.response_timeout, _expired)
        return _UpstreamFactory(deadlines)


class _UpstreamFactory(Factory):
    """Makes the L{RedisUpstream}s of one server, sharing its response-timeout queue."""

    noisy = False

    def __init__(self, deadlines: TimeoutQueue[RedisUpstream] | None) -> None:
        self._deadlines = deadlines

    def buildProtocol(self, addr: Any) -> RedisUpstream:
        return RedisUpstream(self._deadlines)
