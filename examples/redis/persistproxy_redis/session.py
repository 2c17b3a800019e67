# -*- test-case-name: test_redis_plugin -*-
"""
One client connection of a redis listener: RESP commands in, replies out in order, over
server connections borrowed from the pool only while commands are in flight.

How a connection is lent
========================

Commands are parsed with hiredis' reader (RESP arrays) or split as inline commands. While
the client has commands in flight it holds one pooled server connection and every command
it sends goes there, in order (a pipeline stays one pipeline). When the last reply has been
passed on, the connection goes back to the pool, and the client's next commands borrow
whichever is idle then. Many clients that mostly wait share a few server connections.

Pinning
=======

A command that leaves state on its connection (L{persistproxy_redis.commands}) pins the
connection to the client: it is not given back between bursts.

 - A transaction (MULTI, or WATCH outside one) ends with EXEC or DISCARD (or UNWATCH): once
   its replies are in, the connection is clean and is given back as usual.
 - Any other state (SELECT, AUTH, HELLO, CLIENT SETNAME, READONLY, ...) lasts until the
   client sends RESET or leaves. When it leaves, the proxy sends RESET (Redis 6.2+) and
   pools the connection only once the reply is exactly C{+RESET}; a server without RESET
   answers an error, and the connection is closed instead.
 - Once the client subscribed (SUBSCRIBE and its kin), the server pushes messages that answer
   no command, so replies are no longer counted: the connection stays with the client and is
   closed, never pooled, when the client leaves.
 - A blocking command (BLPOP, XREAD ... BLOCK, WAIT) holds its connection until its reply
   like any command, with no response timeout meanwhile; if the client leaves before the
   reply, the connection is closed (the reply would come to nobody, at any time).

Errors of the proxy's own are RESP errors, in their place in the reply stream: a command it
does not support, a server it cannot reach or that stopped answering. A client whose state
lived on a server connection that failed is closed after its errors: carrying on elsewhere
would run its next commands without that state.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import hiredis
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.interfaces import Pool, ProxyContext, Upstream
from persistproxy.timers import TimeoutQueue
from persistproxy_redis import commands as C
from persistproxy_redis.upstream import MORE, RedisUpstream

__all__ = ["RedisFactory", "RedisSession", "Settings"]

#: Redis' own bound on an inline command's line (PROTO_INLINE_MAX_SIZE).
INLINE_MAX: Final = 64 * 1024
#: Bytes of commands read but not yet sent (waiting for a connection) before the client is
#: no longer read.
MAX_QUEUED_BYTES: Final = 1024 * 1024

_OK = b"+OK\r\n"
_NOPROTO = b"-NOPROTO persistproxy: only RESP2 is proxied (HELLO 3 is refused)\r\n"
_QUOTED = b"-ERR persistproxy: quoted arguments in inline commands are not supported\r\n"

# Why reading the client is paused (a bit each).
_PIPELINE_FULL = 1
_UPSTREAM_FULL = 2

# Close reasons, as the access line gives them.
CLIENT_CLOSED = "client_closed"
CLIENT_RESET = "client_reset"
QUIT = "quit"
PROTOCOL_ERROR = "protocol_error"
IDLE_TIMEOUT = "idle_timeout"
DRAIN = "drain"
UPSTREAM_FAILED = "upstream_failed"


@dataclass(frozen=True)
class Settings:
    """A redis listener's keys (what C{listener.extra} may hold), with their defaults."""

    #: Seconds a client with nothing in flight may stay silent; 0: for ever (Redis' own
    #: C{timeout 0}). Not applied to subscribers nor to clients in a blocking command.
    client_idle_timeout: float = 0.0
    #: Bytes of one command; a longer one is a protocol error and the client is closed.
    max_command_size: int = 64 * 1024 * 1024
    #: Commands of one client read and not yet answered before its reading pauses.
    max_pipeline: int = 1024


@dataclass
class Listener:
    """What every session of one redis listener shares."""

    name: str
    clock: IReactorTime
    group: Upstream[RedisUpstream]
    context: ProxyContext
    access_log: bool
    settings: Settings
    idle: TimeoutQueue[RedisSession] | None


