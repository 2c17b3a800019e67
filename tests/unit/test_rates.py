"""
Stalls and minimum rates, with a Clock: an origin silent in the middle of its response
(read_timeout) or not reading the request body (write_timeout), and clients sending a body
(min_body_rate) or taking a response (min_send_rate) too slowly.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from fakes import OK_RESPONSE, HalfCloseTransport, Harness, parse_response
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from persistproxy.http import client_closing
from persistproxy.http.client_connection import ClientConnection
from persistproxy.http.upstream_connection import UpstreamConnection
from persistproxy.net.fastwrite import queued

GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"
POST = b"POST /up HTTP/1.1\r\nHost: example\r\nContent-Length: 1000000\r\n\r\n"
PARTIAL = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"


def _upstream(h: Harness) -> UpstreamConnection:
    return h.origin.connections[-1]


def _cut(transport: Any) -> bool:
    """Whether a StringTransport was reset (abortConnection) or closed."""
    return bool(transport.disconnecting)


def _origin_pauses_us(h: Harness) -> None:
    """What the upstream transport does when its buffer fills: pause its producer."""
    _upstream(h).transport.producer.pauseProducing()  # type: ignore[union-attr]


def _origin_resumes_us(h: Harness) -> None:
    _upstream(h).transport.producer.resumeProducing()  # type: ignore[union-attr]


# -- read_timeout ---------------------------------------------------------------------------


def test_an_origin_silent_in_the_middle_of_its_response_is_cut_at_read_timeout() -> None:
    h = Harness(upstream={"read_timeout": 5, "response_timeout": 60})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(PARTIAL)
    sent = len(transport.value())
    h.clock.advance(4)
    h.origin.respond(b"de")  # a read restarts the silence
    h.clock.advance(4.9)
    assert not _cut(transport)
    h.clock.advance(0.2)
    assert _cut(transport), "part of the response is out: only a cut connection tells"
    assert _cut(_upstream(h).transport), "the origin's connection is dropped"
    [event] = h.events("upstream.read_timeout")
    assert (event["timeout"], event["sent"], event["status"]) == (5, sent + 2, None)
    assert event["received"] == len(PARTIAL) + 2
    [line] = h.events("access")
    assert (line["status"], line["aborted"]) == (200, "timeout")
    assert h.stats.aborted == {"timeout": 1}
    assert not h.events("upstream.error")


def test_read_timeout_does_not_run_while_the_client_holds_the_response_back() -> None:
    h = Harness(upstream={"read_timeout": 5}, listener={"send_timeout": 0})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(PARTIAL)
    exchange = client._queue[0]
    exchange.pauseProducing()  # the client's transport is full: we stop reading the origin
    h.clock.advance(100)
    assert not _cut(transport), "the origin is not silent, we are not listening"
    exchange.resumeProducing()
    h.clock.advance(4.9)
    assert not _cut(transport)
    h.clock.advance(0.2)
    assert _cut(transport)
    assert h.events("upstream.read_timeout")


def test_a_complete_response_leaves_no_read_timer_behind() -> None:
    h = Harness(upstream={"read_timeout": 5})
    client, _transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(PARTIAL)
    h.origin.respond(b"defghij")
    h.clock.advance(30)  # idle in the pool, and the client idle: nothing to time out
    assert not _cut(_upstream(h).transport)
    assert [a.get("aborted") for a in h.events("access")] == [None]
    client.dataReceived(GET)  # the pooled connection serves again
    assert len(h.origin.connections) == 1


def test_read_timeout_zero_is_off() -> None:
    h = Harness(upstream={"read_timeout": 0})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(PARTIAL)
    h.clock.advance(3600)
    assert not _cut(transport)


def test_an_early_response_is_not_cut_while_the_request_body_still_flows() -> None:
    """The origin answered before the body's end and waits for it: its silence counts from
    the request's last piece, not from its last read."""
    h = Harness(upstream={"read_timeout": 5}, listener={"body_timeout": 60})
    client, transport = h.client()
    client.dataReceived(POST + b"x" * 100)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):
        h.clock.advance(4)
        client.dataReceived(b"x" * 100)
    assert not _cut(transport)
    h.clock.advance(5.1)
    assert _cut(transport)
    assert h.events("upstream.read_timeout")


# -- response_timeout counts from the end of the request ------------------------------------


