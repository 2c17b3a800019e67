# -*- test-case-name: tests.unit.test_relay -*-
"""
A byte relay between two connected transports: what a raw TCP listener, a WebSocket (Upgrade)
tunnel and a CONNECT tunnel have in common once both connections are up.

The relay does not know how the connections were made (accepted, dialled, upgraded from HTTP,
TLS or not). Each connection's protocol makes a L{RelaySide} around its transport as soon as
it has one and passes its events on (C{received}, C{read_finished}, C{lost}); a side not yet
joined holds what arrives, with its transport paused. L{Relay} joins two sides and from then
on:

 - Bytes read on one side are written to the other at once (straight to the socket when
   nothing is queued, L{persistproxy.net.fastwrite}).
 - Back-pressure both ways: each transport is the registered streaming producer of the
   other, so a side whose peer cannot take more (Twisted's write buffer past its
   C{bufferSize}) stops being read until the peer drained it. A slow reader on either end
   costs at most about two buffers of memory, whatever the transfer size.
 - Half-close both ways: a side's FIN (C{readConnectionLost}) is passed on as a shutdown of
   writing on the other connection, after what was already written, and the other direction
   keeps flowing until its own FIN; then both connections close. Twisted's TLS client
   (C{TLSMemoryBIOProtocol}, an upstream with C{tls = true}) cannot shut down writing alone:
   there the half-close is its C{loseConnection}, which sends close_notify and still reads
   until the server closes.
 - A connection lost outright: a clean close ends the other connection gracefully (what it
   still has to write is written first); a reset is passed on as a reset (an abort), so a
   truncated stream never looks complete to the other end.
 - One idle timeout over both directions, in a L{TimeoutQueue} shared by every relay of a
   listener (no reactor timer per relay): any byte either way restarts it.
 - Byte counts each way and one close reason (L{CLIENT_FIN}, L{UPSTREAM_FIN}, L{RESET},
   L{IDLE_TIMEOUT}, L{DRAIN}); C{on_end} is called once both connections are gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from persistproxy.net.fastwrite import (
    backlogged,
    can_write_directly,
    lose_write_directly,
    write_directly,
)
from persistproxy.timers import TimeoutQueue

__all__ = [
    "CLIENT_FIN",
    "CONNECT_FAILED",
    "DRAIN",
    "IDLE_TIMEOUT",
    "RESET",
    "UPSTREAM_FIN",
    "Relay",
    "RelaySide",
    "idle_queue",
]

#: The client's FIN came first; both directions then finished (or the upstream closed).
CLIENT_FIN = "client_fin"
#: The upstream's FIN came first.
UPSTREAM_FIN = "upstream_fin"
#: Either connection was reset (or broke) before both directions had finished.
RESET = "reset"
#: No byte in either direction for the idle timeout.
IDLE_TIMEOUT = "idle_timeout"
#: Cut by a graceful drain (or closed by it before anything was sent).
DRAIN = "drain"
#: The upstream connection could not be made (the caller's reason: the relay never started).
CONNECT_FAILED = "connect_failed"

#: Read size and write-buffer bound (Twisted's C{bufferSize}) of a relayed TCP transport.
#: Measured with C{bench/run.sh tcp}: Twisted's 64 KiB costs 1.75x the CPU per GiB relayed
#: (4x the reads, sends and Python calls per byte), 1 MiB 1.25x (buffers that big fall out of
#: the CPU caches). A relay holds at most about two of these per direction.
BUFFER_SIZE = 256 * 1024

# RelaySide states.
_HOLDING = "HOLDING"
_OPEN = "OPEN"
_FINISHED = "FINISHED"
_LOST = "LOST"

# How far a side's closing went (RelaySide._closing).
_CLOSING = 1
_ABORTING = 2


def idle_queue(clock: IReactorTime, timeout: float) -> TimeoutQueue[Relay] | None:
    """
    The idle-timeout queue of one listener's relays (L{None} when C{timeout} is 0: never).
    """
    if timeout <= 0:
        return None
    return TimeoutQueue(clock, timeout, _idle_expired)


def _idle_expired(relay: Relay) -> None:
    relay.cut(IDLE_TIMEOUT)


class RelaySide:
    """
    One connection of a relay, as the relay sees it: the transport written to, and the events
    of the protocol that reads it.

    @ivar state: C{"HOLDING"}: not joined to a relay yet; what arrives is held and the
        transport paused. C{"OPEN"}: read, and its bytes passed on. C{"FINISHED"}: its FIN
        arrived (passed on as a half-close of the other side); it may still be written to.
        C{"LOST"}: the connection is gone.
    @ivar bytes: bytes read from this connection and passed on (the held ones once passed).
    @ivar failure: why the connection was lost, once C{"LOST"}.
    """

    __slots__ = (
        "_closing",
        "_direct",
        "_held",
        "_held_fin",
        "_producing",
        "bytes",
        "failure",
        "name",
        "peer",
        "relay",
        "state",
        "transport",
    )

    def __init__(self, transport: Any, name: str) -> None:
        """
        @param transport: the connection's transport (TCP, TLS, or anything with
            C{write}, C{loseConnection}, C{abortConnection}, producer registration and
            C{pauseProducing}/C{resumeProducing}).
        @param name: C{"client"} or C{"upstream"}, as in the close reasons.
        """
        self.transport = transport
        self.name = name
        self.state = _HOLDING
        self.bytes = 0
        self.failure: Failure | None = None
        self.relay: Relay | None = None
        self.peer: RelaySide | None = None
        self._direct = can_write_directly(transport)
        self._held: list[bytes] | None = None
        self._held_fin = False
        #: This transport is registered as the producer of the peer's transport.
        self._producing = False
        #: How far closing it went: 0, L{_CLOSING} or L{_ABORTING}.
        self._closing = 0

    # -- what the connection's protocol calls ------------------------------------------------

    def received(self, data: bytes) -> None:
        """Bytes read from this connection (its protocol's C{dataReceived})."""
        if self.state == _OPEN:
            relay = self.relay
            assert relay is not None
            if relay.reason is not None:
                return  # cut: the rest of a read that was under way is dropped
            self.bytes += len(data)
            self._pass_on(data)
            queue = relay.idle
            if queue is not None:
                queue.add(relay)
        elif self.state == _HOLDING:
            if self._held is None:
                self._held = []
                self.transport.pauseProducing()
            self._held.append(data)
        elif self.state == _LOST:
            # A TLS transport may still deliver the rest of a read after its connection was
            # closed under it (the relay closed it: nothing more is wanted from it).
            return
        else:
            raise RuntimeError(f"{self.name}: bytes after its FIN ({self.state})")

    def read_finished(self) -> None:
        """This connection's FIN (its protocol's C{readConnectionLost})."""
        if self.state == _OPEN:
            self.state = _FINISHED
            assert self.relay is not None
            self.relay._finished(self)
        elif self.state == _HOLDING:
            self._held_fin = True
        # FINISHED (a TLS close_notify, then the FIN) or LOST: already known.

    def lost(self, reason: Failure) -> None:
        """This connection is gone (its protocol's C{connectionLost})."""
        if self.state == _LOST:
            return
        previous, self.state = self.state, _LOST
        self.failure = reason
        if self.relay is not None:
            self.relay._lost(self, previous)

    # -- what the relay does to it ------------------------------------------------------------

    def _pass_on(self, data: bytes) -> None:
        peer = self.peer
        assert peer is not None
        if peer.state == _LOST:
            return
        if peer._direct:
            write_directly(peer.transport, data)
        else:
            peer.transport.write(data)

    def _stop_producing_for_peer(self) -> None:
        """This connection's bytes stop flowing to the peer: unregister it as the producer."""
        if self._producing:
            self._producing = False
            peer = self.peer
            assert peer is not None
            if peer.state != _LOST:
                peer.transport.unregisterProducer()

    def _half_close(self) -> None:
        """No more bytes for this connection: what is written goes, then our FIN."""
        transport = self.transport
        if self._direct:
            lose_write_directly(transport)
        elif isinstance(transport, TLSMemoryBIOProtocol):
            transport.loseConnection()  # close_notify; reading goes on until the server closes
        else:
            lose_write = getattr(transport, "loseWriteConnection", None)
            if lose_write is not None:
                lose_write()
            else:
                transport.loseConnection()

    def _close(self, abort: bool) -> None:
        """
        Close the connection: gracefully (what is written goes first), or abort it; a
        graceful close may still become an abort, nothing is done twice.
        """
        wanted = _ABORTING if abort else _CLOSING
        if self.state == _LOST or self._closing >= wanted:
            return
        self._closing = wanted
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def _backlogged(self) -> bool:
        return backlogged(self.transport, self._direct)


class Relay:
    """
    Passes bytes between two L{RelaySide}s until both connections are gone (see the module
    docstring).

    @ivar reason: L{None} while the relay runs normally; the close reason once it is decided
        (a cut decides it at once; otherwise it is settled when the relay ends).
    @ivar ended: both connections are gone and C{on_end} was called.
    """

    __slots__ = (
        "_both_finished",
        "_first_fin",
        "_on_end",
        "_reset",
        "client",
        "ended",
        "idle",
        "reason",
        "upstream",
    )

    def __init__(
        self,
        client: RelaySide,
        upstream: RelaySide,
        idle: TimeoutQueue[Relay] | None,
        on_end: Callable[[Relay], object],
    ) -> None:
        """
        @param idle: the listener's idle-timeout queue (L{idle_queue}), or L{None}.
        @param on_end: called once with the relay when both connections are gone; C{reason},
            C{client.bytes} and C{upstream.bytes} are final then.
        """
        self.client = client
        self.upstream = upstream
        self.idle = idle
        self.reason: str | None = None
        self.ended = False
        self._on_end = on_end
        self._first_fin: str | None = None
        self._reset = False
        self._both_finished = False

    @property
    def bytes_up(self) -> int:
        """Bytes from the client passed to the upstream."""
        return self.client.bytes

    @property
    def bytes_down(self) -> int:
        """Bytes from the upstream passed to the client."""
        return self.upstream.bytes

    def start(self) -> None:
        """
        Join the two sides: wire flow control both ways, pass on what each side held, and
        start reading both. C{on_end} may be called before this returns (a side was already
        lost).
        """
        client, upstream = self.client, self.upstream
        if client.state != _HOLDING and client.state != _LOST:
            raise RuntimeError(f"client side already joined ({client.state})")
        if upstream.state != _HOLDING and upstream.state != _LOST:
            raise RuntimeError(f"upstream side already joined ({upstream.state})")
        client.peer, upstream.peer = upstream, client
        client.relay = upstream.relay = self
        held = []
        for side in (client, upstream):
            held.append((side, side._held, side._held_fin, side.state))
            side._held = None
            if side.state == _HOLDING:
                side.state = _OPEN
        for side in (client, upstream):
            peer = side.peer
            assert peer is not None
            if side.state == _OPEN and peer.state != _LOST:
                peer.transport.registerProducer(side.transport, True)
                side._producing = True
        if self.idle is not None:
            self.idle.add(self)
        for side, data, fin, state in held:
            for chunk in data or ():
                side.bytes += len(chunk)
                side._pass_on(chunk)
            if state == _LOST:
                self._lost(side, _HOLDING)
            elif fin:
                side.read_finished()
        for side in (client, upstream):
            if side._direct:
                side.transport.bufferSize = BUFFER_SIZE
        for side in (client, upstream):
            if side.state == _OPEN:
                side.transport.resumeProducing()

    def cut(self, reason: str, abort: bool = False) -> None:
        """
        End the relay now (idle timeout, drain) with C{reason}. Both connections close,
        gracefully where nothing waits to be written, otherwise (or with C{abort}) by an
        abort: a peer that stopped reading would hold a graceful close open for ever.
        """
        if self.ended:
            return
        if self.reason is None:
            self.reason = reason
        if self.idle is not None:
            self.idle.discard(self)
        for side in (self.client, self.upstream):
            side._stop_producing_for_peer()
        for side in (self.client, self.upstream):
            side._close(abort=abort or side._backlogged())

    # -- side events --------------------------------------------------------------------------

    def _finished(self, side: RelaySide) -> None:
        if self._first_fin is None:
            self._first_fin = CLIENT_FIN if side is self.client else UPSTREAM_FIN
        peer = side.peer
        assert peer is not None
        side._stop_producing_for_peer()
        if peer.state == _FINISHED:
            # Both directions are done: close both (each writes what it holds first).
            self._both_finished = True
            peer._stop_producing_for_peer()
            side._close(abort=False)
            peer._close(abort=False)
        elif peer.state == _OPEN:
            peer._half_close()

    def _lost(self, side: RelaySide, previous: str) -> None:
        failure = side.failure
        clean = failure is None or failure.check(ConnectionDone) is not None
        if not clean and not self._both_finished:
            self._reset = True
        elif previous != _FINISHED and self._first_fin is None:
            # Closed outright: its FIN and the end of its reading at once.
            self._first_fin = CLIENT_FIN if side is self.client else UPSTREAM_FIN
        side._stop_producing_for_peer()
        peer = side.peer
        assert peer is not None
        if peer.state != _LOST:
            peer._stop_producing_for_peer()
            peer._close(abort=not clean)
            return
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.idle is not None:
            self.idle.discard(self)
        if self.reason is None:
            self.reason = RESET if self._reset else (self._first_fin or RESET)
        self._on_end(self)
