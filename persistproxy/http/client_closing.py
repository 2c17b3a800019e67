# -*- test-case-name: tests.unit.test_client_closing -*-
"""
How a client connection ends and what it waits for: the timeout queues of its phases, the
send timeout, the graceful close (half-close, then a short drain of the client's input, so a
response already sent is not destroyed by a reset), and the drain and idle reaping the
listener asks for.

A slotted mixin of the client connection, as L{persistproxy.http.request_head} is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from persistproxy.http.errors import error_response
from persistproxy.http.request_body import RequestBodyReader
from persistproxy.net.fastwrite import MSG_MORE, fin_can_follow, lose_write_directly
from persistproxy.policy import Deadline

if TYPE_CHECKING:
    from persistproxy.http.context import ListenerContext, TimedConnection
    from persistproxy.http.exchange import Exchange
    from persistproxy.timers import TimeoutQueue

__all__ = ["ClientClosing"]


class ClientClosing(RequestBodyReader):
    """
    The closing half of the client connection's state machine (see its C{_phase}). The
    slices of the connection are one chain of slotted classes (head, body, closing), since
    Python allows slots in only one line of bases.
    """

    # The state of phases and waiting is kept here; the connection sets it up.
    __slots__ = ("_pause", "_phase", "_timer", "_waiting")

    _phase: str
    _pause: int
    _waiting: TimeoutQueue[TimedConnection] | None
    _timer: Deadline | None

    # The connection's, read here.
    _ctx: ListenerContext
    _queue: list[Exchange]
    _direct: bool
    _peer_str: str
    _served: int
    transport: Any

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def abort(self, by: str = "timeout") -> None:
        raise NotImplementedError

    def _send_out(self, flags: int = 0) -> None:
        raise NotImplementedError

    def _refuse_current(
        self, status: int, detail: str, by: str, line: tuple[bytes, bytes, str]
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
        The client stopped reading our response; it has C{send_timeout} to resume.
        """
        send_queue = self._ctx.send_queue
        if send_queue is not None:
            send_queue.add(self)

    def send_flowing(self) -> None:
        send_queue = self._ctx.send_queue
        if send_queue is not None:
            send_queue.discard(self)

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
            self._refuse_current(408, f"no complete request {phase} in time", "timeout", line)
