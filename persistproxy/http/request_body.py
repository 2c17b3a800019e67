# -*- test-case-name: tests.unit.test_bounds -*-
"""
A request body as llhttp hands it over: chunk by chunk, forwarded one piece per read, and
judged for its rate when the listener asks for one (C{min_body_rate}).

A slotted mixin of the client connection, like L{persistproxy.http.request_head}: llhttp
calls back a single object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from persistproxy.http.request_head import BadRequest, RequestHeadReader

if TYPE_CHECKING:
    from persistproxy.http.context import TimedConnection
    from persistproxy.http.exchange import Exchange

__all__ = [
    "CHUNK_WINDOW",
    "CHUNK_WINDOW_SECONDS",
    "PAUSE_BACKLOG",
    "PAUSE_CLOSING",
    "PAUSE_UPGRADE",
    "PAUSE_UPSTREAM",
    "PIPELINE_BUFFER",
    "BodyTooSlow",
    "RequestBodyReader",
]

#: Bytes of pipelined requests (and bodies waiting for a connection) held before reading pauses.
PIPELINE_BUFFER = 256 * 1024

#: The second line of defence against bodies of tiny chunks (coalescing is the first): a
#: window of this many chunks that arrives in less than CHUNK_WINDOW_SECONDS must average at
#: least the listener's min_chunk_size bytes of data per chunk.
CHUNK_WINDOW = 4096
CHUNK_WINDOW_SECONDS = 1.0

# Why reading from the client is paused (bits; reading resumes when none is left).
PAUSE_UPSTREAM = 1  # the upstream cannot take the request body as fast as it comes
PAUSE_BACKLOG = 2  # too much is buffered behind the request being answered
PAUSE_CLOSING = 4  # nothing more will be read
PAUSE_UPGRADE = 8  # an Upgrade request waits for its answer: what follows may not be HTTP


class BodyTooSlow(Exception):
    """A request body came slower than the listener's C{min_body_rate}: 408 (logged already)."""


class RequestBodyReader(RequestHeadReader):
    """
    llhttp's body callback and what is done with a read's worth of body data.
    """

    __slots__ = ()

    # The connection's, read here.
    _current: Exchange | None
    _in_message: bool
    _peer_str: str

    def _pause_reading(self, reason: int) -> None:
        raise NotImplementedError

    def on_body(self, body: bytes) -> None:
        # Called once per chunk of a chunked body: only collect here. What one read brings
        # is forwarded as one piece (one chunk, one write) by _flush_body at the end of it.
        exchange = self._current
        if exchange is not None:
            exchange.body_parts.append(body)

    def _flush_body(self, exchange: Exchange) -> None:
        """
        Forward the body data parsed out of the current read, as one piece: 1-byte chunks
        would otherwise cost a write and a chunk on the upstream hop each.

        @raise BadRequest: past max_body_size (413), or chunks too small and too many (400).
        """
        parts = exchange.body_parts
        count = len(parts)
        data = parts[0] if count == 1 else b"".join(parts)
        parts.clear()
        self._progress = True
        ctx = self._ctx
        body_queue = ctx.body_queue
        if body_queue is not None:
            body_queue.add(cast("TimedConnection", self))
        config = ctx.config
        limit = config.max_body_size
        if limit:
            self._body_size += len(data)
            if self._body_size > limit:
                raise BadRequest(413, "request body too large")
        if exchange.chunked and config.min_chunk_size:
            exchange.chunks += count
            exchange.chunk_bytes += len(data)
            if exchange.chunks >= CHUNK_WINDOW:
                self._judge_chunk_window(exchange)
        if config.min_body_rate and self._in_message:
            # Judged only while the body goes on: its last read completes it, however late.
            self._judge_body_rate(exchange, len(data))
        buffered = exchange.request_body(data)
        if buffered > PIPELINE_BUFFER:
            self._pause_reading(PAUSE_BACKLOG)

    def _judge_body_rate(self, exchange: Exchange, size: int) -> None:
        """
        Count C{size} bytes of body in the current rate window and, once the window has
        lasted min_body_rate_window seconds, judge it: a body that came slower than
        min_body_rate bytes per second over it is refused, otherwise a new window begins.

        A window begins with the first body read, and again with the first read after
        reading was paused (we held the client back: not its fault, and not counted). A
        client silent throughout is body_timeout's: the rate is judged when bytes arrive.

        @raise BodyTooSlow: the window's rate was below min_body_rate.
        """
        ctx = self._ctx
        now = ctx.clock.seconds()
        since = exchange.rate_since
        if since is None:
            exchange.rate_since = now
            exchange.rate_bytes = size
            return
        received = exchange.rate_bytes + size
        seconds = now - since
        config = ctx.config
        if seconds < config.min_body_rate_window:
            exchange.rate_bytes = received
            return
        if received < config.min_body_rate * seconds:
            ctx.stats.timeouts += 1
            ctx.log.info(
                "client.min_body_rate",
                listener=ctx.name,
                client=self._peer_str,
                rate=round(received / seconds, 1),
                bytes=received,
                seconds=round(seconds, 3),
                min_body_rate=config.min_body_rate,
            )
            raise BodyTooSlow()
        exchange.rate_since = now
        exchange.rate_bytes = 0

    def _judge_chunk_window(self, exchange: Exchange) -> None:
        """
        A window of CHUNK_WINDOW chunks is complete: refuse a flood of tiny chunks (each is
        a parser callback), but not a client streaming small chunks at a human pace nor one
        sending many large ones quickly.

        @raise BadRequest: the window came in under CHUNK_WINDOW_SECONDS with chunks that
            averaged less than min_chunk_size bytes.
        """
        now = self._ctx.clock.seconds()
        minimum = self._ctx.config.min_chunk_size
        if (
            exchange.chunk_bytes < exchange.chunks * minimum
            and now - exchange.chunk_window < CHUNK_WINDOW_SECONDS
        ):
            raise BadRequest(
                400,
                f"{exchange.chunks} chunks in under {CHUNK_WINDOW_SECONDS:g}s averaging"
                f" under {minimum} bytes",
            )
        exchange.chunks = 0
        exchange.chunk_bytes = 0
        exchange.chunk_window = now
