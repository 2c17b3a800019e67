# -*- test-case-name: tests.unit.test_upstream_connection -*-
"""
One persistent HTTP/1.1 connection from the proxy to an origin server.

The connection knows nothing of pools or clients: it sends one request at a time for
whichever L{ResponseSink} holds it, reports the response through that sink, and says at the
end whether it may carry another request. The pool decides what happens next.

@ivar state: C{"CONNECTING"} until the TCP connection is up; C{"IDLE"} while it waits in the
    pool or between requests; C{"ACTIVE"} while a request is outstanding; C{"TUNNEL"} once
    the origin answered an Upgrade request with 101 (its bytes go to the L{RelaySide}
    C{tunnel}, and it never carries HTTP again); C{"CLOSED"} once the transport is gone.
    Nothing is sent in any state but C{"IDLE"}.

An active connection times its origin with one lazily re-armed L{Deadline}, for whichever of
three waits applies (C{_timing}): C{"response"}, from the end of the request to the response
head (C{response_timeout}); C{"read"}, the silence between two reads of a response once its
head is in (C{read_timeout}), counted neither while the client holds the response back (we
stopped reading: that is the client's C{send_timeout} and C{min_send_rate}) nor while a
request body is still being sent after an early response, but from its last piece; and
C{"write"}, while the origin leaves request body we queued for it unread (C{write_timeout}),
which takes precedence while it lasts. While a request body is being sent and flows, nothing
upstream is timed: the client sending it is (C{body_timeout}, C{min_body_rate}).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import httptools
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.http.headers import (
    HOP_BY_HOP,
    MAX_CONTENT_LENGTH,
    connection_tokens,
    keepalive_timeout_param,
    nominated_headers,
    remove_nominated,
)
from persistproxy.net.fastwrite import backlogged, can_write_directly, write_directly
from persistproxy.policy import Deadline
from persistproxy.relay import RelaySide

if TYPE_CHECKING:
    from persistproxy.config import UpstreamConfig
    from persistproxy.http.headers import Header
    from persistproxy.interfaces import UpstreamServer

_CONNECTION_DONE = Failure(ConnectionError("connection closed"))

__all__ = ["BodyProducer", "HTTPConnector", "ResponseSink", "UpstreamConnection"]

#: Bytes of status line and headers an origin may send before we answer 502; also the bytes
#: of trailers (or chunk framing without data) allowed in a row before the response is cut.
MAX_RESPONSE_HEAD = 64 * 1024


_KEEP_ALIVE = {b"keep-alive"}


class _Stop(Exception):
    """Raised in a parser callback to stop parsing what is left of a read."""


# How the body of a response is delimited on the upstream link.
FRAMING_NONE = 0
FRAMING_LENGTH = 1
FRAMING_CHUNKED = 2
FRAMING_CLOSE = 3


class ResponseSink(Protocol):
    """
    What an upstream connection reports to while it carries a request.
    """

    def response_interim(self, status: int, reason: bytes, headers: list[Header]) -> None:
        """A 1xx response other than 101 arrived."""

    def response_head(
        self, status: int, reason: bytes, headers: list[Header], framing: int
    ) -> None:
        """The final response head arrived; C{headers} are already free of hop-by-hop ones."""

    def response_body(self, data: bytes) -> None:
        """A piece of the (de-chunked) response body arrived."""

    def response_trailers(self, headers: list[Header]) -> None:
        """The trailer fields of a chunked response, before C{response_complete}."""

    def response_complete(self, connection: UpstreamConnection, reusable: bool) -> None:
        """The response is complete; the connection no longer belongs to the sink."""

    def response_upgraded(
        self, connection: UpstreamConnection, reason: bytes, headers: list[Header]
    ) -> None:
        """
        The origin switched protocols (101) for the Upgrade request it was sent:
        C{connection} is a tunnel from now on (its C{tunnel} side holds the bytes that
        followed the 101), and no longer the pool's. C{headers} include C{Connection} and
        C{Upgrade}.
        """

    def upstream_failed(self, reason: str, timeout: bool, which: str = "") -> None:
        """
        The connection broke (or timed out) before the response was complete; C{which}
        timeout, if one: C{"response"}, C{"read"} or C{"write"}.
        """


class BodyProducer(Protocol):
    """What sends a request body: paused while the origin does not take it."""

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


@implementer(IPushProducer)
class UpstreamConnection(TwistedProtocol):
    """
    An HTTP/1.1 client connection that the pool lends to one exchange at a time.
    """

    # Slots: with this many attributes an instance dict stops sharing its keys and costs
    # ~0.8 KiB more per connection (measured with 10,000 idle connections).
    __slots__ = (
        "_chunked",
        "_clock",
        "_codings",
        "_completion",
        "_direct",
        "_done",
        "_extra",
        "_feeding",
        "_head_fields",
        "_head_seen",
        "_headers",
        "_hops",
        "_interim",
        "_is_head",
        "_length",
        "_max_fields",
        "_max_requests",
        "_new_parser",
        "_parser",
        "_parts",
        "_paused",
        "_quiet",
        "_reason",
        "_response_timeout",
        "_sink",
        "_switching",
        "_te",
        "_timer",
        "_timing",
        "_tokens",
        "_upgrade",
        "bytes_received",
        "expires_at",
        "idle_since",
        "in_pool",
        "on_lost",
        "origin_timeout",
        "read_timeout",
        "request_sent",
        "requests",
        "state",
        "tunnel",
        "write_timeout",
    )

    def __init__(
        self,
        clock: IReactorTime,
        response_timeout: float,
        max_requests: int,
        max_header_count: int = 100,
        read_timeout: float = 0.0,
        write_timeout: float = 0.0,
    ) -> None:
        """
        @param max_header_count: header fields a response head may have (more is a 502).
        @param read_timeout: seconds of silence allowed between two reads of a response;
            0 = no limit.
        @param write_timeout: seconds the origin may leave request body unread while we have
            some queued for it; 0 = no limit.
        """
        self.state = "CONNECTING"
        self.requests = 0
        self.idle_since = 0.0
        self.in_pool = False
        #: Clock time after which the origin said it may close the connection.
        self.expires_at = math.inf
        #: The origin's own idle timeout (C{Keep-Alive: timeout=N}), if it told us.
        self.origin_timeout: float | None = None
        self.on_lost: Callable[[UpstreamConnection], None] | None = None
        self._clock = clock
        self._response_timeout = response_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self._max_requests = max_requests
        self._max_fields = max_header_count
        #: Body data parsed out of the current read, relayed as one piece at its end.
        self._parts: list[bytes] = []
        self._timer = Deadline(clock, self._timed_out)
        #: What C{_timer} times while armed: "response", "read" or "write" (see the module).
        self._timing = ""
        self._parser = httptools.HttpResponseParser(self)
        self._sink: ResponseSink | None = None
        self._paused = False
        self._new_parser = False
        self._feeding = False
        self._direct = False
        #: The origin's C{Upgrade} value while an Upgrade request is outstanding (C{b""}
        #: until its header is read); L{None} when no protocol switch was asked for.
        self._upgrade: bytes | None = None
        #: A 101 parsed, handed over once llhttp stops after it: sink, reason, headers.
        self._switching: tuple[ResponseSink, bytes, list[Header]] | None = None
        self.tunnel: RelaySide | None = None
        self._reset_message()
        self.request_sent = True
        self.bytes_received = 0

    def _reset_message(self) -> None:
        self._is_head = False
        self._interim = False
        self._head_seen = False
        self._reason = b""
        self._headers: list[Header] = []
        #: Fields of the final head in _headers: those after it are trailers.
        self._head_fields = 0
        self._hops = 0
        self._tokens: set[bytes] = set()
        self._codings: list[bytes] = []
        self._extra = False
        self._completion: tuple[ResponseSink, bool] | None = None
        self._chunked = False
        self._te = False
        self._length = False
        self._done = False
        #: Bytes of reads in a row that carried no body data once the head was relayed.
        self._quiet = 0

    # -- used by the pool and the exchange -------------------------------------------------

    def send_head(
        self,
        sink: ResponseSink,
        head: bytes,
        method: bytes,
        complete: bool,
        upgrade: bool = False,
    ) -> None:
        """
        Start a request; C{complete} is true when C{head} is the whole request, C{upgrade}
        when it asks the origin to switch protocols (a 101 is then a tunnel, not an error).
        """
        if self.state != "IDLE":
            raise RuntimeError(f"request on a connection in state {self.state}")
        self.state = "ACTIVE"
        self.requests += 1
        self._sink = sink
        self._reset_message()
        self._is_head = method == b"HEAD"
        self.request_sent = complete
        self.bytes_received = 0
        self._upgrade = b"" if upgrade else None
        # A request with a body to come is timed as it goes (see the module).
        self._time("response", self._response_timeout if complete else 0)
        self._write(head)

    def send_body(self, data: bytes) -> None:
        self._write(data)
        if self._timing == "read" and not self._paused:
            # An early response waits on the rest of the request: silence from the origin
            # counts from the request's last piece too.
            self._timer.arm(self.read_timeout)

    def throttle(self, producer: BodyProducer) -> None:
        """
        The request body comes faster than the origin takes it: let our transport pause
        C{producer} (the client connection) while its buffer is full, and time how long the
        origin leaves it full (C{write_timeout}).
        """
        self.transport.registerProducer(_RequestFeed(self, producer), True)  # type: ignore[union-attr]

    def unthrottle(self) -> None:
        """The request body is all queued (or abandoned): C{throttle} no more."""
        transport = self.transport
        if transport is not None:
            transport.unregisterProducer()  # type: ignore[attr-defined]
        if self._timing == "write":
            self._retime()

    def backlogged(self) -> bool:
        """Whether request bytes are queued: then the request body needs flow control."""
        return backlogged(self.transport, self._direct)

    def _write(self, data: bytes) -> None:
        if self._direct:
            write_directly(self.transport, data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def finish_request(self, trailer: bytes = b"") -> None:
        if trailer:
            self._write(trailer)
        self.request_sent = True
        if not self._head_seen and self._timing != "write":
            self._time("response", self._response_timeout)

    def usable(self, now: float, margin: float) -> bool:
        """
        Whether the pool may hand this idle connection out without racing the origin's
        own keep-alive timeout (the margin counts for at most half of it: C{math.inf} asks
        for the first half).
        """
        if self.state != "IDLE":
            return False
        timeout = self.origin_timeout
        if timeout is None:
            return True
        return now + min(margin, timeout / 2) < self.expires_at

    def close(self) -> None:
        if self.transport is not None and self.state != "CLOSED":
            self.transport.loseConnection()

    def abort(self) -> None:
        self._sink = None
        if self.transport is not None and self.state != "CLOSED":
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- IPushProducer: the client's transport pauses us when it cannot keep up ------------

    def pauseProducing(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            if self._timing == "read":
                # We stopped reading for the client's sake: not the origin's silence.
                self._timer.cancel()

    def resumeProducing(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]
            if self._timing == "read" and not self._done:
                self._timer.arm(self.read_timeout)

    def stopProducing(self) -> None:
        """The client went away; the exchange deals with that."""

    # -- Twisted protocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.state = "IDLE"
        self._direct = can_write_directly(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.state != "ACTIVE":
            if self.tunnel is not None:
                self.tunnel.received(data)
                return
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.abort()
            return
        self.bytes_received += len(data)
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Stop):
                raise
        except httptools.HttpParserUpgrade as e:
            if self._switching is not None:
                self._feeding = False
                offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
                self._switch(data[offset:])
                return
            if self._completion is None:
                self._fail("origin switched protocols unasked", False)
        except httptools.HttpParserError as e:
            if self._completion is None:
                self._fail(f"invalid response from origin: {e}", False)
            else:
                self._extra = True
        finally:
            self._feeding = False
        if self._new_parser:
            self._new_parser = False
            self._parser = httptools.HttpResponseParser(self)
        completion = self._completion
        if completion is not None:
            self._completion = None
            sink, reusable = completion
            # Bytes after the end of the response, in the same read: whatever they are, they
            # answer nothing we sent. Never let them reach the next request.
            self._complete(sink, reusable and not self._extra)
            return
        if self._timing == "read" and not self._paused:
            self._timer.arm(self.read_timeout)  # lazily: no reactor call per read
        if self._parts:
            self._quiet = 0
            self._relay_body()
        elif self._sink is not None:
            if not self._head_seen:
                if self.bytes_received > MAX_RESPONSE_HEAD:
                    self._fail(f"response head larger than {MAX_RESPONSE_HEAD} bytes", False)
            elif self._chunked:
                # A read without body data: chunk framing, or trailers, whose unfinished
                # line httptools keeps to itself. Bound them as the head is bounded.
                self._quiet += len(data)
                if self._quiet > MAX_RESPONSE_HEAD:
                    self._fail(
                        f"response trailers or chunk framing larger than {MAX_RESPONSE_HEAD}"
                        " bytes",
                        False,
                    )

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._timer.stop()
        self._timing = ""
        was = self.state
        self.state = "CLOSED"
        sink = self._sink
        if was == "TUNNEL" and self.tunnel is not None:
            self.tunnel.lost(reason)
        elif was == "ACTIVE" and sink is not None:
            if self._head_seen and not self._length and not self._chunked and not self._done:
                # Close-delimited body: the end of the connection is the end of the body.
                self._sink = None
                sink.response_complete(self, False)
            else:
                self._sink = None
                sink.upstream_failed("origin closed the connection", False)
        if self.on_lost is not None:
            self.on_lost(self)

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:
            self._extra = True
            raise _Stop()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            self._hops += 1  # not in _headers, but counted against max_header_count
            if lower == b"connection":
                connection_tokens(value, self._tokens)
            elif lower == b"transfer-encoding":
                self._te = True
                self._codings.extend(t.strip().lower() for t in value.split(b","))
            elif lower == b"upgrade" and self._upgrade is not None:
                self._upgrade = value if not self._upgrade else self._upgrade + b", " + value
            elif lower == b"keep-alive":
                seconds = keepalive_timeout_param(value)
                if seconds is not None:
                    self.origin_timeout = seconds
                    self.expires_at = self._clock.seconds() + seconds
            return
        if lower == b"content-length":
            self._length = True
            if len(value) > 18 or (value[0] == 48 and len(value) > 1):  # 48: "0"
                # Rare: leading zeros, or near the int64 limit (llhttp let only digits by).
                length = int(value)
                if length > MAX_CONTENT_LENGTH:
                    self._fail("origin sent a Content-Length over 2^63 - 1", False)
                    raise _Stop()
                value = b"%d" % length
        # The head's size is bounded per read in dataReceived, not per header: this is the
        # hottest callback of the proxy.
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers = self._headers
        tokens = self._tokens
        if tokens and tokens != _KEEP_ALIVE:
            headers = remove_nominated(headers, nominated_headers(tokens))
        sink = self._sink
        if sink is None:
            return
        if len(self._headers) + self._hops > self._max_fields:
            self._fail(f"response head has more than {self._max_fields} header fields", False)
            raise _Stop()
        if status == 101:
            if self._upgrade is None:
                self._fail("origin switched protocols unasked", False)
                raise _Stop()
            if not self._upgrade:
                self._fail("origin switched protocols without saying to what (Upgrade)", False)
                raise _Stop()
            # llhttp completes the message and stops after this head: the bytes after it are
            # the new protocol's, handed over in dataReceived.
            self._time("", 0)
            self._switching = (sink, self._reason, headers)
            self._sink = None
            self._done = True
            return
        if self._te:
            if self._codings != [b"chunked"]:
                # A coding we would have to pass on undecoded to a client we re-chunk for.
                coding = b", ".join(self._codings).decode("latin-1")
                self._fail(f"origin used transfer coding {coding!r}", False)
                raise _Stop()
            self._chunked = True
        if 100 <= status < 200:
            self._interim = True
            sink.response_interim(status, self._reason, headers)
            self._reason = b""
            self._headers = []
            self._hops = 0
            self._tokens = set()
            return
        self._head_seen = True
        if self._timing != "write":
            # From now on the response is timed read by read: armed at the end of this read
            # if the response goes on (most end in it, and are never timed at all).
            self._timing = "read" if self.read_timeout else ""
            self._timer.cancel()
        if self._is_head or status in (204, 304):
            framing = FRAMING_NONE
            if status in (204, 304) and self._length:
                # A 204 or 304 has no body whatever its Content-Length says; relayed, the
                # header could make a client wait for one (HAProxy drops it too).
                headers = [h for h in headers if h[0].lower() != b"content-length"]
        elif self._te:
            framing = FRAMING_CHUNKED if self._chunked else FRAMING_CLOSE
        elif self._length:
            framing = FRAMING_LENGTH
        else:
            framing = FRAMING_CLOSE
        self._head_fields = len(self._headers)
        sink.response_head(status, self._reason, headers, framing)
        if self._is_head:
            # llhttp cannot be told that a HEAD response has no body; finish here and give
            # the next response a fresh parser.
            self._new_parser = True
            self._finish()

    def on_body(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            if self._chunked:
                # Called once per chunk: only collect here; what one read brings is relayed
                # as one piece (one chunk to the client) at the end of it.
                self._parts.append(data)
            else:
                sink.response_body(data)  # once per read already
        elif self._done:
            # A body after a HEAD response or a 204/304: bytes that answer nothing.
            self._extra = True
            raise _Stop()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self._done:
            self._finish()

    # -- internals ----------------------------------------------------------------------------

    def _relay_body(self) -> None:
        """Hand the body data parsed out of the current read to the sink, in one piece."""
        parts = self._parts
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        sink = self._sink
        if sink is not None:
            sink.response_body(data)

    def _finish(self) -> None:
        self._done = True
        self._timing = ""
        self._timer.cancel()
        if self._parts:
            self._relay_body()  # the chunk data of this read goes before the completion
        sink = self._sink
        self._sink = None
        fields = self._headers
        if self._chunked and len(fields) > self._head_fields and sink is not None:
            # Trailer fields came through on_header after the head (hop-by-hop ones dropped).
            sink.response_trailers(fields[self._head_fields :])
        reusable = bool(
            self.request_sent
            and b"close" not in self._tokens
            and self._parser.should_keep_alive()
            and (self._is_head or self._length or self._chunked or not self._te)
            and not (self._max_requests and self.requests >= self._max_requests)
        )
        if sink is None:
            return
        if self._feeding:
            # Report once the whole read is parsed, so that nothing after the end of this
            # response can be taken for the answer to a request sent in the meantime.
            self._completion = (sink, reusable)
        else:
            self._complete(sink, reusable)

    def _complete(self, sink: ResponseSink, reusable: bool) -> None:
        self.state = "IDLE"
        if self._paused:
            self.resumeProducing()
        sink.response_complete(self, reusable)
        if not reusable and self.state == "IDLE":
            self.close()

    def _switch(self, rest: bytes) -> None:
        """
        Become one side of a byte relay: the bytes after the 101 head are held by the side
        (its transport paused) until the relay joins it to the client's.
        """
        switching = self._switching
        assert switching is not None and self._upgrade
        self._switching = None
        sink, reason, headers = switching
        self.state = "TUNNEL"
        self._paused = False  # the relay drives the transport's flow control from now on
        side = self.tunnel = RelaySide(self.transport, "upstream")
        if rest:
            side.received(rest)
        upgrade = [(b"Connection", b"upgrade"), (b"Upgrade", self._upgrade)]
        sink.response_upgraded(self, reason, [*headers, *upgrade])

    def _fail(self, reason: str, timeout: bool, which: str = "") -> None:
        self._time("", 0)
        self._parts.clear()
        sink = self._sink
        self._sink = None
        self.abort()
        if sink is not None:
            sink.upstream_failed(reason, timeout, which)

    def _time(self, timing: str, seconds: float) -> None:
        """Time C{timing} from now, for C{seconds} (0: not at all)."""
        if seconds:
            self._timing = timing
            self._timer.arm(seconds)
        else:
            self._timing = ""
            self._timer.cancel()

    def _retime(self) -> None:
        """A write stall is over: time whatever the exchange waits for now."""
        if self.state != "ACTIVE" or self._done:
            self._time("", 0)
        elif self._head_seen:
            self._time("read", self.read_timeout)
            if self._paused:
                self._timer.cancel()  # the client holds the response back
        elif self.request_sent:
            self._time("response", self._response_timeout)
        else:
            self._time("", 0)

    def _write_stalled(self) -> None:
        """Our transport's buffer is full: the origin is not taking the request body."""
        if self.state == "ACTIVE" and self.write_timeout:
            self._time("write", self.write_timeout)

    def _write_flowing(self) -> None:
        if self._timing == "write":
            self._retime()

    def _timed_out(self) -> None:
        if self.state != "ACTIVE":
            return
        timing = self._timing
        self._timing = ""
        if timing == "read":
            self._fail(
                f"no response bytes for {self.read_timeout:g}s"
                f" ({self.bytes_received} bytes received)",
                True,
                "read",
            )
        elif timing == "write":
            self._fail(f"origin read no request body for {self.write_timeout:g}s", True, "write")
        else:
            self._fail(f"no response head within {self._response_timeout:g}s", True, "response")


