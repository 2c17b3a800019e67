# -*- test-case-name: tests.unit.test_h2 -*-
"""
An exchange whose client is an HTTP/2 stream: the upstream side is HTTP/1.1's, unchanged
(pool, retries, timeouts, errors); only how the response is written to the client differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from persistproxy.http.exchange import Exchange, ExchangeOwner
from persistproxy.http.h2_headers import response_fields, response_trailers

if TYPE_CHECKING:
    from persistproxy.http.context import ListenerContext
    from persistproxy.http.headers import Header

__all__ = ["H2Exchange", "H2StreamSide"]


class H2StreamSide(ExchangeOwner, Protocol):
    """The stream an L{H2Exchange} answers, as the exchange sees it."""

    request_trailers: bytes

    def send_interim(self, block: list[Header]) -> None: ...

    def send_head(self, block: list[Header]) -> None: ...

    def send_data(self, data: bytes) -> None: ...

    def send_trailers(self, block: list[Header]) -> None: ...

    def send_error(self, status: int, detail: str) -> int: ...


class H2Exchange(Exchange):
    """
    An exchange whose client is an HTTP/2 stream: the upstream side is the HTTP/1.1 one,
    unchanged; the response goes out as a header block, DATA frames and trailers.
    """

    __slots__ = ("_stream",)

    def __init__(
        self,
        stream: H2StreamSide,
        ctx: ListenerContext,
        method: bytes,
        target: bytes,
        head: bytes,
        has_body: bool,
        chunked: bool,
    ) -> None:
        super().__init__(stream, ctx, method, target, head, True, True, has_body, chunked)
        self._stream = stream

    def response_interim(self, status: int, reason: bytes, headers: list[Header]) -> None:
        self._stream.send_interim(response_fields(status, headers))

    def response_head(
        self, status: int, reason: bytes, headers: list[Header], framing: int
    ) -> None:
        self.status = status
        self.keep_alive = True
        self.response_started = True
        block = response_fields(status, headers)
        self.bytes_out += sum(len(n) + len(v) + 4 for n, v in block)
        stream = self._stream
        stream.send_head(block)
        if not self._relaying and stream.backlogged():
            self._relay()

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        stream = self._stream
        stream.send_data(data)
        if not self._relaying and stream.backlogged():
            self._relay()

    def response_trailers(self, headers: list[Header]) -> None:
        self._stream.send_trailers(response_trailers(headers))

    def _respond_error(self, status: int, reason: str) -> None:
        detail = (
            "upstream timed out"
            if status == 504
            else ("service unavailable" if status == 503 else "bad gateway")
        )
        self.status = status
        self.keep_alive = True
        self.response_started = True
        self.bytes_out = self._stream.send_error(status, detail)
        self._stream.exchange_finished(self)

    def _last_chunk(self) -> bytes:
        trailers = self._stream.request_trailers
        if self.chunked and trailers:
            return b"0\r\n%s\r\n" % trailers
        return super()._last_chunk()
