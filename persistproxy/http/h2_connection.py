# -*- test-case-name: tests.unit.test_h2 -*-
"""
HTTP/2 on the client hop (RFC 9113): the C{h2} package's sans-IO state machine on a Twisted
protocol, each stream one exchange over a pooled HTTP/1.1 upstream connection
(L{persistproxy.http.h2_stream}).

C{h2} is told neither to validate nor to normalise header fields, in either direction: its
checks are Python loops over every byte of every field, and the proxy goes over each field
anyway, once, when it converts between the hops (L{persistproxy.http.h2_headers}). Its
framing, HPACK, stream states and flow-control accounting are used as they are.

Output is gathered during an I/O event and handed to the transport once at its end, as the
HTTP/1.1 hop does: a response's header block and DATA (and the END_STREAM) usually leave in
one send, often with other streams' frames.

Governance, as for HTTP/1.1 where the notion carries over:

 - C{header_timeout} runs from the connection's start until its first request, and while a
   header block is incomplete (a HEADERS frame whose CONTINUATION frames are still coming);
   C{keepalive_timeout} runs from the moment the last open stream ended; C{body_timeout} per
   stream while its request body is incomplete; C{send_timeout} per stream whose response
   waits on a window the client keeps shut, and for the connection while the transport
   cannot send.
 - A GOAWAY naming the last stream processed ends the connection gracefully: on drain,
   after C{max_requests} streams, at C{max_lifetime}, and when idle. Streams the client
   opened after it are refused (REFUSED_STREAM, safe to retry); those before it complete.
 - Defences against peers that abuse the protocol: client resets are rate-limited (Rapid
   Reset, CVE-2023-44487), so are SETTINGS and PING frames (each of which we must answer); a
   header block is bounded while it is being assembled (CONTINUATION flood, CVE-2024-27316)
   and while it is decoded (HPACK bombs: SETTINGS_MAX_HEADER_LIST_SIZE, enforced from the
   first frame, not after the client acknowledges it); reading stops while our output is
   backlogged, so frames that demand an answer cannot grow a buffer the client does not read.
   Abuse ends the connection with GOAWAY ENHANCE_YOUR_CALM.

@ivar _phase: C{"open"}; C{"closing"} once our GOAWAY is out (streams before it finish);
    C{"lingering"} after our half-close; C{"closed"} once the transport is gone.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from h2.connection import H2Connection as H2Machine
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.http.h2_defences import (
    PREFACE,
    Bucket,
    HeaderBlockBuffer,
    h2_config,
    header_block_probe,
)
from persistproxy.http.h2_stream import MORE, H2Stream
from persistproxy.interfaces import ClientAddresses
from persistproxy.net.fastwrite import can_write_directly, write_directly
from persistproxy.policy import Deadline

if TYPE_CHECKING:
    from persistproxy.http.context import ListenerContext, TimedConnection
    from persistproxy.timers import TimeoutQueue

__all__ = ["CONTROL_FRAMES_PER_SECOND", "PREFACE", "H2Connection"]

_CONNECTION_DONE = Failure(ConnectionError("connection closed"))

#: SETTINGS and PING frames a client may send per second (burst as large): each must be
#: answered, so a flood of them is a flood of work and output.
CONTROL_FRAMES_PER_SECOND = 100

#: The initial stream window (RFC 9113's default): request body bytes a stream may have in
#: flight that its upstream has not taken yet.
_STREAM_WINDOW = 65535
_MAX_WINDOW = 2**31 - 1

#: Whether the fallback of L{header_block_probe} was logged (once per process).
_warned: list[bool] = []

#: Numbers the HTTP/2 connections of the process, for their access lines ("connection").
_SERIALS = itertools.count(1)


@implementer(IHalfCloseableProtocol, IPushProducer)
class H2Connection(Protocol):
    """
    One client's HTTP/2 connection to a listener.
    """

    def __init__(self, ctx: ListenerContext, peer: str, born: float) -> None:
        """
        @param born: when the connection was accepted (the header timeout and
            C{max_lifetime} count from then, not from the first bytes).
        """
        self._ctx = ctx
        self.peer = peer
        self.peer_bytes = peer.encode("latin-1")
        self._born = born
        self._machine: H2Machine | None = None
        self._buffer: HeaderBlockBuffer | None = None
        self._streams: dict[int, H2Stream] = {}
        self._ready: dict[H2Stream, None] = {}
        self._phase = "open"
        self._served = 0
        self._last_stream = 0
        self._goaway = False
        self._eof = False
        self._idle = False
        self._in_event = False
        self._flushing = False
        self._settle = False
        self._scheduled = False
        self._direct = False
        #: The transport's buffer is full: DATA waits, and nothing more is read.
        self.write_paused = False
        self._waiting: TimeoutQueue[TimedConnection] | None = None
        self._timer: Deadline | None = None
        self._resets: Bucket | None = None
        self._controls: Bucket | None = None
        #: Fields added to each access line of this connection (TLS facts, for instance).
        self.log_extra: dict[str, Any] | None = None
        #: Which connection of the process this is: its streams' access lines say so.
        self.serial = next(_SERIALS)
        #: What its streams pick upstream connections for, when the upstream sends a PROXY
        #: protocol header (then lent to this connection's streams only).
        self.upstream_key: ClientAddresses | None = None

    # -- Twisted protocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        ctx = self._ctx
        config = ctx.config
        if ctx.keyed:
            # getPeer() is the client's address as the listener took it (a PROXY header's).
            ends: Any = self.transport
            self.upstream_key = ClientAddresses(ends.getPeer(), ends.getHost())
        streams = ctx.h2_max_concurrent_streams
        # The header list as RFC 9113 counts it: names and values plus 32 bytes per field.
        limit = config.max_head_size + 32 * config.max_header_count
        machine = self._machine = H2Machine(h2_config())
        machine.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: limit,
            },
        )
        # Enforced from now on: h2 would apply the advertised size only once acknowledged.
        machine.decoder.max_header_list_size = limit
        problem = header_block_probe()
        if problem is None:
            self._buffer = machine.incoming_buffer = HeaderBlockBuffer(limit)
        elif not _warned:
            _warned.append(True)
            ctx.log.warning(
                "internals.fallback",
                internal="h2.frame_buffer",
                attribute="h2.frame_buffer.FrameBuffer._update_header_buffer",
                fallback="h2's own CONTINUATION bound; header_timeout not applied mid-block",
                finding=problem,
            )
        machine.initiate_connection()
        # The connection's window: every stream's worth, so streams held back by a slow
        # origin never starve the others (the stream windows bound what is buffered).
        machine.increment_flow_control_window(min(streams * _STREAM_WINDOW, _MAX_WINDOW) - 65535)
        now = ctx.clock.seconds()
        self._resets = Bucket(streams, now)
        self._controls = Bucket(CONTROL_FRAMES_PER_SECOND, now)
        transport = self.transport
        self._direct = can_write_directly(transport)
        transport.registerProducer(self, True)  # type: ignore[union-attr]
        ctx.stats.h2_connections += 1
        # Until the first request, the connection waits as a new HTTP/1.1 one does.
        header_queue = ctx.header_queue
        self._wait(header_queue if header_queue is not None else ctx.idle_queue)
        self._flush()

    def tls_established(self, facts: dict[str, Any]) -> None:
        self.log_extra = facts

    def dataReceived(self, data: bytes) -> None:
        machine = self._machine
        if machine is None or self._phase in ("lingering", "closed"):
            return
        self._ctx.stats.bytes_in += len(data)
        self._in_event = True
        try:
            try:
                events = machine.receive_data(data)
            except ProtocolError as e:
                # h2 has queued a GOAWAY with the error's code.
                self._protocol_error(e)
                return
            for event in events:
                if isinstance(event, DataReceived):
                    stream = self._streams.get(event.stream_id)  # type: ignore[arg-type]
                    if stream is not None:
                        stream.receive_data(event.data or b"", event.flow_controlled_length or 0)
                    else:
                        self.acknowledge(event.flow_controlled_length or 0, event.stream_id or 0)
                elif isinstance(event, RequestReceived):
                    self._request(event)
                elif isinstance(event, StreamEnded):
                    stream = self._streams.get(event.stream_id)  # type: ignore[arg-type]
                    if stream is not None:
                        stream.request_ended()
                elif isinstance(event, WindowUpdated):
                    self._window_updated(event.stream_id or 0)
                elif isinstance(event, StreamReset):
                    self._client_reset(event)
                elif isinstance(event, TrailersReceived):
                    stream = self._streams.get(event.stream_id)  # type: ignore[arg-type]
                    if stream is not None:
                        stream.receive_trailers(list(event.headers or ()))
                elif isinstance(event, (PingReceived, RemoteSettingsChanged)):
                    self._control_frame(event)
                elif isinstance(event, ConnectionTerminated):
                    self._client_goaway(event)
                if self._phase in ("lingering", "closed"):
                    return
        finally:
            self._in_event = False
        self._settle = False
        self._settled()
        self._flush()

    def readConnectionLost(self) -> None:
        """The client sends nothing more: finish the streams that need nothing more from it."""
        if self._phase in ("lingering", "closed"):
            self._close_now()
            return
        self._eof = True
        for stream in list(self._streams.values()):
            if not stream.in_done:
                stream.abort("client", ErrorCodes.CANCEL)
        self._send_goaway(ErrorCodes.NO_ERROR)
        self._flush()

    def writeConnectionLost(self) -> None:
        if self._phase != "closed":
            if self._timer is not None:
                self._timer.cancel()
            if self._eof:
                self._close_now()
            else:
                self._wait(self._ctx.linger_queue)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        if self._phase == "closed":
            return
        self._phase = "closed"
        self._wait(None)
        if self._timer is not None:
            self._timer.stop()
        ctx = self._ctx
        if ctx.send_queue is not None:
            ctx.send_queue.discard(self)
        self._busy()
        streams = list(self._streams.values())
        self._streams.clear()
        self._ready.clear()
        for stream in streams:
            stream.connection_lost("client")
        self._machine = None

    # -- what streams call --------------------------------------------------------------------

    def ready(self, stream: H2Stream) -> None:
        """C{stream} has output for h2: sent at the end of the current event."""
        self._ready[stream] = None
        self._flush_soon()

    def acknowledge(self, size: int, stream_id: int) -> None:
        """Request body bytes were consumed: reopen the windows they used."""
        machine = self._machine
        if machine is not None and size and self._phase != "closed":
            machine.acknowledge_received_data(size, stream_id)
            self._flush_soon()

    def send_reset(self, stream_id: int, code: int) -> None:
        machine = self._machine
        if machine is None or self._phase == "closed":
            return
        try:
            machine.reset_stream(stream_id, code)
        except (StreamClosedError, ProtocolError):
            return  # closed already (h2 forgets streams both sides ended)
        self._flush_soon()

    def window(self, stream_id: int) -> int:
        """What the client's windows let us send on C{stream_id} now."""
        machine = self._machine
        if machine is None:
            return 0
        try:
            return machine.local_flow_control_window(stream_id)
        except (StreamClosedError, ProtocolError):
            return 0

    def stream_closed(self, stream: H2Stream) -> None:
        """The stream is over on both sides (or reset): forget it."""
        if self._streams.pop(stream.stream_id, None) is None:
            return
        self._ready.pop(stream, None)
        held = stream.closing()
        if held:
            self.acknowledge(held, stream.stream_id)
        if not self._streams:
            if self._in_event or self._flushing:
                self._settle = True  # once the event's input, or the output, is handled
            else:
                self._settled()

    def _settled(self) -> None:
        """No stream is open any more: close if closing, else wait as idle."""
        if self._phase == "closing" and not self._streams:
            self._close_transport()
        else:
            self._wait_state()

    def wait_for_body(self, stream: H2Stream) -> None:
        body_queue = self._ctx.body_queue
        if body_queue is not None:
            body_queue.add(stream)

    def body_done(self, stream: H2Stream) -> None:
        body_queue = self._ctx.body_queue
        if body_queue is not None:
            body_queue.discard(stream)

    def now(self) -> float:
        return self._ctx.clock.seconds()

    # -- IPushProducer: the transport stops us while it cannot send --------------------------

    def pauseProducing(self) -> None:
        if self.write_paused or self._phase == "closed":
            return
        self.write_paused = True
        # Nothing more is read either: frames that demand an answer (PING, SETTINGS) would
        # otherwise grow a buffer that the client does not read.
        self.transport.pauseProducing()  # type: ignore[union-attr]
        send_queue = self._ctx.send_queue
        if send_queue is not None:
            send_queue.add(self)

    def resumeProducing(self) -> None:
        if not self.write_paused or self._phase == "closed":
            return
        self.write_paused = False
        send_queue = self._ctx.send_queue
        if send_queue is not None:
            send_queue.discard(self)
        self.transport.resumeProducing()  # type: ignore[union-attr]
        self._wake_stalled(0)

    def stopProducing(self) -> None:
        """The transport is going; connectionLost follows."""

    # -- TimedConnection, DrainAware and the listener's limits -------------------------------

    def timed_out(self) -> None:
        """The timeout of the current wait expired (header, keep-alive, linger, closing)."""
        self._waiting = None
        ctx = self._ctx
        phase = self._phase
        if phase == "lingering":
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if phase == "closing":
            # Our GOAWAY waited behind data the client does not read.
            self._abort_all("timeout")
            return
        if self._buffer is not None and self._buffer.in_header_block:
            ctx.stats.timeouts += 1
            ctx.log.info("client.timeout", listener=ctx.name, client=self.peer, phase="head")
            self._abort_all("timeout", graceful=True)
            return
        if self._streams:
            return
        ctx.log.debug("client.idle_timeout", listener=ctx.name, client=self.peer)
        self._send_goaway(ErrorCodes.NO_ERROR)
        self._flush()

    def send_rate_due(self) -> None:
        """
        C{min_send_rate} is judged for HTTP/1.x connections only; an HTTP/2 connection is
        never put in that queue (C{send_timeout} bounds a peer that stops reading).
        """

    def send_timed_out(self) -> None:
        """The transport could not send for C{send_timeout}: the client stopped reading."""
        ctx = self._ctx
        ctx.stats.timeouts += 1
        ctx.log.info(
            "client.send_timeout",
            listener=ctx.name,
            client=self.peer,
            timeout=ctx.config.send_timeout,
        )
        self._abort_all("timeout")

    def close_if_idle(self) -> bool:
        """The proxy drains: GOAWAY now; the streams begun finish first."""
        self._send_goaway(ErrorCodes.NO_ERROR)
        self._flush()
        return not self._streams

    def drain_cut(self) -> None:
        self._abort_all("drain")

    def reap_idle(self) -> None:
        """The listener reaps this connection: its client parks too many idle ones."""
        if not self._streams and self._phase == "open":
            self._send_goaway(ErrorCodes.NO_ERROR)
            self._flush()

    # -- events -------------------------------------------------------------------------------

    def _request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        if self._goaway:
            self.send_reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        ctx = self._ctx
        stream = H2Stream(self, ctx, sid)
        self._streams[sid] = stream
        self._last_stream = sid
        self._served += 1
        ctx.stats.requests_total += 1
        ctx.stats.h2_requests += 1
        self._busy()
        stream.start(event.headers, event.stream_ended is not None)
        keepalive = ctx.keepalive
        lifetime = ctx.config.max_lifetime
        if (
            (keepalive.max_requests and self._served >= keepalive.max_requests)
            or (lifetime and ctx.clock.seconds() - self._born >= lifetime)
            or ctx.is_draining()
        ):
            self._send_goaway(ErrorCodes.NO_ERROR)

    def _client_reset(self, event: StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.reset_by_client()
        resets = self._resets
        if resets is not None and not resets.take(self._ctx.clock.seconds()):
            self._calm("stream resets", self._ctx.h2_max_concurrent_streams)

    def _control_frame(self, event: Any) -> None:
        controls = self._controls
        if controls is not None and not controls.take(self._ctx.clock.seconds()):
            self._calm("SETTINGS and PING frames", CONTROL_FRAMES_PER_SECOND)
            return
        if type(event) is RemoteSettingsChanged and (
            SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings
        ):
            self._wake_stalled(0)

    def _window_updated(self, stream_id: int) -> None:
        self._wake_stalled(stream_id)

    def _wake_stalled(self, stream_id: int) -> None:
        """Windows opened (C{0}: the connection's, or the transport drained)."""
        if stream_id:
            stream = self._streams.get(stream_id)
            if stream is not None and stream.backlogged():
                self.ready(stream)
            return
        for stream in self._streams.values():
            if stream.backlogged():
                self._ready[stream] = None
        self._flush_soon()

    def _client_goaway(self, event: ConnectionTerminated) -> None:
        """
        The client's GOAWAY: it opens no more streams, and h2 will send nothing more for
        the open ones. They end here, and so does the connection.
        """
        if event.error_code:
            ctx = self._ctx
            ctx.log.info(
                "h2.client_goaway",
                listener=ctx.name,
                client=self.peer,
                code=str(event.error_code),
            )
        self._goaway = True
        self._abort_all("client", graceful=True)

    def _protocol_error(self, error: ProtocolError) -> None:
        ctx = self._ctx
        ctx.stats.bad_requests += 1
        ctx.log.warning(
            "h2.protocol_error",
            listener=ctx.name,
            client=self.peer,
            reason=str(error) or type(error).__name__,
        )
        self._goaway = True
        self._abort_all("bad_request", graceful=True)

    def _calm(self, what: str, limit: int) -> None:
        """A peer abusing the protocol: GOAWAY ENHANCE_YOUR_CALM, and the connection ends."""
        ctx = self._ctx
        ctx.stats.bad_requests += 1
        ctx.log.warning(
            "h2.flood",
            listener=ctx.name,
            client=self.peer,
            frames=what,
            limit_per_second=limit,
        )
        machine = self._machine
        if machine is not None and not self._goaway:
            self._goaway = True
            # What h2 queued while reading the flood (its answers) is not sent.
            machine.clear_outbound_data_buffer()
            machine.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=self._last_stream)
        self._abort_all("client", graceful=True)

    # -- waiting and closing ------------------------------------------------------------------

    def _wait_state(self) -> None:
        """After input: wait on what the connection now waits for (see the module docstring)."""
        if self._phase != "open":
            return
        ctx = self._ctx
        buffer = self._buffer
        if buffer is not None and buffer.in_header_block:
            header_queue = ctx.header_queue
            if header_queue is not None and self._waiting is not header_queue:
                self._wait(header_queue)
            return
        if self._streams:
            if self._waiting is not None:
                self._wait(None)
            return
        if not self._served:
            return  # still in its first wait, which began when it connected
        if not self._idle:
            self._go_idle()

    def _go_idle(self) -> None:
        """The last open stream ended: C{keepalive_timeout} counts from now."""
        ctx = self._ctx
        config = ctx.config
        if ctx.is_draining():
            self._send_goaway(ErrorCodes.NO_ERROR)
            return
        timeout = config.keepalive_timeout
        if config.max_lifetime:
            left = self._born + config.max_lifetime - ctx.clock.seconds()
            if left <= 0:
                self._send_goaway(ErrorCodes.NO_ERROR)
                return
            timeout = min(timeout, left) if timeout else 0
        if not timeout:
            self._send_goaway(ErrorCodes.NO_ERROR)
            return
        self._idle = True
        if timeout == config.keepalive_timeout:
            self._wait(ctx.idle_queue)
        else:
            self._wait(None)
            self._deadline(timeout)
        limits = ctx.limits
        if limits is not None and limits.idle_per_client:
            limits.went_idle(self.peer, self)

    def _busy(self) -> None:
        if self._idle:
            self._idle = False
            if self._timer is not None:
                self._timer.cancel()
            limits = self._ctx.limits
            if limits is not None and limits.idle_per_client:
                limits.went_busy(self.peer, self)

    def _send_goaway(self, code: int) -> None:
        """
        GOAWAY naming the last stream processed; the streams begun finish, then the
        connection closes. Written past h2, whose state machine would refuse to send
        anything after a GOAWAY of its own.
        """
        machine = self._machine
        if machine is None or self._phase != "open":
            return
        self._phase = "closing"
        if not self._goaway:
            self._goaway = True
            frame = GoAwayFrame(0, last_stream_id=self._last_stream, error_code=code)
            pending = machine.data_to_send()
            self._write(pending + frame.serialize())
        if not self._streams:
            self._close_transport()
        else:
            self._wait(None)

    def _abort_all(self, by: str, graceful: bool = False) -> None:
        """
        End every stream (C{by} on their access lines) and the connection: with what is
        queued sent first (C{graceful}: a GOAWAY), or cut.
        """
        streams = list(self._streams.values())
        self._streams.clear()
        self._ready.clear()
        for stream in streams:
            stream.connection_lost(by)
        if graceful and self._machine is not None:
            self._phase = "closing"
            if not self._goaway:
                self._goaway = True
                frame = GoAwayFrame(0, last_stream_id=self._last_stream, error_code=0)
                self._write(self._machine.data_to_send() + frame.serialize())
            else:
                pending = self._machine.data_to_send()
                if pending:
                    self._write(pending)
            self._close_transport()
            return
        self._phase = "closed"
        transport = self.transport
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def _close_transport(self) -> None:
        """
        Half-close after what is queued, then drain the client's input for a moment (as the
        HTTP/1.1 hop does), so the client reads our last frames instead of a reset.
        """
        if self._phase in ("lingering", "closed"):
            return
        self._phase = "lingering"
        self._wait(None)
        ctx = self._ctx
        transport = self.transport
        if transport is None:
            return
        self._flush(final=True)
        if self.write_paused:
            self.write_paused = False
            if ctx.send_queue is not None:
                ctx.send_queue.discard(self)
            transport.resumeProducing()  # type: ignore[attr-defined]
        transport.unregisterProducer()  # type: ignore[attr-defined]
        lose_write = getattr(transport, "loseWriteConnection", None)
        self._deadline(ctx.config.send_timeout or 60)
        if lose_write is None:
            transport.loseConnection()
        else:
            lose_write()

    def _close_now(self) -> None:
        self._wait(None)
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.loseConnection()

    def _wait(self, queue: TimeoutQueue[TimedConnection] | None) -> None:
        waiting = self._waiting
        if waiting is not None and waiting is not queue:
            waiting.discard(self)
        self._waiting = queue
        if queue is not None:
            queue.add(self)

    def _deadline(self, seconds: float) -> None:
        if self._timer is None:
            self._timer = Deadline(self._ctx.clock, self.timed_out)
        self._timer.arm(seconds)

    # -- output -------------------------------------------------------------------------------

    def _flush_soon(self) -> None:
        if not self._in_event and not self._scheduled:
            self._scheduled = True
            self._ctx.after_event(self._flush)

    def _flush(self, final: bool = False) -> None:
        """Hand the ready streams' output to h2 (fairly), and h2's bytes to the transport."""
        self._scheduled = False
        machine = self._machine
        if machine is None or self._phase == "closed" or (
            self._phase == "lingering" and not final
        ):
            return
        ready = self._ready
        data_ok = not self.write_paused
        self._flushing = True
        try:
            while ready:
                again = False
                for stream in list(ready):
                    if stream.emit(machine, data_ok) == MORE:
                        again = True
                    else:
                        ready.pop(stream, None)
                if not again:
                    break
        finally:
            self._flushing = False
        out = machine.data_to_send()
        if out:
            self._write(out)
        if self._settle and not final:
            self._settle = False
            self._settled()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or not data:
            return
        if self._direct:
            write_directly(transport, data)
        else:
            transport.write(data)