def test_response_timeout_counts_from_the_end_of_the_request_body() -> None:
    """A slow upload is the client's business (body_timeout, min_body_rate), not a 504."""
    h = Harness(upstream={"response_timeout": 2}, listener={"body_timeout": 60})
    client, transport = h.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: example\r\nContent-Length: 6\r\n\r\nabc")
    h.clock.advance(10)
    assert transport.value() == b""
    client.dataReceived(b"def")
    h.clock.advance(1.9)
    assert transport.value() == b""
    h.clock.advance(0.2)
    assert parse_response(transport.value())[0] == 504


# -- write_timeout --------------------------------------------------------------------------


def test_an_origin_that_stops_reading_the_body_gets_a_504_at_write_timeout() -> None:
    h = Harness(upstream={"write_timeout": 3}, listener={"body_timeout": 60})
    client, transport = h.client()
    client.dataReceived(POST + b"x" * 1000)
    _origin_pauses_us(h)
    assert transport.producerState == "paused", "the client is held back"
    h.clock.advance(2.9)
    assert transport.value() == b""
    h.clock.advance(0.2)
    status, headers, _ = parse_response(transport.value())
    assert status == 504 and headers[b"connection"] == [b"close"]
    assert transport.write_closed, "the rest of the body will not be read: closed"
    assert _cut(_upstream(h).transport)
    [event] = h.events("upstream.write_timeout")
    assert (event["timeout"], event["status"], event["received"]) == (3, 504, 0)
    [line] = h.events("access")
    assert line["status"] == 504 and "aborted" not in line


def test_write_timeout_counts_only_while_the_origin_does_not_drain() -> None:
    h = Harness(upstream={"write_timeout": 3}, listener={"body_timeout": 60})
    client, transport = h.client()
    client.dataReceived(POST + b"x" * 1000)
    _origin_pauses_us(h)
    h.clock.advance(2.5)
    _origin_resumes_us(h)  # it took everything queued
    assert transport.producerState == "producing"
    h.clock.advance(30)  # the client is silent now: that is body_timeout's business
    assert transport.value() == b""
    client.dataReceived(b"x" * 1000)
    _origin_pauses_us(h)
    h.clock.advance(2.9)
    assert transport.value() == b""
    h.clock.advance(0.2)
    assert parse_response(transport.value())[0] == 504


def test_write_timeout_after_the_response_began_cuts_the_client() -> None:
    h = Harness(upstream={"write_timeout": 3, "read_timeout": 60})
    client, transport = h.client()
    client.dataReceived(POST + b"x" * 1000)
    h.origin.respond(PARTIAL)  # an early answer, and then it reads no more
    _origin_pauses_us(h)
    h.clock.advance(3.1)
    assert _cut(transport)
    [event] = h.events("upstream.write_timeout")
    assert event["status"] is None
    [line] = h.events("access")
    assert (line["status"], line["aborted"]) == (200, "timeout")


def test_a_body_held_back_by_its_origin_is_not_timed_on_the_client() -> None:
    """body_timeout does not blame the client for the time we did not read it."""
    h = Harness(upstream={"write_timeout": 0}, listener={"body_timeout": 5})
    client, transport = h.client()
    client.dataReceived(POST + b"x" * 1000)
    _origin_pauses_us(h)
    h.clock.advance(60)
    assert transport.value() == b""
    _origin_resumes_us(h)
    h.clock.advance(4.9)
    assert transport.value() == b""
    h.clock.advance(0.2)
    assert parse_response(transport.value())[0] == 408


# -- min_body_rate --------------------------------------------------------------------------


def test_a_body_below_min_body_rate_gets_408() -> None:
    h = Harness(listener={"min_body_rate": 1000, "min_body_rate_window": 10})
    client, transport = h.client()
    client.dataReceived(POST + b"x" * 5000)  # the window begins with the first body read
    h.clock.advance(5)
    client.dataReceived(b"x" * 3000)
    h.clock.advance(5)
    client.dataReceived(b"x" * 1000)  # 9000 bytes in 10 s
    status, headers, _ = parse_response(transport.value())
    assert status == 408 and headers[b"connection"] == [b"close"]
    assert transport.write_closed
    assert _cut(_upstream(h).transport)
    [event] = h.events("client.min_body_rate")
    assert (event["rate"], event["bytes"], event["seconds"]) == (900, 9000, 10)
    assert event["min_body_rate"] == 1000
    [line] = h.events("access")
    assert (line["path"], line["status"]) == ("/up", 408)
    assert h.stats.timeouts == 1
    assert b"x" * 5000 + b"x" * 3000 in h.origin.sent(), "what came before was forwarded"