class _Local:
    """A reply the proxy writes itself, in its place among the server's."""

    __slots__ = ("close", "count", "data", "reason")

    def __init__(self, data: bytes, count: int = 1, close: str | None = None) -> None:
        self.data = data
        self.count = count
        #: The close reason, when the connection is closed once it is written.
        self.close = close


class _Batch:
    """
    Commands to send upstream together: their encoding, their count, and the commands that
    are not plain (by position in the batch, with their effect code), if any.
    """

    __slots__ = ("count", "data", "effects")

    def __init__(self, data: bytes, count: int, effects: list[tuple[int, int, Any]] | None) -> None:
        self.data = data
        self.count = count
        self.effects = effects


def _error(text: str) -> bytes:
    """A RESP error line (no line breaks can get into it)."""
    return b"-ERR " + " ".join(text.split()).encode("utf-8", "replace") + b"\r\n"


@implementer(IHalfCloseableProtocol, IPushProducer)
class RedisSession(TwistedProtocol):
    """
    One client connection of a redis listener (see the module docstring).

    @ivar conn: the server connection lent (or pinned) to this client, if any.
    @ivar items: commands and local replies not handed on yet, in order.
    @ivar queued: commands in C{items}.
    """

    def __init__(self, listener: Listener, host: str) -> None:
        self._listener = listener
        self._settings = listener.settings
        self._host = host
        self._reader = hiredis.Reader(notEnoughData=MORE)
        #: Bytes of a RESP command begun and not complete yet (0: the next byte starts a
        #: command); L{None} once a client encoded commands otherwise than hiredis does,
        #: after which where a command starts is not known (inline commands are refused).
        self._carry: int | None = 0
        #: Bytes read since the last command ended, to within one read.
        self._partial = 0
        #: The start of an inline command whose line has not ended.
        self._line = b""
        self.items: deque[_Local | _Batch] = deque()
        self.queued = 0
        self._queued_bytes = 0
        self.pool: Pool[RedisUpstream] | None = None
        self.conn: RedisUpstream | None = None
        self._acquiring = False
        #: The pool's waiter protocol: true once nobody wants the connection asked for.
        self.cancelled = False
        # The state of the connection held (see the module docstring).
        self.sticky = False
        self.in_multi = False
        self.watching = False
        self.pubsub = False
        self._pause = 0
        self._client_full = False
        self._fin = False
        self._draining = False
        self._closing = False
        #: Closing was decided (gracefully): nothing more is written.
        self._ended = False
        self.closed = False
        # For the access line.
        self._started = 0.0
        self.commands = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.lends = 0
        self.pinned: str | None = None
        self._reason: str | None = None
        self._error: str | None = None
        self._tls: dict[str, Any] | None = None
        self._logged = False

    # -- the client connection --------------------------------------------------------------

    def connectionMade(self) -> None:
        listener = self._listener
        self._started = listener.clock.seconds()
        self.pool = listener.group.pick()
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._became_idle()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.bytes_up += len(data)
        if self._line or (self._carry == 0 and data[0] != 42):  # 42: b"*"
            self._parse_inline(data)
        else:
            self._parse_resp(data)
        if self.items:
            self._busy()
            self._pump()

    def readConnectionLost(self) -> None:
        """
        The client's FIN: its commands are still answered, then the connection closes;
        but a blocking command is not waited for (as Redis does on a client's EOF): its
        connection is closed, so it cannot take an item from a list for nobody.
        """
        self._fin = True
        if self.pubsub or self._idle() or (self.conn is not None and self.conn.blocked()):
            self._close(CLIENT_CLOSED)

    def writeConnectionLost(self) -> None:
        """Nothing half-closes the client's side for writing."""

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.closed = True
        self._closing = self._ended = True
        if self._listener.idle is not None:
            self._listener.idle.discard(self)
        if self._acquiring:
            self.cancelled = True
            self._acquiring = False
        conn, self.conn = self.conn, None
        if conn is not None:
            self._give_back(conn)
        if self._reason is None:
            self._reason = CLIENT_CLOSED if reason.check(ConnectionDone) else CLIENT_RESET
        self.items.clear()
        self._log_access()

    # -- parsing ------------------------------------------------------------------------------

    def _parse_resp(self, data: bytes) -> None:
        reader = self._reader
        carry = self._carry
        reader.feed(data)
        found: list[Any] = []
        broken = False
        try:
            while True:
                command = reader.gets()
                if command is MORE:
                    break
                found.append(command)
        except (hiredis.ProtocolError, MemoryError):
            broken = True
        consumed = self._dispatch(found)
        if consumed < 0:
            return  # not an array of bulk strings: the connection is closing
        if broken:
            self._recover(data, carry, consumed)
            return
        if found:
            self._partial = len(data)
        else:
            self._partial += len(data)
        if carry is not None:
            carry += len(data) - consumed
            if carry < 0 or (carry == 0 and reader.has_data()):
                carry = None  # not encoded as hiredis encodes: where commands end is unknown
        self._carry = carry
        if (carry if carry is not None else self._partial) > self._settings.max_command_size:
            self._protocol_error(
                f"Protocol error: command larger than max_command_size"
                f" ({self._settings.max_command_size} bytes)"
            )

    def _recover(self, data: bytes, carry: int | None, consumed: int) -> None:
        """
        The reader met a byte that does not start a RESP value. Right where a command would
        start, that is an inline command after RESP ones (Redis allows the mix); anywhere
        else it is garbage.
        """
        self._reader = hiredis.Reader(notEnoughData=MORE)
        self._carry = 0
        self._partial = 0
        start = consumed - carry if carry is not None else -1
        if 0 <= start < len(data) and data[start] != 42:
            self._parse_inline(data[start:])
        else:
            self._protocol_error("Protocol error: invalid RESP")

    def _parse_inline(self, data: bytes) -> None:
        """Inline commands (a line of words, as typed into telnet) up to a RESP one."""
        if self._line:
            data, self._line = self._line + data, b""
        found: list[Any] = []
        pos = 0
        end = len(data)
        while pos < end:
            if data[pos] == 42:  # b"*": RESP from here on
                self._dispatch(found)
                self._parse_resp(data[pos:])
                return
            newline = data.find(b"\n", pos)
            if newline < 0:
                if end - pos > INLINE_MAX:
                    self._dispatch(found)
                    self._protocol_error("Protocol error: too big inline request")
                    return
                self._line = data[pos:]
                break
            line = data[pos:newline]
            pos = newline + 1
            words = line.split()
            if not words:
                continue
            if b'"' in line or b"'" in line:
                found.append(_Local(_QUOTED))
            else:
                found.append(words)
        self._dispatch(found)

    # -- commands into items --------------------------------------------------------------------

    def _dispatch(self, found: list[Any]) -> int:
        """
        Queue the commands found, in order: runs of commands to send become L{_Batch}es,
        each command encoded anew (what goes upstream is exactly what was understood, never
        the client's bytes); the proxy's own answers become L{_Local}s.

        @return: the bytes the commands take when encoded as hiredis encodes them (as
            every client does), which tells where the next command starts; -1 if one was
            not an array of bulk strings (a protocol error is queued, and nothing after it).
        """
        if not found or self._closing:
            return 0
        listener = self._listener
        listener.context.stats(listener.name).requests_total += len(found)
        self.commands += len(found)
        table = C.TABLE
        resolve = C.resolve
        pack = hiredis.pack_command
        consumed = 0
        parts: list[bytes] = []
        specials: list[tuple[int, int, Any]] | None = None
        for command in found:
            if type(command) is list:
                if not command:
                    consumed += 4  # *0: ignored, as Redis does
                    continue
                try:
                    b"".join(command)  # every argument a byte string, or TypeError
                    packed = pack(tuple(command))
                except TypeError:
                    code = -1
                else:
                    consumed += len(packed)
                    code = table.get(command[0].upper(), 0)
                    if code >= C.RESOLVE:
                        code = resolve(code, command)
                    if code < C.LOCAL:
                        if code:
                            if specials is None:
                                specials = []
                            specials.append((len(parts), code, command))
                        parts.append(packed)
                        continue
            elif command is None:
                consumed += 5  # *-1: ignored, as Redis does
                continue
            elif isinstance(command, _Local):
                code = C.LOCAL
            else:
                code = -1
            if parts:
                self._queue_batch(parts, specials)
                parts, specials = [], None
            if code == -1:
                self._protocol_error("Protocol error: expected an array of bulk strings")
                return -1
            if isinstance(command, _Local):
                local = command
            elif code == C.UNSUPPORTED:
                local = _Local(C.NOT_SUPPORTED)
            elif code == C.QUIT:
                local = _Local(_OK, close=QUIT)
            else:
                local = _Local(_NOPROTO)
            self.items.append(local)
            self.queued += 1
            if local.close is not None:
                self._closing = True
                return consumed
        if parts:
            self._queue_batch(parts, specials)
        return consumed

    def _queue_batch(self, parts: list[bytes], specials: list[tuple[int, int, Any]] | None) -> None:
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        self.items.append(_Batch(data, len(parts), specials))
        self.queued += len(parts)
        self._queued_bytes += len(data)

    def _protocol_error(self, text: str) -> None:
        """Answer the error after what came before it, then close, as Redis does."""
        listener = self._listener
        listener.context.stats(listener.name).bad_requests += 1
        self._error = text
        self.items.append(_Local(_error(text), close=PROTOCOL_ERROR))
        self.queued += 1
        self._closing = True

    # -- items out --------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Hand on what can go now, in order; then settle (give back, resume, close)."""
        items = self.items
        while items:
            if self._ended:
                return
            item = items[0]
            conn = self.conn
            if isinstance(item, _Local):
                if conn is not None and conn.outstanding():
                    return  # after the replies to the commands before it
                items.popleft()
                self.queued -= item.count
                self._write(item.data)
                if item.close is not None:
                    items.clear()
                    self.queued = 0
                    self._close(item.close)
                    return
                continue
            if conn is None:
                if not self._acquiring:
                    self._acquire()
                return
            items.popleft()
            self.queued -= item.count
            self._queued_bytes -= len(item.data)
            self._send(conn, item)
        self._settle()

    def _send(self, conn: RedisUpstream, batch: _Batch) -> None:
        effects = batch.effects
        if effects is not None:
            base = conn.sent
            for position, code, command in effects:
                seq = base + position + 1
                if code == C.BLOCKING:
                    if not self.in_multi:
                        conn.add_blocking(seq)
                elif code == C.MULTI:
                    self.in_multi = True
                    self._pinned_by(command)
                elif code == C.WATCH:
                    if not self.in_multi:
                        self.watching = True
                        self._pinned_by(command)
                elif code == C.EXEC:
                    # Outside a transaction EXEC and DISCARD are errors that unwatch nothing.
                    if self.in_multi:
                        self.in_multi = self.watching = False
                elif code == C.UNWATCH:
                    if not self.in_multi:
                        self.watching = False
                elif code == C.STICKY:
                    self.sticky = True
                    self._pinned_by(command)
                elif code == C.PUBSUB:
                    if not self.pubsub:
                        self.pubsub = True
                        self._pinned_by(command)
                        conn.stop_counting_after(seq - 1)
                        if self._listener.idle is not None:
                            self._listener.idle.discard(self)
                elif code == C.CLIENT_RESET and not self.pubsub:
                    if self.in_multi:
                        # Whether it runs now or is queued until EXEC, assume the worst:
                        # the connection is RESET again when the client leaves.
                        self.sticky = True
                        self._pinned_by(command)
                    else:
                        self.sticky = self.watching = False
        conn.send(batch.data, batch.count)
        if self._fin and conn.blocked():
            self._close(CLIENT_CLOSED)  # see readConnectionLost

    def _pinned_by(self, command: Any) -> None:
        if self.pinned is None:
            self.pinned = bytes(command[0]).upper().decode("ascii", "replace")

    def _settle(self) -> None:
        """Nothing is waiting to be handed on: give back, resume reading, finish a close."""
        conn = self.conn
        if conn is not None and not conn.outstanding() and not self._holds_state():
            self._release(conn)
            conn = None
        if self._pause & _PIPELINE_FULL and self._room():
            self._resume(_PIPELINE_FULL)
        if conn is None or (not conn.outstanding() and not self.pubsub):
            if self._fin:
                self._close(CLIENT_CLOSED)
            elif self._draining:
                self._close(DRAIN)
            elif not self._closing:
                self._became_idle()

    def _holds_state(self) -> bool:
        return self.sticky or self.in_multi or self.watching or self.pubsub

    def _idle(self) -> bool:
        """Nothing in flight."""
        conn = self.conn
        return not self.items and (conn is None or not conn.outstanding())

    def _room(self) -> bool:
        """Whether more commands may be read."""
        conn = self.conn
        inflight = self.queued + (conn.outstanding() if conn is not None else 0)
        return (
            inflight < self._settings.max_pipeline and self._queued_bytes < MAX_QUEUED_BYTES
        )

    def _busy(self) -> None:
        """Commands are in flight: no idle timeout; no more reading once the pipe is full."""
        idle = self._listener.idle
        if idle is not None:
            idle.discard(self)
        if not self._room():
            self._pause_reading(_PIPELINE_FULL)

    def _became_idle(self) -> None:
        idle = self._listener.idle
        if idle is not None and not self.pubsub and (self.conn is None or not self.conn.blocked()):
            idle.add(self)

    def idle_expired(self) -> None:
        """The listener's idle timeout (L{Settings.client_idle_timeout}) fired for this client."""
        if not self.closed and self._idle() and not self.pubsub:
            self._close(IDLE_TIMEOUT)

    # -- the pool --------------------------------------------------------------------------------

    def _acquire(self) -> None:
        pool = self.pool
        assert pool is not None
        self._acquiring = True
        pool.acquire(self)

    def connection_ready(self, connection: RedisUpstream, reused: bool) -> None:
        self._acquiring = False
        if self.closed or self._ended:
            self.pool.release(connection, True)  # type: ignore[union-attr]
            return
        self.conn = connection
        self.lends += 1
        connection.lend(self)
        if self._client_full:
            connection.pause_reading()
        self._pump()

    def connection_failed(self, reason: str, status: int) -> None:
        """No connection: each command waiting gets the error, in its place."""
        self._acquiring = False
        listener = self._listener
        listener.context.stats(listener.name).upstream_errors += 1
        self._error = reason
        self._fail_items(_error(f"persistproxy: {reason}"))
        self._pump()

    def _fail_items(self, error: bytes) -> None:
        items = self.items
        for i, item in enumerate(items):
            if isinstance(item, _Batch):
                items[i] = _Local(error * item.count, item.count)
                self._queued_bytes -= len(item.data)

    def _release(self, conn: RedisUpstream) -> None:
        self.conn = None
        conn.unlend()
        self._resume(_UPSTREAM_FULL)
        pool = self.pool
        assert pool is not None
        pool.release(conn, True)

    def _give_back(self, conn: RedisUpstream) -> None:
        """The client left while holding C{conn}: pool it, clean it first, or close it."""
        conn.unlend()
        pool = self.pool
        assert pool is not None
        if self.pubsub or conn.blocked():
            pool.release(conn, False)
        elif self.sticky or self.in_multi or self.watching:
            conn.retire(pool, reset=True)
        elif conn.outstanding():
            conn.retire(pool, reset=False)
        else:
            pool.release(conn, True)

    # -- what the lent connection reports (ReplySink) ----------------------------------------------

    def replies(self, data: bytes, count: int) -> None:
        self.bytes_down += len(data)
        self._write(data)
        conn = self.conn
        if count and conn is not None and not conn.outstanding():
            self._pump()
        elif self._pause & _PIPELINE_FULL and self._room():
            self._resume(_PIPELINE_FULL)

    def upstream_backlogged(self, full: bool) -> None:
        if full:
            self._pause_reading(_UPSTREAM_FULL)
        else:
            self._resume(_UPSTREAM_FULL)

    def upstream_failed(self, connection: RedisUpstream, reason: str, timeout: bool) -> None:
        """
        The lent connection is gone with C{outstanding()} commands unanswered: each gets an
        error. The client goes on with a new connection, unless state of its lived on this
        one, or a reply was cut in the middle: then it is closed after the errors (or at
        once).
        """
        if connection is not self.conn:
            return
        listener = self._listener
        stats = listener.context.stats(listener.name)
        if timeout:
            stats.timeouts += 1
        else:
            stats.upstream_errors += 1
        self._error = reason
        self.conn = None
        pool = self.pool
        assert pool is not None
        pool.forget()
        self._resume(_UPSTREAM_FULL)
        if connection.mid_reply():
            self._reason = UPSTREAM_FAILED
            self._closing = self._ended = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        error = _error(f"persistproxy: {reason}")
        lost = connection.outstanding()
        if lost:
            self._write(error * lost)
        if self._holds_state():
            self.items.clear()
            self.queued = 0
            self._close(UPSTREAM_FAILED)
            return
        self._pump()

    # -- flow control ------------------------------------------------------------------------

    def _pause_reading(self, why: int) -> None:
        if not self._pause and not self.closed:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._pause |= why

    def _resume(self, why: int) -> None:
        if self._pause & why:
            self._pause &= ~why
            if not self._pause and not self.closed and not self._closing:
                self.transport.resumeProducing()  # type: ignore[union-attr]

    # IPushProducer: the client does not read its replies fast enough.
    def pauseProducing(self) -> None:
        self._client_full = True
        if self.conn is not None:
            self.conn.pause_reading()

    def resumeProducing(self) -> None:
        self._client_full = False
        if self.conn is not None:
            self.conn.resume_reading()

    def stopProducing(self) -> None:
        """The client's transport is going; connectionLost follows."""

    def _write(self, data: bytes) -> None:
        if not self._ended:
            self.transport.write(data)  # type: ignore[union-attr]

    # -- closing ---------------------------------------------------------------------------------

    def _close(self, reason: str) -> None:
        """Close gracefully: what was written goes first."""
        if self._ended or self.closed:
            return
        self._closing = self._ended = True
        if self._reason is None:
            self._reason = reason
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.loseConnection()

    # DrainAware
    def close_if_idle(self) -> bool:
        """Close now if nothing is in flight (a subscriber only waits: it is closed too)."""
        if self.closed:
            return True
        if self.pubsub or self._idle():
            self._close(DRAIN)
            return True
        self._draining = True
        return False

    def drain_cut(self) -> None:
        """The drain timeout: abort, and write the access line now (see the tcp plugin)."""
        self._reason = DRAIN
        self._closing = self._ended = True
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()
        self._log_access()

    # TLSAware
    def tls_established(self, facts: dict[str, Any]) -> None:
        self._tls = facts

    def _log_access(self) -> None:
        """The connection's one access line."""
        listener = self._listener
        if not listener.access_log or self._logged:
            return
        self._logged = True
        fields: dict[str, Any] = {
            "listener": listener.name,
            "protocol": "redis",
            "client": self._host,
            "upstream": self.pool.address if self.pool is not None else None,
            "commands": self.commands,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "lends": self.lends,
            "pinned": self.pinned,
            "duration_ms": round((listener.clock.seconds() - self._started) * 1000, 3),
            "reason": self._reason,
        }
        if self._error is not None:
            fields["error"] = self._error
        if self._tls is not None:
            fields.update(self._tls)
        listener.context.access_log.record(fields)


def _idle_expired(session: RedisSession) -> None:
    session.idle_expired()


def idle_queue(clock: IReactorTime, timeout: float) -> TimeoutQueue[RedisSession] | None:
    """The idle-timeout queue of one listener's sessions (none when C{timeout} is 0)."""
    if timeout <= 0:
        return None
    return TimeoutQueue(clock, timeout, _idle_expired)


class RedisFactory(Factory):
    """Builds a L{RedisSession} for each admitted connection."""

    noisy = False

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: Any) -> RedisSession:
        return RedisSession(self.listener, getattr(addr, "host", None) or "")
