# -*- test-case-name: tests.unit.test_client_connection, tests.unit.test_upgrade -*-
"""
The client's hop: one accepted connection, parsed with llhttp (httptools), answered in order.

Requests are parsed as they arrive. The first one in the pipeline is forwarded at once; the
ones pipelined behind it wait, with their bodies, in a bounded buffer (reading pauses past
it) until the responses before them are complete. The connection stays open between
requests for the listener's keep-alive timeout and closes gracefully: half-close, then
drain the client's input for a moment, so a response already sent is not destroyed by a
reset. What a request head may say, and the head the upstream gets instead, is
L{persistproxy.http.request_head}'s part; how its body is read, L{persistproxy.http.request_body}'s;
how it waits and closes, L{persistproxy.http.client_closing}'s.

@ivar _phase: C{"idle"} between requests (keep-alive timer), C{"head"} while a request head
    is incomplete (header timer), C{"body"} while a request body is incomplete (body timer),
    C{"busy"} while only responses are outstanding, C{"upgrading"} while an Upgrade request
    (the last one read) waits for its answer (what follows it is held, unparsed, and reading
    paused: it may be the new protocol's), C{"tunnel"} once the origin switched protocols
    (a L{Relay} carries the bytes both ways; nothing is parsed or timed here any more),
    C{"closing"} once no further request will be read, C{"lingering"} after our
    half-close, C{"closed"} once the transport is gone.
"""

from __future__ import annotations

from typing import Any

import httptools
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.http.client_closing import ClientClosing
from persistproxy.http.context import ListenerContext, TimedConnection
from persistproxy.http.errors import error_response
from persistproxy.http.exchange import Exchange
from persistproxy.http.request_body import (
    PAUSE_BACKLOG,
    PAUSE_CLOSING,
    PAUSE_UPGRADE,
    PAUSE_UPSTREAM,
    BodyTooSlow,
)
from persistproxy.http.request_head import (
    OTHER_VERSION,
    BadRequest,
    RequestLine,
    unknown_method_line,
)
from persistproxy.http.upstream_connection import UpstreamConnection
from persistproxy.interfaces import ClientAddresses
from persistproxy.net.fastwrite import (
    backlogged,
    can_write_directly,
    write_directly,
)
from persistproxy.policy import Deadline
from persistproxy.relay import DRAIN, IDLE_TIMEOUT, Relay, RelaySide
from persistproxy.timers import TimeoutQueue

_CONNECTION_DONE = Failure(ConnectionError("connection closed"))

__all__ = ["ClientConnection"]

#: Phases in which a request is being read, and an unfinished line must be bounded.
_READING = frozenset(("head", "body", "busy"))



