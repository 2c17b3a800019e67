# -*- test-case-name: tests.unit.test_client_connection -*-
"""
One request and its response: the glue between a client connection and the upstream
connection lent to it.

The exchange asks the pool for a connection, streams the request body to it (buffering only
what arrives before the connection is ready), relays the response with the framing the
client's hop needs, and hands the upstream connection back when the response is complete.
It decides nothing about timeouts or retries by itself: it asks the listener's policies.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from persistproxy.http.errors import error_response
from persistproxy.http.upstream_connection import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    FRAMING_NONE,
    UpstreamConnection,
)

if TYPE_CHECKING:
    from persistproxy.http.context import ListenerContext
    from persistproxy.http.headers import Header
    from persistproxy.interfaces import Pool

__all__ = ["Exchange", "ExchangeOwner"]


class ExchangeOwner(Protocol):
    """
    The client connection an exchange answers, as the exchange sees it.
    """

    @property
    def transport(self) -> Any:
        """What the exchange registers itself with as a producer, when the client is slow."""

    @property
    def upstream_key(self) -> Hashable | None: ...

    @property
    def peer(self) -> str:
        """The client's address (host), which some balancing methods choose a server by."""

    def write(self, data: bytes) -> None: ...

    def backlogged(self) -> bool: ...

    def abort(self, by: str = "timeout") -> None: ...

    def may_keep_alive(self, client_wants: bool, ordinal: int) -> bool: ...

    def request_body_drained(self) -> None: ...

    def resume_from_upstream(self) -> None: ...

    def exchange_finished(self, exchange: Exchange) -> None: ...

    def send_stalled(self) -> None: ...

    def send_flowing(self) -> None: ...

    def exchange_upgraded(self, exchange: Exchange, connection: UpstreamConnection) -> None: ...

    # The producer of the request body, which the upstream transport pauses.

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...

_CHUNKED_HEADER = b"Transfer-Encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