def test_a_body_at_min_body_rate_passes_window_after_window() -> None:
    h = Harness(listener={"min_body_rate": 1000, "min_body_rate_window": 10})
    client, transport = h.client()
    client.dataReceived(POST)
    for _ in range(60):  # one minute at 1100 bytes/s, in 1 s reads
        client.dataReceived(b"x" * 1100)
        h.clock.advance(1)
    assert transport.value() == b""
    assert not h.events("client.min_body_rate")


def test_the_read_that_completes_a_body_is_not_judged() -> None:
    h = Harness(listener={"min_body_rate": 1000, "min_body_rate_window": 10})
    client, transport = h.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: example\r\nContent-Length: 6\r\n\r\nabc")
    h.clock.advance(20)
    client.dataReceived(b"def")
    assert h.origin.sent().endswith(b"abcdef")
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[0] == 200


def test_min_body_rate_does_not_count_the_time_we_did_not_read() -> None:
    h = Harness(
        listener={"min_body_rate": 1000, "min_body_rate_window": 10},
        upstream={"write_timeout": 0},
    )
    client, transport = h.client()
    client.dataReceived(POST + b"x" * 2000)
    h.clock.advance(1)
    _origin_pauses_us(h)
    h.clock.advance(30)
    _origin_resumes_us(h)
    client.dataReceived(b"x" * 5000)  # the window begins again here
    h.clock.advance(10)
    client.dataReceived(b"x" * 6000)
    assert transport.value() == b"", "11000 bytes in the 10 s we were reading"
    h.clock.advance(10)
    client.dataReceived(b"x" * 10)
    assert parse_response(transport.value())[0] == 408


def test_min_body_rate_cuts_a_response_already_streaming() -> None:
    h = Harness(listener={"min_body_rate": 1000, "min_body_rate_window": 10})
    client, transport = h.client()
    client.dataReceived(POST + b"x" * 100)
    h.origin.respond(PARTIAL)
    h.clock.advance(10)
    client.dataReceived(b"x")
    assert _cut(transport)
    [line] = h.events("access")
    assert (line["status"], line["aborted"]) == (200, "timeout")


# -- min_send_rate --------------------------------------------------------------------------