@implementer(IPushProducer)
class _RequestFeed:
    """
    The producer an upstream transport pauses while the origin does not take the request
    body: the client connection's reading, and the connection's C{write_timeout}. Made only
    for a body that outruns its origin (see L{UpstreamConnection.throttle}).
    """

    __slots__ = ("_connection", "_producer")

    def __init__(self, connection: UpstreamConnection, producer: BodyProducer) -> None:
        self._connection = connection
        self._producer = producer

    def pauseProducing(self) -> None:
        self._producer.pauseProducing()
        self._connection._write_stalled()

    def resumeProducing(self) -> None:
        self._connection._write_flowing()
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, clock: IReactorTime, config: UpstreamConfig) -> None:
        self._clock = clock
        self._config = config

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        return UpstreamConnection(
            self._clock,
            self._config.response_timeout,
            self._config.max_requests,
            self._config.max_header_count,
            self._config.read_timeout,
            self._config.write_timeout,
        )


@dataclass(frozen=True)
class HTTPConnector:
    """
    Dials HTTP/1.1 upstream connections for the pools (an
    L{persistproxy.interfaces.UpstreamConnector}); equal for one reactor, so every HTTP
    listener forwarding to an upstream shares its pools.
    """

    clock: IReactorTime

    def factory_for(self, server: UpstreamServer, config: UpstreamConfig) -> Factory:
        return _UpstreamFactory(self.clock, config)