@implementer(IPushProducer)
class Exchange:
    """
    The life of one request on its way through the proxy.

    @ivar head: the request head as it is sent upstream, already serialized.
    @ivar keep_alive: after the response head, whether the client connection survives it.
    @ivar response_started: a byte of the final response went to the client; from then on
        an upstream failure can only be reported by cutting the client connection.
    @ivar aborted: what cut the exchange short when it is answered in place of its response
        (L{give_up}), for its access line; L{None} for an exchange that ended normally.
    @ivar body_parts: request body data parsed out of the current read, not yet forwarded
        (the client connection forwards it as one piece at the end of the read).
    @ivar upgrade: the request asks the origin to switch protocols (its head carries
        C{Connection: upgrade} and C{Upgrade}): a 101 makes both connections a tunnel.
    @ivar chunks: chunks of a chunked request body in the current window (see
        L{persistproxy.http.client_connection.CHUNK_WINDOW}), C{chunk_bytes} their data
        and C{chunk_window} the clock time it began.
    @ivar rate_since: when the request body's current rate window began (none yet: the next
        body read begins one), C{rate_bytes} the body bytes received in it (see
        L{persistproxy.http.request_body.RequestBodyReader._judge_body_rate}).
    """

    __slots__ = (
        "_body",
        "_buffered",
        "_client",
        "_ctx",
        "_failed_pools",
        "_feeding",
        "_framing",
        "_pool",
        "_relaying",
        "aborted",
        "body_done",
        "body_parts",
        "bytes_out",
        "cancelled",
        "chunk_bytes",
        "chunk_window",
        "chunked",
        "chunks",
        "client_http11",
        "client_keep_alive",
        "error",
        "has_body",
        "head",
        "keep_alive",
        "method",
        "ordinal",
        "rate_bytes",
        "rate_since",
        "response_started",
        "retries",
        "reused",
        "stale",
        "started",
        "status",
        "target",
        "upgrade",
        "upstream",
        "version",
    )

    def __init__(
        self,
        client: ExchangeOwner,
        ctx: ListenerContext,
        method: bytes,
        target: bytes,
        head: bytes,
        client_http11: bool,
        client_keep_alive: bool,
        has_body: bool,
        chunked: bool,
        ordinal: int = 0,
    ) -> None:
        self._client = client
        self.ordinal = ordinal
        self._ctx = ctx
        self.method = method
        self.target = target
        self.head = head
        self.client_http11 = client_http11
        self.client_keep_alive = client_keep_alive
        self.has_body = has_body
        self.chunked = chunked
        self.upgrade = False
        self.body_done = not has_body
        self.body_parts: list[bytes] = []
        self.chunks = 0
        self.chunk_bytes = 0
        #: The request body's rate window (see min_body_rate): its start, if begun, and bytes.
        self.rate_since: float | None = None
        self.rate_bytes = 0
        self._body: list[bytes] = []
        self._buffered = 0
        self._feeding = False  # the client's transport is the producer of the upstream's
        self._relaying = False  # the upstream's transport is the producer of the client's
        self._pool: Pool[UpstreamConnection] | None = None
        #: The pools whose connect failed for this request (each tried once), if any.
        self._failed_pools: list[Pool[UpstreamConnection]] | None = None
        self._framing = FRAMING_NONE
        self.upstream: UpstreamConnection | None = None
        self.cancelled = False
        self.error: bytes = b""
        self.response_started = False
        self.aborted: str | None = None
        self.keep_alive = False
        self.status = 0
        self.bytes_out = 0
        self.retries = 0
        self.stale = 0
        self.reused = False
        #: The client's HTTP version for the access line when it is not 1.0 or 1.1 as
        #: C{client_http11} says (a refused request's: "-" if never parsed).
        self.version = ""
        self.started = self.chunk_window = ctx.clock.seconds()

    @classmethod
    def failed(
        cls,
        client: ExchangeOwner,
        ctx: ListenerContext,
        response: bytes,
        status: int,
        target: bytes = b"-",
        method: bytes = b"-",
        version: str = "-",
    ) -> Exchange:
        """
        A placeholder that answers with a ready-made error response and closes, keeping its
        place in the pipeline so that earlier requests are still answered first.

        @param target: the request target for the access line, when it is known; so are
            C{method} and C{version}, as far as they were parsed.
        """
        exchange = cls(client, ctx, method, target, b"", False, False, False, False)
        exchange.error = response
        exchange.status = status
        exchange.version = version
        return exchange

    # -- driven by the client connection ----------------------------------------------------

    def start(self) -> None:
        """
        The exchange reached the head of the pipeline: fetch a connection for it.
        """
        if self.error:
            self._client.write(self.error)
            self.response_started = True
            self.bytes_out = len(self.error)
            self._client.exchange_finished(self)
            return
        ctx = self._ctx
        key = self._client.upstream_key if ctx.keyed else None
        self._pool = ctx.group.pick(self._client.peer, key=key)
        self._pool.acquire(self, replayable=ctx.retry.replayable(self.method, self.has_body))

    def request_body(self, data: bytes) -> int:
        """
        Forward or buffer a piece of the request body; returns the bytes now buffered.
        """
        upstream = self.upstream
        if upstream is not None and upstream.state == "ACTIVE":
            if self.chunked:
                upstream.send_body(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                upstream.send_body(data)
            if not self._feeding and not self.body_done and upstream.backlogged():
                # The origin reads slower than the client sends: let it slow the client.
                upstream.throttle(self._client)
                self._feeding = True
            return 0
        if self.cancelled or (self.upstream is None and self.response_started):
            return 0  # answered already (early response or error): the rest is discarded
        self._body.append(data)
        self._buffered += len(data)
        return self._buffered

    def request_complete(self) -> None:
        self.body_done = True
        upstream = self.upstream
        if upstream is not None and upstream.state == "ACTIVE" and self.has_body:
            upstream.finish_request(self._last_chunk())
            self._unregister_request_producer(upstream)

    def _last_chunk(self) -> bytes:
        """
        What ends the request body on the upstream hop: the last chunk of a chunked body, or
        nothing. (A client hop that carries request trailers, HTTP/2's, adds them here.)
        """
        return _LAST_CHUNK if self.chunked else b""

    def cancel(self) -> None:
        """
        The client connection is gone: give the upstream connection back or drop it.
        """
        self.cancelled = True
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            self._detach(upstream)
            upstream.abort()
            if self._pool is not None:
                self._pool.forget()

    def give_up(self, response: bytes, status: int, by: str) -> None:
        """
        The request turned out bad or too slow (C{by}) after the exchange began, before any
        response: its head, and part of its body, may be at the origin already. Drop the
        upstream connection (the origin never sees the rest), and answer C{response} in the
        place of the response, under the request's own name in the access log.
        """
        self.cancel()
        self.aborted = by
        self.error = response
        self.status = status
        self.keep_alive = False
        self.start()

    # -- ConnectionWaiter -------------------------------------------------------------------

    def connection_ready(self, connection: UpstreamConnection, reused: bool) -> None:
        self.upstream = connection
        self.reused = reused
        complete = self.body_done and not self._body
        head = self.head
        if self.has_body and not self.chunked and self.body_done and self._body:
            # A small body that arrived whole: one write for the whole request.
            head = b"".join([head, *self._body])
            self._body = []
            self._buffered = 0
            complete = True
        connection.send_head(
            self, head, self.method, complete and not self.chunked, self.upgrade
        )
        if self._body:
            body, self._body = self._body, []
            self._buffered = 0
            for piece in body:
                self.request_body(piece)
            self._client.request_body_drained()
        if self.has_body and self.body_done:
            connection.finish_request(self._last_chunk())
        # Flow control in either direction is wired up only once bytes queue up in a
        # transport (see request_body and _relay): most exchanges never need it.

    def connection_failed(self, reason: str, status: int) -> None:
        ctx = self._ctx
        pool = self._pool
        if status == 502 and pool is not None and not self.cancelled:
            # The connect failed: nothing was sent, so the next server may have it.
            failed = self._failed_pools
            if failed is None:
                failed = self._failed_pools = []
            if pool not in failed:
                failed.append(pool)
            group = ctx.group
            if ctx.retry.may_try_next_server(len(failed), len(group.pools)):
                ctx.stats.retries += 1
                ctx.log.info(
                    "upstream.next_server",
                    listener=ctx.name,
                    server=pool.address,
                    method=self.method.decode("latin-1"),
                    path=ctx.log_path(self.target),
                    reason=reason,
                )
                key = self._client.upstream_key if ctx.keyed else None
                pool = self._pool = group.pick(self._client.peer, failed, key)
                pool.acquire(self, replayable=ctx.retry.replayable(self.method, self.has_body))
                return
        self._ctx.stats.upstream_errors += 1
        self._ctx.log.error(
            "upstream.error",
            listener=self._ctx.name,
            method=self.method.decode("latin-1"),
            path=self._ctx.log_path(self.target),
            reason=reason,
            status=status,
        )
        self._respond_error(status, reason)

    # -- ResponseSink -----------------------------------------------------------------------

    def response_interim(self, status: int, reason: bytes, headers: list[Header]) -> None:
        if self.client_http11:  # an HTTP/1.0 client would take it for the final response
            self._client.write(
                b"".join(
                    [
                        b"HTTP/1.1 %d %s\r\n" % (status, reason),
                        *[b"%s: %s\r\n" % header for header in headers],
                        b"\r\n",
                    ]
                )
            )

    def response_head(
        self, status: int, reason: bytes, headers: list[Header], framing: int
    ) -> None:
        ctx = self._ctx
        client = self._client
        self.status = status
        extra = []
        keep_alive = client.may_keep_alive(self.client_keep_alive, self.ordinal)
        if framing in (FRAMING_NONE, FRAMING_LENGTH):
            self._framing = framing
        elif self.client_http11:
            self._framing = FRAMING_CHUNKED
            extra.append(_CHUNKED_HEADER)
        else:
            self._framing = FRAMING_CLOSE
            keep_alive = False
        self.keep_alive = keep_alive
        if keep_alive:
            if not self.client_http11:
                extra.append(b"Connection: keep-alive\r\n")
            extra.append(ctx.keepalive_header)
        else:
            extra.append(b"Connection: close\r\n")
        head = b"".join(
            [
                b"HTTP/1.1 %d %s\r\n" % (status, reason),
                *[b"%s: %s\r\n" % header for header in headers],
                *extra,
                b"\r\n",
            ]
        )
        self.response_started = True
        self.bytes_out += len(head)
        client.write(head)
        if not self._relaying and client.backlogged():
            self._relay()

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        client = self._client
        if self._framing == FRAMING_CHUNKED:
            client.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            client.write(data)
        if not self._relaying and client.backlogged():
            self._relay()

    def response_upgraded(
        self, connection: UpstreamConnection, reason: bytes, headers: list[Header]
    ) -> None:
        """
        The origin switched protocols: relay its 101 head, then the client connection
        joins both connections in a byte relay. The upstream connection stays counted
        against its server's C{max_connections} until the tunnel ends (L{tunnel_ended}).
        """
        self.status = 101
        self.upstream = None
        self._detach(connection)
        head = b"".join(
            [
                b"HTTP/1.1 101 %s\r\n" % reason,
                *[b"%s: %s\r\n" % header for header in headers],
                b"\r\n",
            ]
        )
        self.response_started = True
        self.bytes_out += len(head)
        self._client.write(head)
        self._client.exchange_upgraded(self, connection)

    def tunnel_ended(self) -> None:
        """The tunnel has ended (called once): its upstream connection is not coming back."""
        pool = self._pool
        if pool is not None:
            pool.forget()

    def response_trailers(self, headers: list[Header]) -> None:
        """
        The trailer fields of a chunked response. An HTTP/1.x client is not sent them (its
        last chunk is ours); the HTTP/2 hop's exchange relays them.
        """

    def _relay(self) -> None:
        """
        The client reads slower than the origin sends: make the client's transport pause
        and resume us (and through us the upstream connection) from now on.
        """
        transport = self._client.transport
        if transport is not None and self.upstream is not None:
            transport.registerProducer(self, True)  # type: ignore[attr-defined]
            self._relaying = True

    def response_complete(self, connection: UpstreamConnection, reusable: bool) -> None:
        if self._framing == FRAMING_CHUNKED:
            self._client.write(_LAST_CHUNK)
        self.upstream = None
        self._detach(connection)
        pool = self._pool
        if pool is not None:
            pool.release(connection, reusable)
        self._client.exchange_finished(self)

    def upstream_failed(self, reason: str, timeout: bool, which: str = "") -> None:
        connection = self.upstream
        self.upstream = None
        pool = self._pool
        if connection is not None:
            self._detach(connection)
            if pool is not None:
                pool.forget()
        if self.cancelled:
            return
        ctx = self._ctx
        # A byte from the origin, even an invalid one, means the request may have been acted on.
        answered = self.response_started or (
            connection is not None and connection.bytes_received > 0
        )
        if (
            not timeout
            and pool is not None
            and ctx.retry.may_retry(
                self.method,
                self.has_body,
                answered,
                self.reused,
                self.retries,
                self.stale,
            )
        ):
            if self.reused:
                self.stale += 1
            else:
                self.retries += 1
            ctx.stats.retries += 1
            ctx.log.info(
                "upstream.retry",
                listener=ctx.name,
                server=pool.address,
                method=self.method.decode("latin-1"),
                path=ctx.log_path(self.target),
                reason=reason,
                stale_connection=self.reused,
            )
            if not self.reused:
                key = self._client.upstream_key if ctx.keyed else None
                pool = self._pool = ctx.group.pick(self._client.peer, key=key)
            pool.acquire(self, fresh=True)
            return
        ctx.stats.upstream_errors += 1
        status = 504 if timeout else 502
        if which in ("read", "write") and connection is not None:
            # The origin stalled in the middle of the exchange: its own event, with numbers.
            ctx.log.error(
                f"upstream.{which}_timeout",
                listener=ctx.name,
                server=pool.address if pool is not None else None,
                method=self.method.decode("latin-1"),
                path=ctx.log_path(self.target),
                timeout=connection.read_timeout if which == "read" else connection.write_timeout,
                received=connection.bytes_received,
                sent=self.bytes_out,
                status=status if not self.response_started else None,
                reason=reason,
            )
        else:
            ctx.log.error(
                "upstream.error",
                listener=ctx.name,
                server=pool.address if pool is not None else None,
                method=self.method.decode("latin-1"),
                path=ctx.log_path(self.target),
                reason=reason,
                status=status if not self.response_started else None,
                stale_connection=self.reused,
            )
        if self.response_started:
            # Part of the response is out: the only honest signal left is a cut connection.
            self._client.abort("timeout" if timeout else "upstream")
        else:
            self._respond_error(status, reason)

    # -- IPushProducer for the client's transport: a slow reader slows the origin down -------

    def pauseProducing(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.pauseProducing()
        self._client.send_stalled()

    def resumeProducing(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.resumeProducing()
        self._client.send_flowing()

    def stopProducing(self) -> None:
        """The client went away; its connection cancels the exchange."""

    # -- internals ----------------------------------------------------------------------------

    @property
    def server(self) -> str | None:
        """The upstream server that answered, for the access log."""
        pool = self._pool
        return pool.address if pool is not None else None

    def _respond_error(self, status: int, reason: str) -> None:
        self.status = status
        keep_alive = (
            self._client.may_keep_alive(self.client_keep_alive, self.ordinal) and self.body_done
        )
        self.keep_alive = keep_alive
        extra = self._ctx.keepalive_header if keep_alive else b""
        detail = (
            "upstream timed out"
            if status == 504
            else ("service unavailable" if status == 503 else "bad gateway")
        )
        response = error_response(status, detail, keep_alive, extra)
        if status == 503:
            response = response.replace(b"\r\n\r\n", b"\r\nRetry-After: 1\r\n\r\n", 1)
        self.response_started = True
        self.bytes_out = len(response)
        self._client.write(response)
        self._client.exchange_finished(self)

    def _detach(self, connection: UpstreamConnection) -> None:
        if self._relaying:
            self._relaying = False
            self._client.send_flowing()
            transport = self._client.transport
            if transport is not None:
                transport.unregisterProducer()  # type: ignore[attr-defined]
        self._unregister_request_producer(connection)

    def _unregister_request_producer(self, connection: UpstreamConnection) -> None:
        if self._feeding:
            self._feeding = False
            connection.unthrottle()
            self._client.resume_from_upstream()