class BufferedTransport(HalfCloseTransport):
    """
    A client transport whose bytes not yet taken by the client we set by hand: what
    L{persistproxy.net.fastwrite.queued} reads from a TCP transport and its socket.
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        self._tempDataLen = 0


@pytest.fixture(autouse=True)
def _queued_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    def queued(transport: Any) -> int | None:
        return transport._tempDataLen if isinstance(transport, BufferedTransport) else None

    monkeypatch.setattr(client_closing, "queued", queued)


def _slow_reader(
    listener: dict[str, Any], length: int = 100_000_000
) -> tuple[Harness, ClientConnection, BufferedTransport, Any]:
    """A client whose response stalls with 80,000 bytes queued for it."""
    h = Harness(listener={"send_timeout": 0, **listener}, upstream={"read_timeout": 0})
    client = ClientConnection(h.ctx)
    transport = BufferedTransport()
    client.makeConnection(transport)
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length + b"x" * 100000)
    exchange = client._queue[0]
    transport._tempDataLen = 80000
    exchange.pauseProducing()
    return h, client, transport, exchange


def test_a_client_taking_a_response_below_min_send_rate_is_cut() -> None:
    h, _client, transport, _ = _slow_reader({"min_send_rate": 1000, "min_send_rate_window": 10})
    h.clock.advance(5)
    transport._tempDataLen = 76000
    h.clock.advance(4.9)
    assert not _cut(transport)
    transport._tempDataLen = 72000  # 8000 bytes taken in 10 s
    h.clock.advance(0.2)
    assert _cut(transport)
    assert _cut(_upstream(h).transport), "the origin's response is abandoned too"
    [event] = h.events("client.min_send_rate")
    assert (event["bytes"], event["min_send_rate"]) == (8000, 1000)
    assert 790 <= event["rate"] <= 800
    [line] = h.events("access")
    assert (line["status"], line["aborted"]) == (200, "timeout")
    assert h.stats.timeouts == 1


def test_a_client_at_min_send_rate_is_judged_again_each_window() -> None:
    h, _client, transport, _ = _slow_reader({"min_send_rate": 1000, "min_send_rate_window": 10})
    transport._tempDataLen = 69000  # 11000 bytes in the first 10 s
    h.clock.advance(10)
    assert not _cut(transport)
    transport._tempDataLen = 60000  # 9000 in the next 10
    h.clock.advance(10)
    assert _cut(transport)
    assert h.events("client.min_send_rate")[0]["bytes"] == 9000


def test_short_stalls_add_up_to_a_window() -> None:
    """A client that drains its buffer in bursts, 64 KiB every 8 s, is too slow for
    20,000 bytes/s although no single stall lasts a window."""
    h, _client, transport, exchange = _slow_reader(
        {"min_send_rate": 20000, "min_send_rate_window": 10}
    )
    h.clock.advance(8)
    transport._tempDataLen = 0
    exchange.resumeProducing()  # 80,000 bytes taken in 8 s
    h.origin.respond(b"x" * 65536)
    transport._tempDataLen = 65536
    exchange.pauseProducing()
    h.clock.advance(8)
    transport._tempDataLen = 0
    exchange.resumeProducing()  # 145,536 bytes in 16 s of stalls: 9096 bytes/s
    assert not _cut(transport), "judged once the event that resumed us is over"
    h.clock.advance(0)
    assert _cut(transport)
    [event] = h.events("client.min_send_rate")
    assert (event["bytes"], event["seconds"]) == (145536, 16)


def test_a_fast_reader_is_never_judged_on_a_blip() -> None:
    h, _client, transport, exchange = _slow_reader(
        {"min_send_rate": 20000, "min_send_rate_window": 10}
    )
    for _ in range(100):  # stalls of 0.01 s that the client clears at once
        h.clock.advance(0.01)
        transport._tempDataLen = 0
        exchange.resumeProducing()
        h.clock.advance(1)
        h.origin.respond(b"x" * 65536)
        transport._tempDataLen = 65536
        exchange.pauseProducing()
    assert not _cut(transport)
    assert not h.events("client.min_send_rate")


def test_min_send_rate_needs_a_transport_it_can_see_into() -> None:
    """Over a transport whose buffer we cannot measure, only send_timeout applies."""
    h = Harness(listener={"min_send_rate": 1000, "send_timeout": 30})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    client._queue[0].pauseProducing()
    h.clock.advance(29)
    assert not _cut(transport)
    h.clock.advance(1.1)
    assert _cut(transport)
    assert h.events("client.send_timeout") and not h.events("client.min_send_rate")


def test_a_response_over_is_not_judged_afterwards() -> None:
    """Once the whole response is queued, the origin's side is done: the slow reader
    left is the idle timeout's (and a close's send deadline's)."""
    h, _client, transport, exchange = _slow_reader(
        {"min_send_rate": 20000, "min_send_rate_window": 10}, length=200000
    )
    h.clock.advance(8)
    transport._tempDataLen = 0
    exchange.resumeProducing()  # 80,000 bytes in 8 s: too slow, but not a window yet
    h.origin.respond(b"x" * 65536)
    transport._tempDataLen = 65536
    exchange.pauseProducing()
    h.clock.advance(3)
    h.origin.respond(b"x" * (200000 - 100000 - 65536))  # the response ends while held back
    h.clock.advance(0)
    h.clock.advance(20)
    assert not _cut(transport)
    assert not h.events("client.min_send_rate")
    assert [a.get("aborted") for a in h.events("access")] == [None]


def test_what_a_client_took_counts_the_kernels_send_queue_too() -> None:
    """Over a real TCP connection whose reader does not read, the bytes still queued are
    those of our buffer plus those the kernel holds unacknowledged."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(listener.getsockname())
    writer, _ = listener.accept()
    listener.close()
    try:
        writer.setblocking(False)
        sent = 0
        try:
            while sent < 1 << 24:
                sent += writer.send(b"x" * 65536)
        except BlockingIOError:
            pass

        transport = tcp.Connection(writer, Protocol(), Clock())  # type: ignore[no-untyped-call]
        transport.dataBuffer = b"y" * 500  # what write() queued, 100 bytes of it sent
        transport.offset = 100
        waiting = queued(transport)
        assert waiting is not None
        print(f"\n{sent} bytes sent, {waiting - 400} in the kernel's send queue")
        assert 400 < waiting <= sent + 400
        assert queued(HalfCloseTransport()) is None, "a transport we do not see into"
    finally:
        reader.close()
        writer.close()
