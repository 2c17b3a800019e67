# -*- test-case-name: tests.unit.test_client_closing -*-
"""
How a client connection ends and what it waits for: the timeout queues of its phases, the
send timeout and minimum send rate, the graceful close (half-close, then a short drain of
the client's input, so a response already sent is not destroyed by a reset), and the drain
and idle reaping the listener asks for.

A slotted mixin of the client connection, as L{persistproxy.http.request_head} is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from persistproxy.http.errors import error_response
from persistproxy.http.request_body import RequestBodyReader
from persistproxy.net.fastwrite import MSG_MORE, fin_can_follow, lose_write_directly, queued
from persistproxy.policy import Deadline

if TYPE_CHECKING:
    from persistproxy.http.context import ListenerContext, TimedConnection
    from persistproxy.http.exchange import Exchange
    from persistproxy.timers import TimeoutQueue

__all__ = ["ClientClosing"]


class _SendMeter:
    """
    How fast a client takes the response it holds back (see L{ClientClosing.send_stalled}):
    the seconds of its stalls in the current window and the bytes it took during them.
    Made only when the listener has a C{min_send_rate} and a response stalls.

    @ivar since: when the current stall began; L{None} while the client keeps up.
    @ivar mark: the bytes of the response the client had taken then.
    """

    __slots__ = ("exchange", "mark", "seconds", "since", "taken")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.since: float | None = None
        self.mark = 0
        self.seconds = 0.0
        self.taken = 0


class ClientClosing(RequestBodyReader):
    """
    The closing half of the client connection's state machine (see its C{_phase}). The
    slices of the connection are one chain of slotted classes (head, body, closing), since
    Python allows slots in only one line of bases.
    """

    # The state of phases and waiting is kept here; the connection sets it up.
    __slots__ = ("_pause", "_phase", "_send_meter", "_timer", "_waiting")

    _phase: str
    _pause: int
    _waiting: TimeoutQueue[TimedConnection] | None
    _timer: Deadline | None
    _send_meter: _SendMeter | None

    # The connection's, read here.
    _ctx: ListenerContext
    _queue: list[Exchange]
    _direct: bool
    _peer_str: str
    _served: int
    _out: list[bytes] | None
    transport: Any

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def abort(self, by: str = "timeout") -> None:
        raise NotImplementedError

    def _send_out(self, flags: int = 0) -> None:
        raise NotImplementedError

    def _end_current(self, by: str) -> bool:
        raise NotImplementedError

    def _answer_last(
        self, status: int, detail: str, method: bytes, target: bytes, version: str
    ) -> None:
        raise NotImplementedError

    def _request_line(self) -> tuple[bytes, bytes, str]:
        raise NotImplementedError

    def reap_idle(self) -> None:
        """
        The listener reaps this connection: its client parks too many idle ones.
        """
        if self._phase == "idle":
            self._close_gracefully()

    def send_stalled(self) -> None:
        """
        The client stopped reading our response (our buffer to it is full): it has
        C{send_timeout} to resume, and while it holds the response back it must take it at
        C{min_send_rate} or better, over C{min_send_rate_window} seconds of stalls.
        """
        ctx = self._ctx
        send_queue = ctx.send_queue
        if send_queue is not None:
            send_queue.add(self)
        rate_queue = ctx.send_rate_queue
        if rate_queue is None or not self._queue:
            return
        exchange = self._queue[0]
        taken = self._taken(exchange)
        if taken is None:
            return  # a transport we do not see into: no rate to measure
        meter = self._send_meter
        if meter is None or meter.exchange is not exchange:
            meter = self._send_meter = _SendMeter(exchange)
        meter.since = ctx.clock.seconds()
        meter.mark = taken
        rate_queue.add(self)

    def send_flowing(self) -> None:
        ctx = self._ctx
        send_queue = ctx.send_queue
        if send_queue is not None:
            send_queue.discard(self)
        meter = self._send_meter
        if meter is None or meter.since is None:
            return
        rate_queue = ctx.send_rate_queue
        if rate_queue is not None:
            rate_queue.discard(self)
        taken = self._taken(meter.exchange)
        meter.seconds += ctx.clock.seconds() - meter.since
        meter.taken += (taken if taken is not None else meter.mark) - meter.mark
        meter.since = None
        if meter.seconds >= ctx.config.min_send_rate_window:
            # A window of short stalls is complete: judge it once this event is handled
            # (we may be inside the write that resumed us, or the response's last).
            ctx.after_event(self.send_rate_due)

    def send_rate_due(self) -> None:
        """
        Judge the client's rate over its stalls: a window of them is complete, or one stall
        lasted the whole window (called by the listener's queue).
        """
        meter = self._send_meter
        queue = self._queue
        if meter is None or not queue or queue[0] is not meter.exchange:
            return  # that response is over
        if self._phase == "closed":
            return
        ctx = self._ctx
        config = ctx.config
        now = ctx.clock.seconds()
        seconds = meter.seconds
        taken = meter.taken
        current = None
        if meter.since is not None:
            current = self._taken(meter.exchange)
            if current is not None:
                seconds += now - meter.since
                taken += current - meter.mark
        if seconds < config.min_send_rate_window:
            return
        if taken < config.min_send_rate * seconds:
            ctx.stats.timeouts += 1
            ctx.log.info(
                "client.min_send_rate",
                listener=ctx.name,
                client=self._peer_str,
                rate=round(taken / seconds, 1),
                bytes=taken,
                seconds=round(seconds, 3),
                min_send_rate=config.min_send_rate,
            )
            self.abort()
            return
        meter.seconds = 0.0
        meter.taken = 0
        if meter.since is not None and current is not None:
            meter.since = now  # a new window from now, in the middle of this stall
            meter.mark = current
            rate_queue = ctx.send_rate_queue
            if rate_queue is not None:
                rate_queue.add(self)

    def _taken(self, exchange: Exchange) -> int | None:
        """
        The bytes of C{exchange}'s response the client has taken (or the kernel for it):
        those written less those still queued; L{None} for a transport we cannot see into.
        """
        waiting = queued(self.transport)
        if waiting is None:
            return None
        out = self._out
        if out:
            waiting += sum(map(len, out))
        return exchange.bytes_out - waiting

    def _forget_sends(self) -> None:
        """The connection is gone: out of the send queues."""
        ctx = self._ctx
        if ctx.send_queue is not None:
            ctx.send_queue.discard(self)
        if ctx.send_rate_queue is not None:
            ctx.send_rate_queue.discard(self)
        self._send_meter = None

    def _body_held(self) -> None:
        """
        We stopped reading a request body (its origin, or the pipeline, is behind): its
        timers stop, as the client cannot send.
        """
        self._wait(None)

    def _body_released(self) -> None:
        """Reading the body again: its silence is timed again, its rate from the next read."""
        self._wait(self._ctx.body_queue)
        current = self._current
        if current is not None:
            current.rate_since = None

    def send_timed_out(self) -> None:
        ctx = self._ctx
        ctx.stats.timeouts += 1
        ctx.log.info(
            "client.send_timeout",
            listener=ctx.name,
            client=self._peer_str,
            timeout=ctx.config.send_timeout,
        )
        self.abort()

    def close_if_idle(self) -> bool:
        """
        For a graceful drain: close now if nothing is in flight, else after the response.
        """
        if self._phase == "idle":
            self._close_gracefully()
            return True
        return False


    def _close_gracefully(self) -> None:
        """
        Half-close and drain: a client whose pipelined requests are still in our receive
        buffer would otherwise get a reset and lose the responses it was reading.
        """
        if self._phase in ("lingering", "closed"):
            return
        self._phase = "lingering"
        queue = self._queue
        while queue:
            queue.pop().cancel()
        transport = self.transport
        if transport is None:
            return
        # Until our FIN is out, the client must keep reading; after it (writeConnectionLost,
        # usually at once), linger briefly.
        self._wait(None)
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is None:
            self._deadline(self._ctx.config.send_timeout or 60)
            self._send_out()
            transport.loseConnection()
            return
        if self._pause:
            self._pause = 0
            transport.resumeProducing()  # type: ignore[attr-defined]
        if self._direct:
            # The last bytes and the FIN in one segment when the FIN can follow at once.
            self._send_out(MSG_MORE if fin_can_follow(transport) else 0)
            lose_write_directly(transport)
        else:
            lose_write()
        if self._phase == "lingering" and self._waiting is not self._ctx.linger_queue:
            # The FIN waits behind unsent bytes: the client has this long to read them.
            self._deadline(self._ctx.config.send_timeout or 60)

    def _close_now(self) -> None:
        self._wait(None)
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self._send_out()
            self.transport.loseConnection()

    def _wait(self, queue: TimeoutQueue[TimedConnection] | None) -> None:
        """
        Wait in C{queue} (header, body or keep-alive timeout) from now, and in no other.
        """
        waiting = self._waiting
        if waiting is not None and waiting is not queue:
            waiting.discard(self)
        self._waiting = queue
        if queue is not None:
            queue.add(self)

    def _deadline(self, seconds: float) -> None:
        """A timer of this connection's own, for lingering and the end of its lifetime."""
        if self._timer is None:
            self._timer = Deadline(self._ctx.clock, self.timed_out)
        self._timer.arm(seconds)

    def timed_out(self) -> None:
        """
        The timeout of the current phase expired (called by the listener's queues).
        """
        self._waiting = None
        phase = self._phase
        ctx = self._ctx
        if phase == "lingering":
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if phase == "idle":
            ctx.log.debug("client.idle_timeout", listener=ctx.name, client=self._peer_str)
            if ctx.config.send_408_on_idle and self._served:  # not to a connection never used
                self.write(error_response(408, "idle timeout"))
            self._close_gracefully()
            return
        if phase in ("head", "body"):
            ctx.stats.timeouts += 1
            ctx.log.info(
                "client.timeout",
                listener=ctx.name,
                client=self._peer_str,
                phase=phase,
            )
            # Its access line says what was read of it (the request line, if complete).
            line = self._request_line()
            if self._end_current("timeout"):
                return
            self._answer_last(408, f"no complete request {phase} in time", *line)
