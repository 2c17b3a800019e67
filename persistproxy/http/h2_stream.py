# -*- test-case-name: tests.unit.test_h2 -*-
"""
One HTTP/2 stream: one request and its response, carried upstream as one exchange over a
pooled HTTP/1.1 connection, exactly as an HTTP/1.x request is.

The stream is the client side of its L{H2Exchange} (an
L{persistproxy.http.exchange.ExchangeOwner}): the exchange borrows, retries, times out and
fails upstream as it does for HTTP/1.1; only the response's form differs (a header block and
DATA frames instead of a status line and chunks), which is what L{H2Exchange} overrides.

Flow control ties each stream to the other hop, and to nothing else:

 - Response: what the origin sends waits in the stream until the client's window for the
   stream (and the connection's) lets it out. A stream that holds data it cannot send pauses
   its exchange, which pauses that upstream connection's reading: a client that does not
   read one stream stalls that stream's origin, never the connection's other streams or the
   pool. The stream is its exchange's consumer (C{transport.registerProducer}), as the TCP
   transport is an HTTP/1.1 exchange's.
 - Request: body data is acknowledged (the client's window reopened) only once it went into
   the upstream connection. While the upstream transport cannot take more it pauses the
   stream (the stream is the upstream transport's producer, as an HTTP/1.1 client
   connection is), and the client can send no more than the stream's window meanwhile.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from persistproxy.http.errors import error_body
from persistproxy.http.exchange import Exchange
from persistproxy.http.h2_exchange import H2Exchange
from persistproxy.http.h2_headers import (
    Malformed,
    request_head,
    trailer_fields,
)
from persistproxy.http.request_head import BadRequest
from persistproxy.interfaces import ClientAddresses

if TYPE_CHECKING:
    from h2.connection import H2Connection as H2Machine

    from persistproxy.http.context import ListenerContext
    from persistproxy.http.h2_connection import H2Connection
    from persistproxy.http.headers import Header
    from persistproxy.http.upstream_connection import UpstreamConnection

__all__ = ["H2Exchange", "H2Stream"]

#: Response bytes one stream sends in a row before the others get their turn.
QUANTUM = 64 * 1024

# What a stream's emit() left (L{H2Stream.emit}).
EMPTY = 0  # nothing waits
STALLED = 1  # data waits for the client's window (or the transport)
MORE = 2  # data waits and could go now: its quantum was used up

_ERROR_TYPE = (b"content-type", b"text/plain; charset=utf-8")
_NO_STORE = (b"cache-control", b"no-store")


@implementer(IPushProducer)
class H2Stream:
    """
    One stream of an L{H2Connection}.

    @ivar exchange: the request's exchange, once its head was accepted; L{None} for a
        stream refused before (or answered by the proxy itself).
    @ivar request_trailers: the client's trailer fields as HTTP/1.1 lines, for the
        upstream's last chunk.
    """

    __slots__ = (
        "_accounted",
        "_body_size",
        "_conn",
        "_ctx",
        "_data",
        "_data_bytes",
        "_ended",
        "_head",
        "_held",
        "_in_done",
        "_interim",
        "_out_done",
        "_paused",
        "_producer",
        "_producer_paused",
        "_reset",
        "_stalled",
        "_trailers",
        "exchange",
        "request_trailers",
        "stream_id",
    )

    def __init__(self, conn: H2Connection, ctx: ListenerContext, stream_id: int) -> None:
        self._conn = conn
        self._ctx = ctx
        self.stream_id = stream_id
        self.exchange: H2Exchange | None = None
        self.request_trailers = b""
        #: Response parts not yet handed to h2: interim blocks, the head, data, trailers.
        self._interim: list[list[Header]] | None = None
        self._head: list[Header] | None = None
        self._data: deque[bytes] = deque()
        self._data_bytes = 0
        self._trailers: list[Header] | None = None
        #: The response is complete on our side (all of it queued) / its END_STREAM is out.
        self._out_done = False
        self._ended = False
        #: The request is complete (END_STREAM received).
        self._in_done = False
        #: The stream was reset (by either side): nothing more is sent or read.
        self._reset = False
        #: Request body bytes received but not yet acknowledged (the upstream had no room).
        self._held = 0
        self._paused = False  # the upstream transport cannot take more of the body
        self._body_size = 0
        #: The exchange relaying into us while the client reads slower than the origin sends.
        self._producer: Any = None
        self._producer_paused = False
        self._stalled = False
        self._accounted = False

    @property
    def in_done(self) -> bool:
        """Whether the client sent all of the request (END_STREAM)."""
        return self._in_done

    # -- the request, as the connection hands it over --------------------------------------

    def start(self, fields: list[Header], ended: bool) -> None:
        """The request's header block arrived (C{ended}: with END_STREAM)."""
        conn = self._conn
        ctx = self._ctx
        self._in_done = ended
        try:
            method, target, head, has_body, chunked = request_head(
                fields, ctx, conn.peer_bytes, ended
            )
        except Malformed as e:
            self._rejected(400, str(e))
            self.reset(ErrorCodes.PROTOCOL_ERROR)
            return
        except BadRequest as e:
            self._rejected(e.status, str(e))
            self._respond_self(e.status, str(e), _target(fields))
            return
        exchange = self.exchange = H2Exchange(self, ctx, method, target, head, has_body, chunked)
        if has_body and not ended:
            conn.wait_for_body(self)
        exchange.start()

    def receive_data(self, data: bytes, flow_length: int) -> None:
        """DATA for this stream; acknowledged once it went upstream (see the module docstring)."""
        exchange = self.exchange
        if exchange is None or self._reset or exchange.body_done or self._out_done:
            # Nobody will read it (refused, answered, or a body past its Content-Length,
            # which h2 refuses itself): give the window back at once.
            self._conn.acknowledge(flow_length, self.stream_id)
            return
        limit = self._ctx.config.max_body_size
        if limit:
            self._body_size += len(data)
            if self._body_size > limit:
                self._refuse_body(413, "request body too large")
                self._conn.acknowledge(flow_length, self.stream_id)
                return
        self._conn.wait_for_body(self)
        buffered = exchange.request_body(data) if data else 0
        if buffered or self._paused:
            self._held += flow_length
        else:
            self._conn.acknowledge(flow_length, self.stream_id)

    def receive_trailers(self, fields: list[Header]) -> None:
        try:
            self.request_trailers = trailer_fields(fields)
        except Malformed as e:
            self._rejected(400, str(e))
            self.abort("bad_request", ErrorCodes.PROTOCOL_ERROR)

    def request_ended(self) -> None:
        """END_STREAM from the client: the request is complete."""
        if self._in_done:
            return
        self._in_done = True
        self._conn.body_done(self)
        exchange = self.exchange
        if exchange is not None and not exchange.body_done and not self._reset:
            exchange.request_complete()
        if self._ended:
            self._conn.stream_closed(self)

    def reset_by_client(self) -> None:
        """RST_STREAM from the client: it wants no more of this stream."""
        self._reset = True
        self._end_exchange("client")
        self._conn.stream_closed(self)

    def connection_lost(self, by: str) -> None:
        """The connection is gone or cut (C{by} says why, for the access line)."""
        self._reset = True
        self._end_exchange(by)
        self._forget_timers()

    # -- the response, queued here and sent by emit() ----------------------------------------

    def send_interim(self, block: list[Header]) -> None:
        if self._head is None and not self._reset:
            if self._interim is None:
                self._interim = []
            self._interim.append(block)
            self._conn.ready(self)

    def send_head(self, block: list[Header]) -> None:
        if not self._reset:
            self._head = block
            self._conn.ready(self)

    def send_data(self, data: bytes) -> None:
        if data and not self._reset:
            self._data.append(data)
            self._data_bytes += len(data)
            self._conn.ready(self)

    def send_trailers(self, block: list[Header]) -> None:
        if block and not self._reset:
            self._trailers = block

    def send_error(self, status: int, detail: str) -> int:
        """Queue a complete response the proxy writes itself; returns its size."""
        body = error_body(status, detail)
        block = [(b":status", b"%d" % status), _ERROR_TYPE, _NO_STORE]
        block.append((b"content-length", b"%d" % len(body)))
        if status == 503:
            block.append((b"retry-after", b"1"))
        self.send_head(block)
        self.send_data(body)
        return len(body) + sum(len(n) + len(v) + 4 for n, v in block)

    def emit(self, machine: H2Machine, data_ok: bool) -> int:
        """
        Hand what waits to h2: header blocks always; data as far as the flow-control
        windows allow, and no more than L{QUANTUM} bytes in a row, unless C{data_ok} is false
        (the transport is backlogged); END_STREAM (or the trailers) once everything is out.

        @return: L{EMPTY}, L{STALLED} or L{MORE}.
        """
        if self._reset:
            return EMPTY
        sid = self.stream_id
        if self._interim is not None:
            for block in self._interim:
                machine.send_headers(sid, block)
            self._interim = None
        data = self._data
        head = self._head
        if head is not None:
            self._head = None
            end = self._out_done and not data and self._trailers is None
            machine.send_headers(sid, head, end_stream=end)
            if end:
                return self._sent_end()
        if data:
            if not data_ok:
                return self._stall()
            sent = 0
            frame_size = machine.max_outbound_frame_size
            while data:
                window = machine.local_flow_control_window(sid)
                if window <= 0:
                    return self._stall()
                if sent >= QUANTUM:
                    return MORE
                chunk = data[0]
                size = min(window, frame_size)
                if len(chunk) > size:
                    data[0] = chunk[size:]
                    chunk = chunk[:size]
                else:
                    data.popleft()
                sent += len(chunk)
                self._data_bytes -= len(chunk)
                last = not data and self._out_done and self._trailers is None
                machine.send_data(sid, chunk, end_stream=last)
                if last:
                    return self._sent_end()
            self._flowing()
        if self._out_done and not self._ended:
            if self._trailers is not None:
                machine.send_headers(sid, self._trailers, end_stream=True)
            else:
                machine.end_stream(sid)
            return self._sent_end()
        return EMPTY

    def backlogged(self) -> bool:
        """
        Whether response data waits that the client's windows (or the transport) will not
        take now: then the exchange needs flow control (see L{registerProducer}).
        """
        if self._stalled:
            return True
        if not self._data_bytes:
            return False
        return self._conn.write_paused or self._data_bytes > self._conn.window(self.stream_id)

    # -- ExchangeOwner ----------------------------------------------------------------------

    @property
    def upstream_key(self) -> ClientAddresses | None:
        """Its connection's: the streams of one client connection share its connections."""
        return self._conn.upstream_key

    @property
    def transport(self) -> H2Stream:
        """The exchange's consumer is the stream itself (see the module docstring)."""
        return self

    @property
    def peer(self) -> str:
        """The client's address (its connection's)."""
        return self._conn.peer

    def write(self, data: bytes) -> None:
        raise NotImplementedError("an HTTP/2 stream takes structured responses only")

    def abort(self, by: str = "timeout", code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        """
        The response cannot be completed (the origin cut it, a timeout): the stream is
        reset, which is all HTTP/2 has to say it (C{by} goes on the access line).
        """
        self._end_exchange(by)
        self.reset(code)

    def may_keep_alive(self, client_wants: bool, ordinal: int) -> bool:
        return True

    def request_body_drained(self) -> None:
        """What the exchange buffered before its connection was ready went upstream."""
        if not self._paused:
            self._release_held()

    def resume_from_upstream(self) -> None:
        self.resumeProducing()

    def exchange_finished(self, exchange: Exchange) -> None:
        """The response is complete upstream: account for it and end the stream's output."""
        self._account(exchange.status, None)
        self._out_done = True
        self._conn.ready(self)

    def send_stalled(self) -> None:
        """The stream keeps its own send timer (see L{emit}); nothing to do here."""

    def send_flowing(self) -> None:
        """See L{send_stalled}."""

    def exchange_upgraded(self, exchange: Exchange, connection: UpstreamConnection) -> None:
        """Never called: an HTTP/2 request cannot ask for an Upgrade (RFC 9113 8.2.2)."""
        raise RuntimeError("a protocol switch on an HTTP/2 stream")

    # -- the consumer of the exchange's response (its transport, for flow control) ----------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        self._producer_paused = False
        if self._stalled:
            self._producer_paused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False

    # -- IPushProducer: the upstream transport holds the request body back -----------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._conn.body_done(self)  # waiting on the origin is not the client's delay

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            if not self._in_done and not self._reset:
                self._conn.wait_for_body(self)
        self._release_held()

    def stopProducing(self) -> None:
        """The upstream went away; the exchange reports that."""

    # -- TimedConnection: the listener's body and send timeout queues ------------------------

    def timed_out(self) -> None:
        """No request body data for C{body_timeout}."""
        if self._reset or self._in_done:
            return
        ctx = self._ctx
        ctx.stats.timeouts += 1
        ctx.log.info(
            "client.timeout",
            listener=ctx.name,
            client=self._conn.peer,
            phase="body",
            stream=self.stream_id,
        )
        self._refuse_body(408, "no complete request body in time", by="timeout")

    def send_rate_due(self) -> None:
        """
        C{min_send_rate} is judged per HTTP/1.x connection only: a stream is never put in
        that queue (its client's slowness is bounded by C{send_timeout} per stream and by the
        connection's flow-control window). Here for the queues' common protocol.
        """

    def send_timed_out(self) -> None:
        """The client left this stream's window shut for C{send_timeout}."""
        if self._reset:
            return
        ctx = self._ctx
        ctx.stats.timeouts += 1
        ctx.log.info(
            "client.send_timeout",
            listener=ctx.name,
            client=self._conn.peer,
            timeout=ctx.config.send_timeout,
            stream=self.stream_id,
        )
        self.abort("timeout", ErrorCodes.CANCEL)

    # -- internals ----------------------------------------------------------------------------

    def reset(self, code: int) -> None:
        """Reset the stream (RST_STREAM) and forget it."""
        if not self._reset:
            self._reset = True
            self._conn.send_reset(self.stream_id, code)
        self._conn.stream_closed(self)

    def closing(self) -> int:
        """
        The connection forgets the stream: stop its timers and return the request bytes
        received but never acknowledged (the connection's window needs them back).
        """
        self._forget_timers()
        held, self._held = self._held, 0
        self._data.clear()
        return held

    def _forget_timers(self) -> None:
        self._conn.body_done(self)
        if self._stalled:
            self._stalled = False
            send_queue = self._ctx.send_queue
            if send_queue is not None:
                send_queue.discard(self)

    def _sent_end(self) -> int:
        """Our END_STREAM is out: the stream is done unless the request still comes."""
        self._ended = True
        self._flowing()
        if self._in_done:
            self._conn.stream_closed(self)
        else:
            # The response is complete before the request (an early answer): tell the client
            # to stop sending it (RFC 9113 8.1).
            self.reset(ErrorCodes.NO_ERROR)
        return EMPTY

    def _stall(self) -> int:
        """Data waits on the windows: pause the origin, and (re)start the send timer."""
        send_queue = self._ctx.send_queue
        if send_queue is not None and (not self._stalled or self._data_bytes):
            send_queue.add(self)
        self._stalled = True
        producer = self._producer
        if producer is not None and not self._producer_paused:
            self._producer_paused = True
            producer.pauseProducing()
        return STALLED

    def _flowing(self) -> None:
        if self._stalled:
            self._stalled = False
            send_queue = self._ctx.send_queue
            if send_queue is not None:
                send_queue.discard(self)
        producer = self._producer
        if producer is not None and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()

    def _release_held(self) -> None:
        held = self._held
        if held:
            self._held = 0
            self._conn.acknowledge(held, self.stream_id)

    def _refuse_body(self, status: int, detail: str, by: str = "bad_request") -> None:
        """
        Give up a request whose body is refused (too large, too slow): its upstream
        connection is dropped, and it is answered C{status} if no response began, else reset.
        """
        exchange = self.exchange
        if exchange is not None and exchange.response_started:
            self.abort(by, ErrorCodes.CANCEL)
            return
        if exchange is not None:
            exchange.cancel()
        target = exchange.target if exchange is not None else b"-"
        self._respond_self(status, detail, target, by)

    def _respond_self(
        self, status: int, detail: str, target: bytes, aborted: str | None = None
    ) -> None:
        """
        Answer with the proxy's own response (no exchange reached the origin, or it was
        dropped: C{aborted} says why); the stream ends once it is out.
        """
        size = self.send_error(status, detail)
        exchange = self.exchange
        method = exchange.method if exchange is not None else b"-"
        self._account(status, aborted, method, target, size)
        self._out_done = True
        self._conn.ready(self)

    def _end_exchange(self, by: str) -> None:
        """The exchange ends without a complete response (C{by}): its access line says so."""
        exchange = self.exchange
        if exchange is None or self._accounted:
            return
        self._account(exchange.status if exchange.response_started else 499, by)
        exchange.cancel()

    def _rejected(self, status: int, reason: str) -> None:
        ctx = self._ctx
        ctx.stats.bad_requests += 1
        ctx.log.warning(
            "request.rejected",
            listener=ctx.name,
            client=self._conn.peer,
            status=status,
            reason=reason,
            stream=self.stream_id,
        )

    def _account(
        self,
        status: int,
        aborted: str | None,
        method: bytes | None = None,
        target: bytes | None = None,
        size: int | None = None,
    ) -> None:
        """The stream's count in the metrics and its access line (once)."""
        if self._accounted:
            return
        self._accounted = True
        ctx = self._ctx
        stats = ctx.stats
        stats.count_response(status)
        if aborted is not None:
            stats.aborted[aborted] = stats.aborted.get(aborted, 0) + 1
        exchange = self.exchange
        server = None
        if exchange is not None:
            method = method or exchange.method
            target = target or exchange.target
            started = exchange.started
            size = exchange.bytes_out if size is None else size
            server = exchange.server
        else:
            started = self._conn.now()
        duration = ctx.clock.seconds() - started
        stats.durations.observe(duration)
        stats.bytes_out += size or 0
        if server is not None and exchange is not None:
            upstream = stats.upstream(ctx.config.upstream, server)
            upstream.requests += 1
            if exchange.reused:
                upstream.reused += 1
            upstream.durations.observe(duration)
        access_log = ctx.access_log
        if access_log is None:
            return
        extra: dict[str, Any] = {"connection": self._conn.serial, "stream": self.stream_id}
        if self._conn.log_extra:
            extra = {**self._conn.log_extra, **extra}
        if aborted is not None:
            extra["aborted"] = aborted
        access_log.log(
            ctx.name,
            self._conn.peer,
            (method or b"-").decode("latin-1"),
            ctx.log_path(target or b"-"),
            "2",
            status,
            size or 0,
            duration * 1000,
            server,
            exchange.reused if exchange is not None else False,
            exchange.retries + exchange.stale if exchange is not None else 0,
            extra,
        )


def _target(fields: list[Header]) -> bytes:
    """The :path of a refused request, for its access line."""
    for name, value in fields:
        if name == b":path":
            return value
        if name[:1] != b":":
            break
    return b"-"