@implementer(IHalfCloseableProtocol, IPushProducer)
class ClientConnection(ClientClosing, Protocol):
    """
    One client's persistent HTTP/1.x connection to a listener.
    """

    # Slots: with this many attributes an instance dict stops sharing its keys and costs
    # ~0.8 KiB more per connection (measured with 10,000 idle connections).
    __slots__ = (
        "_born",
        "_ctx",
        "_current",
        "_direct",
        "_eof",
        "_feeding",
        "_held",
        "_in_message",
        "_key",
        "_out",
        "_parser",
        "_peer",
        "_peer_str",
        "_queue",
        "_quiet",
        "_served",
        "_tunnel",
        "_tunnel_exchange",
        "log_extra",
    )

    def __init__(self, ctx: ListenerContext, peer: Any = None) -> None:
        """
        @param peer: the client's address as the listener accepted it, if known (saves
            building it again from the transport).
        """
        self._ctx = ctx
        # Made when a request starts and dropped while idle: an idle keep-alive connection
        # should cost little memory, and a parser costs ~0.9 KiB but only ~0.2 us to make.
        self._parser: httptools.HttpRequestParser | None = None
        self._in_message = False
        self._feeding = False
        # Exchanges in pipeline order; [0] is the one being answered. A list, not a deque:
        # it is almost always of length 0 or 1, and an empty deque costs ~0.6 KiB.
        self._queue: list[Exchange] = []
        self._current: Exchange | None = None
        self._served = 0
        self._phase = "idle"
        self._pause = 0
        # The timeout queue this connection waits in (header, body or keep-alive), if any;
        # a connection-owned deadline only for the rare timers (lingering, lifetime).
        self._waiting: TimeoutQueue[TimedConnection] | None = None
        self._timer: Deadline | None = None
        self._send_meter = None
        self._peer = b""
        self._peer_str = getattr(peer, "host", None) or ""
        self._valid_host = None
        self._quiet = 0
        self._direct = False
        #: The client half-closed (its FIN, or its close_notify over TLS).
        self._eof = False
        #: Response bytes written during the current I/O event, sent in one go when it ends.
        self._out: list[bytes] | None = None
        #: Fields added to each access line of this connection (TLS facts, for instance).
        self.log_extra: dict[str, Any] | None = None
        #: What its exchanges pick upstream connections for, when the upstream sends a PROXY
        #: protocol header (then lent to this connection only).
        self._key: ClientAddresses | None = None
        self._born = 0.0
        #: What the client sent after an Upgrade request, held until the answer.
        self._held: list[bytes] | None = None
        #: The relay once the origin switched protocols, and its 101 exchange until its
        #: access line is written.
        self._tunnel: Relay | None = None
        self._tunnel_exchange: Exchange | None = None
        self._reset_head()

    # -- Twisted protocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        # TCP_NODELAY and TCP keep-alive come from the listening socket (sockopts.py).
        transport = self.transport
        self._direct = can_write_directly(transport)
        if not self._peer_str:
            peer = transport.getPeer()  # type: ignore[union-attr]
            self._peer_str = getattr(peer, "host", None) or "unix"  # a UNIX socket has no host
        self._peer = self._peer_str.encode("latin-1")
        ctx = self._ctx
        if ctx.keyed:
            # getPeer() is the client's address as the listener took it (a PROXY header's).
            ends: Any = transport
            self._key = ClientAddresses(ends.getPeer(), ends.getHost())
        self._born = ctx.clock.seconds()
        # A new connection must start its first request as promptly as a head must complete.
        self._wait(ctx.header_queue if ctx.header_queue is not None else ctx.idle_queue)

    def tls_established(self, facts: dict[str, Any]) -> None:
        """The TLS handshake's facts go on each access line of this connection."""
        self.log_extra = facts

    def dataReceived(self, data: bytes) -> None:
        self._ctx.stats.bytes_in += len(data)
        phase = self._phase
        if phase == "closing":
            # Nothing read now will be answered: stop reading until the last response is out.
            self._pause_reading(PAUSE_CLOSING)
            return
        if phase == "lingering" or phase == "closed":
            return
        if phase == "tunnel":
            assert self._tunnel is not None
            self._tunnel.client.received(data)
            return
        if phase == "upgrading":
            # Reading is paused; a TLS transport may still hand over the rest of a read.
            assert self._held is not None
            self._held.append(data)
            return
        if phase == "idle":
            self._phase = "head"
            header_queue = self._ctx.header_queue
            if self._waiting is not header_queue:
                # A kept-alive connection's head starts now; a new connection's head started
                # when it connected, and its first bytes do not buy it more time.
                self._wait(header_queue)
            if self._timer is not None:
                self._timer.cancel()  # the end-of-lifetime timer of the idle phase
            limits = self._ctx.limits
            if limits is not None and limits.idle_per_client:
                limits.went_busy(self._peer_str, self)
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        self._feeding = True
        try:
            self._feed(parser, data)
        finally:
            self._feeding = False
        if self._phase == "idle" and not self._in_message:
            self._parser = None

    def _feed(self, parser: httptools.HttpRequestParser, data: bytes) -> None:
        at_boundary = not self._in_message
        try:
            parser.feed_data(data)
            current = self._current
            if current is not None and current.body_parts:
                self._flush_body(current)
        except httptools.HttpParserUpgrade as e:
            self._upgraded(data, e)
        except BodyTooSlow:
            line = self._request_line()  # the access line says which request it was
            self._refuse_current(408, "request body too slow", "timeout", line)
        except BadRequest as e:
            self._reject(e.status, str(e), e.request_line)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, BadRequest):
                self._reject(cause.status, str(cause), cause.request_line)
            else:
                raise
        except httptools.HttpParserInvalidMethodError:
            # A well-formed request line with a method llhttp does not know is "not
            # implemented"; anything else in its place is simply malformed.
            if unknown := unknown_method_line(data, at_boundary):
                self._reject(501, "method not implemented", unknown)
            else:
                self._reject(400, "malformed request line")
        except httptools.HttpParserError as e:
            reason = str(e)
            if parser.get_method() == b"PRI" and parser.get_http_version() == "2.0":
                # HTTP/2's connection preface (prior knowledge): llhttp stops at it.
                self._reject(505, "HTTP/2 is not supported on this listener", (b"PRI", b"*", "2.0"))
            elif ("version" in reason or "dot" in reason) and (
                other := OTHER_VERSION.search(data)
            ):
                # A version llhttp does not parse (HTTP/1.2, HTTP/1.10): not supported, as
                # the 0.9 and 2.0 it does parse (judged in _upstream_request).
                version = other.group("version").decode()
                line = (other.group("method"), other.group("target"), version)
                self._reject(505, f"HTTP/{version} is not supported", line)
            else:
                self._reject(400, reason or "malformed request")
        else:
            if self._in_message and self._phase in _READING:
                # httptools keeps a header or trailer line that has not ended to itself, and
                # llhttp skips chunk extensions: count the bytes of reads that completed no
                # field and carried no body data, so a never-ending line is bounded. Trailers
                # count against max_head_size with the head they follow.
                if self._progress:
                    self._progress = False
                    self._quiet = 0
                else:
                    self._quiet += len(data)
                    if self._head_size + self._quiet > self._ctx.config.max_head_size:
                        if self._current is None:
                            self._reject(431, "request head too large")
                        else:
                            self._reject(431, "request trailers or chunk framing too large")

    def readConnectionLost(self) -> None:
        """
        The client half-closed: answer what it already sent, then close.
        """
        if self._phase in ("lingering", "closed"):
            self._close_now()
            return
        self._eof = True
        if self._phase == "tunnel":
            assert self._tunnel is not None
            self._tunnel.client.read_finished()
            return
        if self._phase == "upgrading":
            return  # passed on to the tunnel, or handled as HTTP after a refusal
        self._phase = "closing"
        if self._current is not None:
            # The request being received can never be completed.
            exchange = self._current
            self._current = None
            if exchange in self._queue and not exchange.response_started:
                if self._queue[0] is exchange:  # begun: it has its line, as a 499
                    self.exchange_aborted(exchange, "client")
                    exchange.cancel()
                else:
                    self._drop_from(exchange)
        if not self._queue:
            self._close_now()

    def writeConnectionLost(self) -> None:
        """
        Our FIN is out: drain the client's input until it closes, for a moment at most; or
        close at once if the client half-closed already, as there is nothing left to drain.
        """
        if self._phase != "closed" and self._phase != "tunnel":
            if self._timer is not None:
                self._timer.cancel()  # the send deadline of _close_gracefully, if armed
            if self._eof:
                self._close_now()
            else:
                self._wait(self._ctx.linger_queue)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        if self._tunnel is not None:
            self._tunnel.client.lost(reason)  # the tunnel ends through _end_tunnel
        self._phase = "closed"
        self._out = None
        self._wait(None)
        if self._timer is not None:
            self._timer.stop()
        self._forget_sends()
        limits = self._ctx.limits
        if limits is not None and limits.idle_per_client:
            limits.went_busy(self._peer_str, self)
        self._current = None
        self._cut_pipeline("client")

    # -- IPushProducer: the upstream transport pauses us while it cannot take the body ------

    def pauseProducing(self) -> None:
        self._pause_reading(PAUSE_UPSTREAM)

    def resumeProducing(self) -> None:
        self._resume_reading(PAUSE_UPSTREAM)

    def stopProducing(self) -> None:
        """The upstream went away; the exchange reports that."""

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._reset_head()

    def on_headers_complete(self) -> None:
        if self._phase in ("closing", "lingering", "closed"):
            return  # pipelined after a request that closes the connection: never answered
        parser = self._parser
        assert parser is not None
        try:
            method, url, head, http11, keep_alive, has_body, chunked = self._upstream_request(
                parser
            )
        except BadRequest as e:
            # The request line is complete here: its access line says what it was.
            e.request_line = (parser.get_method(), self._url, parser.get_http_version())
            raise
        ctx = self._ctx
        self._served += 1
        exchange = Exchange(
            self,
            ctx,
            method,
            url,
            head,
            http11,
            keep_alive,
            has_body,
            chunked,
            self._served,
        )
        ctx.stats.requests_total += 1
        if self._upgrade:
            exchange.upgrade = True
        self._current = exchange
        if has_body:
            self._phase = "body"
            self._wait(ctx.body_queue if not self._pause else None)  # see _pause_reading
        else:
            self._phase = "busy"
            self._wait(None)
        queue = self._queue
        queue.append(exchange)
        if len(queue) == 1:
            exchange.start()

    def on_message_complete(self) -> None:
        self._in_message = False
        exchange = self._current
        if exchange is None:
            return
        if exchange.body_parts:
            self._flush_body(exchange)  # before its last chunk; may refuse it (413)
        if exchange.chunked:
            self._check_field_count()  # with the trailers
        self._current = None
        exchange.request_complete()
        if self._phase == "body":
            self._phase = "busy"
            self._wait(None)
        if not exchange.client_keep_alive or (
            self._ctx.keepalive.max_requests and self._served >= self._ctx.keepalive.max_requests
        ):
            # Nothing after this request will be answered. Reading stops only if more
            # arrives (see dataReceived): pausing now would cost two epoll_ctl calls per
            # such request, to be undone by _close_gracefully, which reads for the FIN.
            self._phase = "closing"
        elif len(self._queue) > 1:
            self._pause_reading(PAUSE_BACKLOG)
        if not self._queue:
            # The response was complete before the request was (an early answer).
            if self._phase == "busy":
                self._go_idle()
            elif self._phase == "closing":
                self._close_gracefully()

    # -- used by the exchange -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self._direct:
            self.transport.write(data)  # type: ignore[union-attr]
            return
        # A response's head and body (and the next pipelined response) usually come from
        # one upstream read: one send at the end of it instead of one per part.
        out = self._out
        if out is None:
            self._out = [data]
            self._ctx.after_event(self._send_out)
        else:
            out.append(data)

    def _send_out(self, flags: int = 0) -> None:
        out = self._out
        if out is None:
            return
        self._out = None
        transport = self.transport
        if transport is None or self._phase == "closed":
            return
        write_directly(transport, out[0] if len(out) == 1 else b"".join(out), flags)

    def backlogged(self) -> bool:
        """Whether our response bytes are queued: then the response needs flow control."""
        return backlogged(self.transport, self._direct)

    def abort(self, by: str = "timeout") -> None:
        """
        Cut the connection (a reset): the response being sent can no longer be completed.
        C{by} is what the access line of that exchange says ended it.
        """
        self._cut_pipeline(by)
        self._phase = "closed"
        self._out = None
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _cut_pipeline(self, by: str) -> None:
        """End every exchange: the one being answered is accounted for (C{by}); those
        pipelined behind it never began, so they have no line."""
        queue = self._queue
        if queue:
            head = queue[0]
            self.exchange_aborted(head, by)
            head.cancel()
            while queue:
                queue.pop().cancel()

    def drain_cut(self) -> None:
        """
        The drain timeout expired with this connection still busy (see service.py). A
        tunnel is cut both ways, and its access line written now: the aborts complete on the
        next reactor turn, after the drain flushed the access log for the last time.
        """
        relay = self._tunnel
        if relay is not None:
            relay.cut(DRAIN, abort=True)
            self._end_tunnel(relay)
            return
        self.abort("drain")

    def may_keep_alive(self, client_wants: bool, ordinal: int) -> bool:
        """
        Whether the response to the C{ordinal}-th request may leave the connection open.
        """
        ctx = self._ctx
        if self._phase in ("lingering", "closed") or ctx.is_draining():
            return False
        lifetime = ctx.config.max_lifetime
        if lifetime and ctx.clock.seconds() - self._born >= lifetime:
            return False
        return ctx.keepalive.keep_alive(client_wants, ordinal)

    def request_body_drained(self) -> None:
        if len(self._queue) <= 1:
            self._resume_reading(PAUSE_BACKLOG)

    def resume_from_upstream(self) -> None:
        self._resume_reading(PAUSE_UPSTREAM)

    def exchange_finished(self, exchange: Exchange) -> None:
        """
        The response of the first exchange in the pipeline is complete.
        """
        queue = self._queue
        if queue and queue[0] is exchange:
            del queue[0]
        self._account(exchange, exchange.status, exchange.aborted)
        if self._phase == "closed":
            return
        if self._phase == "upgrading" and exchange.upgrade:
            self._upgrade_refused(exchange)
            return
        if not exchange.keep_alive:
            self._close_gracefully()
            return
        if queue:
            if len(queue) == 1:
                self._resume_reading(PAUSE_BACKLOG)
            queue[0].start()
            return
        self._resume_reading(PAUSE_BACKLOG)
        if self._phase == "busy":
            self._go_idle()
        elif self._phase == "closing":
            self._close_gracefully()

    def exchange_upgraded(self, exchange: Exchange, connection: UpstreamConnection) -> None:
        """
        The origin switched protocols: its 101 head is written; from now on a L{Relay}
        carries the bytes both ways, with C{tunnel_idle_timeout}, and this is no longer an
        HTTP connection (no header, keep-alive or send timer). The bytes the client sent
        after its request, and the origin after its 101, are passed on first.
        """
        queue = self._queue
        if self._phase != "upgrading" or not queue or queue[0] is not exchange:
            raise RuntimeError(f"a protocol switch arrived in phase {self._phase}")
        del queue[0]
        ctx = self._ctx
        self._phase = "tunnel"
        self._parser = None
        self._wait(None)
        if self._timer is not None:
            self._timer.cancel()
        self._forget_sends()  # send_timeout and min_send_rate are HTTP's, not a tunnel's
        self._send_out()  # the 101 head goes before any relayed byte
        self._pause = 0  # the relay drives reading from now on (start resumes it)
        client = RelaySide(self.transport, "client")
        for data in self._held or ():
            client.received(data)
        self._held = None
        if self._eof:
            client.read_finished()
        upstream = connection.tunnel
        assert upstream is not None
        self._tunnel_exchange = exchange
        relay = self._tunnel = Relay(client, upstream, ctx.tunnel_queue, self._end_tunnel)
        relay.start()

    def _end_tunnel(self, relay: Relay) -> None:
        """
        The tunnel ended (or the drain cut it): its upstream connection is given up, and its
        101 exchange gets its access line, once, with the tunnel's whole duration, the bytes
        each way and why it ended (the relay's reason, as a tcp listener's lines say it).
        """
        exchange = self._tunnel_exchange
        if exchange is None:
            return
        self._tunnel_exchange = None
        exchange.tunnel_ended()
        if relay.reason == IDLE_TIMEOUT:
            self._ctx.stats.timeouts += 1
        exchange.bytes_out += relay.bytes_down
        self.log_extra = {
            **(self.log_extra or {}),
            "reason": relay.reason,
            "bytes_up": relay.bytes_up,
            "bytes_down": relay.bytes_down,
        }
        self._account(exchange, 101)

    def _upgrade_refused(self, exchange: Exchange) -> None:
        """
        The origin answered the Upgrade request without switching: the connection is HTTP
        again. What the client sent after the request is read as HTTP now, and its FIN, if
        it came meanwhile, is handled as any other.
        """
        held, self._held = self._held, None
        self._phase = "busy"
        if not exchange.keep_alive:
            self._close_gracefully()
            return
        self._resume_reading(PAUSE_UPGRADE | PAUSE_BACKLOG)
        self._go_idle()
        if held and self._phase == "idle":
            data = b"".join(held)
            self._ctx.stats.bytes_in -= len(data)  # counted when it was read
            self.dataReceived(data)
        if self._eof:
            self.readConnectionLost()

    def exchange_aborted(self, exchange: Exchange, by: str) -> None:
        """
        The exchange being answered ends without a complete response: the origin cut it
        (C{by="upstream"}), the client's connection is gone (C{"client"}), or we cut it
        (C{"timeout"}, C{"drain"}, C{"bad_request"}: a body found malformed midway). It still gets
        its access line and its count, as in nginx: the status is the one already sent,
        or 499 if no response had started, and C{"aborted"} says by whom.
        """
        queue = self._queue
        if queue and queue[0] is exchange:
            del queue[0]
        self._account(exchange, exchange.status if exchange.response_started else 499, by)

    def _account(self, exchange: Exchange, status: int, aborted: str | None = None) -> None:
        """
        An exchange's count in the metrics and its access line. Its duration goes into the
        listener's histogram, and the server's if it went upstream: plain integer counts,
        read at scrape time (L{persistproxy.metrics.Histogram}).
        """
        ctx = self._ctx
        stats = ctx.stats
        stats.count_response(status)
        if aborted is not None:
            stats.aborted[aborted] = stats.aborted.get(aborted, 0) + 1
        duration = ctx.clock.seconds() - exchange.started
        stats.durations.observe(duration)
        stats.bytes_out += exchange.bytes_out
        server = exchange.server
        if server is not None:
            upstream = stats.upstream(ctx.config.upstream, server)
            upstream.requests += 1
            if exchange.reused:
                upstream.reused += 1
            upstream.durations.observe(duration)
        access_log = ctx.access_log
        if access_log is not None:
            extra = self.log_extra
            if aborted is not None:
                extra = {**(extra or {}), "aborted": aborted}
            access_log.log(
                ctx.name,
                self._peer_str,
                exchange.method.decode("latin-1"),
                ctx.log_path(exchange.target),
                exchange.version or ("1.1" if exchange.client_http11 else "1.0"),
                status,
                exchange.bytes_out,
                duration * 1000,
                exchange.server,
                exchange.reused,
                exchange.retries + exchange.stale,
                extra,
            )

    @property
    def peer(self) -> str:
        """The client's address, as limits count it."""
        return self._peer_str

    @property
    def upstream_key(self) -> ClientAddresses | None:
        """What upstream connections are picked for (see L{ListenerContext.keyed})."""
        return self._key

    # -- internals ----------------------------------------------------------------------------

    def _go_idle(self) -> None:
        if not self._feeding and not self._in_message:
            self._parser = None
        if self._ctx.is_draining():
            self._close_gracefully()
            return
        ctx = self._ctx
        config = ctx.config
        timeout = config.keepalive_timeout
        if config.max_lifetime:
            left = self._born + config.max_lifetime - ctx.clock.seconds()
            if left <= 0:
                self._close_gracefully()
                return
            timeout = min(timeout, left) if timeout else 0
        if not timeout:
            self._close_gracefully()
            return
        self._phase = "idle"
        if timeout == config.keepalive_timeout:
            self._wait(ctx.idle_queue)
        else:
            self._wait(None)
            self._deadline(timeout)
        limits = ctx.limits
        if limits is not None and limits.idle_per_client:
            limits.went_idle(self._peer_str, self)

    def _pause_reading(self, reason: int) -> None:
        if not self._pause and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            if self._phase == "body":
                self._body_held()  # a body we do not read is not timed
        self._pause |= reason

    def _resume_reading(self, reason: int) -> None:
        if self._pause & reason:
            self._pause &= ~reason
            if not self._pause and self.transport is not None and self._phase != "closed":
                self.transport.resumeProducing()  # type: ignore[attr-defined]
                if self._phase == "body":
                    self._body_released()

    def _drop_from(self, exchange: Exchange) -> None:
        """Forget C{exchange} and everything pipelined after it (never answered)."""
        queue = self._queue
        while queue and queue[-1] is not exchange:
            queue.pop().cancel()
        if queue:
            queue.pop().cancel()

    def _reject(self, status: int, detail: str, line: RequestLine | None = None) -> None:
        """
        Answer a malformed request after the responses owed before it, then close. Nothing
        of it, nor anything pipelined after it, reaches the origin.

        @param line: the refused request's method, target and version, when known; else
            what the parser got of them (L{_request_line}).
        """
        if line is None:
            line = self._request_line()
        ctx = self._ctx
        ctx.stats.bad_requests += 1
        ctx.log.warning(
            "request.rejected",
            listener=ctx.name,
            client=self._peer_str,
            status=status,
            reason=detail,
        )
        self._refuse_current(status, detail, "bad_request", line)

    def _request_line(self) -> RequestLine:
        """
        What was parsed of the request being read, for the access line of its refusal: the
        exchange's if its head was complete, else the method once llhttp reached the target,
        and the version once llhttp parsed it. llhttp keeps the previous message's version
        until the next one's is parsed, so it is taken only when it cannot be a previous
        message's: a header line followed, or no earlier request shares this parser (one is
        made per request unless requests are pipelined, and then they are queued).
        """
        current = self._current
        if current is not None:
            return current.method, current.target, "1.1" if current.client_http11 else "1.0"
        parser = self._parser
        if parser is None or not self._url:
            return b"-", b"-", "-"
        version = parser.get_http_version()
        if version == "0.0" or (self._queue and self._head_size <= len(self._url)):
            version = "-"
        return parser.get_method(), self._url, version

    def _refuse_current(self, status: int, detail: str, by: str, line: RequestLine) -> None:
        """
        Give up the request being read, and everything pipelined after it (never answered),
        and answer C{status} in its place, after the responses owed before it; then close,
        reading nothing more. C{by} (C{"bad_request"} or C{"timeout"}) is what cut it.

        A request that had reached the upstream stage (its head, and part of its body, may be
        at the origin) keeps its place and its name: its upstream connection is dropped, and
        its access line has C{status} and C{"aborted": by}. If its response was already
        streaming, the connection is cut instead (C{by} in that line): nothing more can be
        answered. Any other refused request is answered by a placeholder whose access line
        has C{line}: what was parsed of its method, target and version.
        """
        current = self._current
        self._current = None
        begun = None
        if current is not None:
            if current.response_started:
                self.abort(by)  # cancels it, after its access line
                return
            queue = self._queue
            if queue and queue[0] is current:
                begun = current  # the last one parsed: nothing is pipelined after it
            elif current in queue:
                self._drop_from(current)
        self._phase = "closing"
        self._pause_reading(PAUSE_CLOSING)
        self._wait(None)
        response = error_response(status, detail)
        if begun is not None:
            begun.give_up(response, status, by)
            return
        method, target, version = line
        failed = Exchange.failed(self, self._ctx, response, status, target, method, version)
        self._queue.append(failed)
        if len(self._queue) == 1:
            failed.start()

    def _upgraded(self, data: bytes, error: httptools.HttpParserUpgrade) -> None:
        """
        llhttp stops at a request carrying C{Connection: upgrade} and C{Upgrade}, or at
        CONNECT. An Upgrade forwarded as such waits for its answer (L{exchange_upgraded},
        L{_upgrade_refused}); one that was not (h2c, HTTP/1.0, answered already) was sent as
        an ordinary request: go on with a fresh parser after it.
        """
        offset = error.args[0] if error.args and isinstance(error.args[0], int) else len(data)
        queue = self._queue
        if queue and queue[-1].upgrade and self._phase in ("busy", "closing"):
            # The Upgrade request went (or waits its turn) with its Upgrade header: nothing
            # after it is HTTP until the origin said it did not switch. Held, not parsed.
            self._phase = "upgrading"
            self._parser = None
            self._pause_reading(PAUSE_UPGRADE)
            self._held = [data[offset:]] if offset < len(data) else []
            return
        if self._phase in ("closing", "closed"):
            return
        if self._current is not None:
            # CONNECT stops before its "body": refused in on_headers_complete already.
            return
        self._parser = httptools.HttpRequestParser(self)
        rest = data[offset:]
        if rest:
            self.dataReceived(rest)
