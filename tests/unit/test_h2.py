"""
HTTP/2 on the client hop, driven frame by frame over a StringTransport with a Clock: an h2
client state machine plays the browser, hand-made frames play the attacker, and the fake
origin plays the pooled HTTP/1.1 upstream.
"""

from __future__ import annotations

import json
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from fakes import OK_RESPONSE, HalfCloseTransport, Harness
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet.address import IPv4Address

from persistproxy.http.h2_connection import CONTROL_FRAMES_PER_SECOND, H2Connection
from persistproxy.http.h2_defences import PREFACE
from persistproxy.http.negotiate import NegotiatingConnection

GET = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"example.com"),
    (b":path", b"/a?q=1"),
    (b"user-agent", b"test"),
]


def request(path: bytes = b"/a?q=1", method: bytes = b"GET", *extra: tuple[bytes, bytes]) -> Any:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", b"example.com"),
        (b":path", path),
        *extra,
    ]


class Client:
    """An HTTP/2 client (h2's state machine) wired to one server connection in memory."""

    def __init__(self, h: Harness, settings: dict[int, int] | None = None) -> None:
        self.h = h
        # It sends what it is told, so that tests can send what browsers never would.
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.conn.initiate_connection()
        self.server = H2Connection(h.ctx, "10.1.2.3", h.clock.seconds())
        self.transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        self.server.makeConnection(self.transport)
        self.events: list[Any] = []
        self.auto_ack = True
        self.pump()

    def pump(self) -> list[Any]:
        """Move bytes both ways until nothing moves; returns the client's new events."""
        new: list[Any] = []
        for _ in range(50):
            data = self.conn.data_to_send()
            if data:
                self.server.dataReceived(data)
            self.h.clock.advance(0)
            out = self.transport.value()
            self.transport.clear()
            if out:
                events = self.conn.receive_data(out)
                for event in events:
                    if self.auto_ack and isinstance(event, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                new += events
            if not data and not out:
                break
        self.events += new
        return new

    def get(self, sid: int, headers: Any = None, end: bool = True) -> None:
        self.conn.send_headers(sid, headers or GET, end_stream=end)
        self.pump()

    def of(self, kind: type, sid: int | None = None) -> list[Any]:
        return [
            e for e in self.events if isinstance(e, kind) and (sid is None or e.stream_id == sid)
        ]

    def response(self, sid: int) -> tuple[dict[bytes, bytes], bytes]:
        (head,) = self.of(h2.events.ResponseReceived, sid)
        body = b"".join(e.data for e in self.of(h2.events.DataReceived, sid))
        return dict(head.headers), body


class Raw:
    """A peer that writes frames by hand (the attacker), reading nothing back."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.server = H2Connection(h.ctx, "10.6.6.6", h.clock.seconds())
        self.transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.6.6.6", 6666))
        self.server.makeConnection(self.transport)
        self.encoder = Encoder()
        self.send(PREFACE, SettingsFrame(0))

    def send(self, *parts: bytes | Frame) -> None:
        data = b"".join(p if isinstance(p, bytes) else p.serialize() for p in parts)
        self.server.dataReceived(data)
        self.h.clock.advance(0)

    def headers(self, sid: int, fields: Any = None, flags: tuple[str, ...] = ()) -> HeadersFrame:
        block = self.encoder.encode(fields or GET)
        return HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM", *flags])

    def frames(self) -> list[Frame]:
        """The frames the server wrote so far (its preface SETTINGS included)."""
        data = self.transport.value()
        frames = []
        while len(data) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9 : 9 + length]))
            frames.append(frame)
            data = data[9 + length :]
        return frames

    def goaway(self) -> GoAwayFrame | None:
        found = [f for f in self.frames() if isinstance(f, GoAwayFrame)]
        return found[-1] if found else None


def access(h: Harness) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in h.log_stream.getvalue().splitlines()
        if '"event": "access"' in line
    ]


CHUNKED_OK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


# -- requests and responses ------------------------------------------------------------------


def test_a_request_crosses_to_http11_and_its_response_comes_back_as_http2() -> None:
    """RFC 9113 8.3.1 and 8.2.3: :authority becomes Host, cookie crumbs are joined; the
    response's fields arrive in lower case, with its body and END_STREAM."""
    h = Harness()
    c = Client(h)
    c.get(1, request(b"/a?q=1", b"GET", (b"cookie", b"a=1"), (b"cookie", b"b=2")))
    sent = h.origin.sent()
    assert sent.startswith(b"GET /a?q=1 HTTP/1.1\r\n")
    assert b"host: example.com\r\n" in sent
    assert b"cookie: a=1; b=2\r\n" in sent
    assert b"via: 2 persistproxy\r\n" in sent
    assert b"x-forwarded-for: 10.1.2.3\r\n" in sent
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Thing: Yes\r\n\r\nhello")
    c.pump()
    headers, body = c.response(1)
    assert headers[b":status"] == b"200" and headers[b"x-thing"] == b"Yes"
    assert body == b"hello"
    assert c.of(h2.events.StreamEnded, 1)
    (line,) = access(h)
    assert (line["version"], line["stream"], line["status"], line["path"]) == ("2", 1, 200, "/a")
    assert h.pool.idle == 1


def test_concurrent_streams_borrow_one_pooled_connection_each_and_reuse_them() -> None:
    h = Harness()
    c = Client(h)
    for sid in (1, 3, 5):
        c.conn.send_headers(sid, GET, end_stream=True)
    c.pump()
    assert len(h.origin.connections) == 3
    for i in range(3):
        h.origin.respond(OK_RESPONSE, i)
    c.pump()
    assert [c.response(sid)[1] for sid in (1, 3, 5)] == [b"hello"] * 3
    for sid in (7, 9, 11):
        c.conn.send_headers(sid, GET, end_stream=True)
    c.pump()
    assert len(h.origin.connections) == 3, "the pooled connections are reused"
    assert [conn.requests for conn in h.origin.connections] == [2, 2, 2]
    assert h.stats.h2_requests == 6 == h.stats.requests_total


@pytest.mark.parametrize(
    "field",
    [
        (b"connection", b"keep-alive"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"te", b"gzip"),
        (b"X-Upper", b"case"),
        (b"x-bad", b" leading space"),
    ],
)
def test_malformed_requests_are_a_stream_error_and_never_reach_the_origin(
    field: tuple[bytes, bytes],
) -> None:
    """RFC 9113 8.2: connection-specific fields, TE other than trailers, upper-case names."""
    h = Harness()
    c = Client(h)
    c.get(1, request(b"/", b"GET", field))
    (reset,) = c.of(h2.events.StreamReset, 1)
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
    assert h.origin.connections == []
    c.get(3)  # the connection goes on
    assert len(h.origin.connections) == 1


def test_te_trailers_is_passed_on_as_hop_by_hop() -> None:
    h = Harness()
    c = Client(h)
    c.get(1, request(b"/", b"GET", (b"te", b"trailers")))
    assert b"te: trailers\r\nconnection: te\r\n" in h.origin.sent()


def test_refused_requests_get_an_http_error_on_their_stream() -> None:
    h = Harness(listener={"max_header_count": 3})
    c = Client(h)
    c.get(1, request(b"/", b"CONNECT"))
    c.get(3, request(b"/", b"GET", *[(b"x-%d" % i, b"v") for i in range(4)]))
    c.get(5, request(b"/", b"GET", (b"host", b"other.example")))
    statuses = [c.response(sid)[0][b":status"] for sid in (1, 3, 5)]
    assert statuses == [b"501", b"431", b"400"]
    assert h.origin.connections == []
    assert [line["status"] for line in access(h)] == [501, 431, 400]


def test_request_body_with_length_and_chunked_with_trailers() -> None:
    h = Harness()
    c = Client(h)
    c.conn.send_headers(1, request(b"/up", b"POST", (b"content-length", b"6")))
    c.conn.send_data(1, b"abc")
    c.pump()
    c.conn.send_data(1, b"def", end_stream=True)
    c.pump()
    assert h.origin.sent().endswith(b"content-length: 6\r\n\r\nabcdef")
    h.origin.respond(OK_RESPONSE)
    c.pump()
    # No length: chunked upstream, and the client's trailers end the body.
    c.conn.send_headers(3, request(b"/up", b"POST"))
    c.conn.send_data(3, b"xyz")
    c.conn.send_headers(3, [(b"x-checksum", b"42")], end_stream=True)
    c.pump()
    sent = h.origin.sent()
    assert b"transfer-encoding: chunked\r\n" in sent
    assert sent.endswith(b"3\r\nxyz\r\n0\r\nx-checksum: 42\r\n\r\n")


def test_response_trailers_reach_the_client() -> None:
    h = Harness()
    c = Client(h)
    c.get(1)
    h.origin.respond(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        b"0\r\nX-Checksum: 42\r\nContent-Type: text/plain\r\n\r\n"
    )
    c.pump()
    (trailers,) = c.of(h2.events.TrailersReceived, 1)
    assert trailers.headers == [(b"x-checksum", b"42")], "framing fields are not trailers"
    assert c.response(1)[1] == b"hello"
    assert h.pool.idle == 1


def test_interim_responses_and_upstream_errors() -> None:
    h = Harness()
    c = Client(h)
    c.get(1)
    h.origin.refuse = True
    c.get(3, request(b"/new"))  # needs a second connection, which is refused
    assert c.response(3)[0][b":status"] == b"502"
    h.origin.respond(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + OK_RESPONSE)
    c.pump()
    (interim,) = c.of(h2.events.InformationalResponseReceived, 1)
    assert (b":status", b"103") in interim.headers
    assert c.response(1)[1] == b"hello"


def test_a_failure_after_the_response_began_resets_the_stream() -> None:
    h = Harness()
    c = Client(h)
    c.get(1)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    h.origin.close()
    c.pump()
    (reset,) = c.of(h2.events.StreamReset, 1)
    assert reset.error_code == ErrorCodes.INTERNAL_ERROR
    (line,) = access(h)
    assert (line["status"], line["aborted"]) == (200, "upstream")


def test_a_client_reset_cancels_the_exchange_with_a_499_line() -> None:
    h = Harness()
    c = Client(h)
    c.get(1)
    c.conn.reset_stream(1)
    c.pump()
    assert h.origin.connections[0].transport.disconnecting, "the request cannot be recalled"
    assert h.pool.idle == 0 and h.pool.active == 0
    (line,) = access(h)
    assert (line["status"], line["aborted"]) == (499, "client")


# -- flow control -----------------------------------------------------------------------------


def test_a_stream_the_client_does_not_read_stalls_alone_and_is_reset_at_send_timeout() -> None:
    """Its origin connection is paused; the connection's other streams go on."""
    h = Harness(listener={"send_timeout": 10})
    c = Client(h, settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    c.auto_ack = False
    c.get(1)
    big = b"x" * 5000
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + big)
    c.pump()
    stalled = h.origin.connections[0]
    assert len(c.response(1)[1]) == 1000, "no more than its window"
    assert stalled.transport.producerState == "paused", "its origin is held back"
    c.get(3)
    h.origin.respond(OK_RESPONSE, 1)
    c.pump()
    assert c.response(3)[1] == b"hello", "the other stream is not held up"
    h.clock.advance(9)
    c.pump()
    assert not c.of(h2.events.StreamReset, 1)
    c.conn.increment_flow_control_window(2000, 1)  # it reads a little: the timer restarts
    c.pump()
    assert len(c.response(1)[1]) == 3000
    h.clock.advance(9)
    c.pump()
    assert not c.of(h2.events.StreamReset, 1)
    h.clock.advance(2)
    c.pump()
    (reset,) = c.of(h2.events.StreamReset, 1)
    assert reset.error_code == ErrorCodes.CANCEL
    assert stalled.transport.disconnecting
    line = next(line for line in access(h) if line["stream"] == 1)
    assert line["aborted"] == "timeout"
    assert not c.transport.disconnecting


def test_request_body_windows_reopen_only_as_the_origin_takes_the_body() -> None:
    h = Harness()
    c = Client(h)
    c.conn.send_headers(1, request(b"/up", b"POST", (b"content-length", b"200000")))
    c.pump()
    upstream = h.origin.connections[0]
    stream = c.server._streams[1]
    stream.pauseProducing()  # what the upstream transport does when its buffer is full
    window = c.conn.local_flow_control_window(1)
    for _ in range(3):
        c.conn.send_data(1, b"a" * 16000)
    c.pump()
    assert c.conn.local_flow_control_window(1) == window - 48000, "not acknowledged"
    stream.resumeProducing()
    c.pump()
    assert c.conn.local_flow_control_window(1) == window, "acknowledged once taken"
    assert upstream.transport.value().endswith(b"a" * 48000)


# -- governance -------------------------------------------------------------------------------


def test_keepalive_timeout_counts_from_the_last_stream_then_goaway() -> None:
    h = Harness(listener={"keepalive_timeout": 5})
    c = Client(h)
    c.get(1)
    h.clock.advance(20)  # a stream is open: no idle timeout
    c.pump()
    assert not c.of(h2.events.ConnectionTerminated)
    h.origin.respond(OK_RESPONSE)
    c.pump()
    h.clock.advance(4.9)
    c.pump()
    assert not c.of(h2.events.ConnectionTerminated)
    h.clock.advance(0.2)
    c.pump()
    (goaway,) = c.of(h2.events.ConnectionTerminated)
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, 1)
    assert c.transport.write_closed


def test_keepalive_timeout_zero_closes_after_the_last_stream_with_its_response_out() -> None:
    h = Harness(listener={"keepalive_timeout": 0})
    raw = Raw(h)
    raw.send(raw.headers(1))
    h.origin.respond(OK_RESPONSE)
    h.clock.advance(0)
    frames = raw.frames()
    kinds = [type(f).__name__ for f in frames if f.stream_id == 1 or isinstance(f, GoAwayFrame)]
    assert kinds == ["HeadersFrame", "DataFrame", "GoAwayFrame"]
    assert raw.goaway().last_stream_id == 1
    assert raw.transport.write_closed


def test_max_requests_sends_goaway_with_the_last_stream_and_refuses_later_ones() -> None:
    h = Harness(listener={"max_requests": 2})
    raw = Raw(h)
    raw.send(raw.headers(1), raw.headers(3))
    assert raw.goaway().last_stream_id == 3
    raw.send(raw.headers(5))
    refused = [f for f in raw.frames() if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in refused] == [(5, ErrorCodes.REFUSED_STREAM)]
    assert not raw.transport.write_closed, "the streams begun finish first"
    h.origin.respond(OK_RESPONSE, 0)
    assert not raw.transport.write_closed
    h.origin.respond(OK_RESPONSE, 1)
    h.clock.advance(0)
    assert raw.transport.write_closed
    assert [line["status"] for line in access(h)] == [200, 200]


def test_drain_refuses_new_streams_and_closes_after_the_last() -> None:
    h = Harness()
    raw = Raw(h)
    raw.send(raw.headers(1))
    assert raw.server.close_if_idle() is False
    assert raw.goaway().last_stream_id == 1
    raw.send(raw.headers(3))
    refused = [f for f in raw.frames() if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in refused] == [(3, ErrorCodes.REFUSED_STREAM)]
    assert len(h.origin.connections) == 1
    h.origin.respond(OK_RESPONSE)
    h.clock.advance(0)
    assert raw.transport.write_closed


def test_header_timeout_for_the_first_request_and_for_an_unfinished_header_block() -> None:
    h = Harness(listener={"header_timeout": 10})
    silent = Raw(h)
    h.clock.advance(10.1)
    assert silent.transport.write_closed, "a connection that never asks is closed"
    slow = Raw(h)
    h.clock.advance(5)
    block = slow.encoder.encode(GET)
    slow.send(HeadersFrame(1, data=block[:5], flags=["END_STREAM"]))
    h.clock.advance(4)
    assert not slow.transport.write_closed
    h.clock.advance(1.1)
    assert slow.transport.write_closed
    assert h.stats.timeouts == 1 and h.origin.connections == []


def test_per_client_idle_limit_reaps_an_idle_http2_connection() -> None:
    from persistproxy.listener.limits import ConnectionLimits

    h = Harness()
    h.ctx.limits = ConnectionLimits(
        listener="web", max_connections=100, per_client=0, idle_per_client=1, log=h.log,
        stats=h.stats,
    )
    first, second = Client(h), Client(h)
    for c in (first, second):
        c.get(1)
        h.origin.respond(OK_RESPONSE)
        c.pump()
    first.pump()
    assert first.of(h2.events.ConnectionTerminated), "the oldest idle one was reaped"
    assert not second.of(h2.events.ConnectionTerminated)


# -- defences: each test plays the attacker --------------------------------------------------


def test_rapid_reset_is_capped_then_goaway_enhance_your_calm() -> None:
    """CVE-2023-44487: open and reset streams as fast as possible."""
    h = Harness()
    raw = Raw(h)
    sid = 1
    for _ in range(50):
        frames: list[Frame] = []
        for _ in range(20):
            frames += [raw.headers(sid), RstStreamFrame(sid, error_code=ErrorCodes.CANCEL)]
            sid += 2
        raw.send(*frames)
        if raw.transport.disconnecting or raw.transport.write_closed:
            break
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    reached = len(h.origin.connections)
    print(f"rapid reset: {sid // 2} streams opened and reset, {reached} reached the origin")
    assert reached <= 2 * 128


def test_continuation_flood_is_cut_at_the_head_size_limit() -> None:
    """CVE-2024-27316: a header block that never ends."""
    h = Harness(listener={"max_head_size": 4096, "max_header_count": 10})
    raw = Raw(h)
    raw.send(HeadersFrame(1, data=b"\x82", flags=["END_STREAM"]))
    sent = 0
    for _ in range(100):
        raw.send(ContinuationFrame(1, data=b"\x40\x01a\x7f" + b"b" * 1000))
        sent += 1004
        if raw.goaway() is not None:
            break
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    print(f"continuation flood: cut after {sent} bytes of header block")
    assert sent < 4096 + 32 * 10 + 2000
    assert h.origin.connections == []


def test_hpack_bomb_is_bounded_by_the_head_size() -> None:
    """A small block that references one large dynamic-table entry many times."""
    h = Harness(listener={"max_head_size": 4096, "max_header_count": 100})
    raw = Raw(h)
    encoder = raw.encoder
    first = encoder.encode([*GET, (b"x-bomb", b"z" * 3000)])  # enters the dynamic table
    raw.send(HeadersFrame(1, data=first, flags=["END_HEADERS", "END_STREAM"]))
    assert len(h.origin.connections) == 1
    # Index 62 is the newest dynamic entry: 1 byte (0xbe) per 3 KiB decoded; 45 KiB in all,
    # under h2's own default bound (64 KiB), over the listener's.
    bomb = encoder.encode(GET) + b"\xbe" * 15
    raw.send(HeadersFrame(3, data=bomb, flags=["END_HEADERS", "END_STREAM"]))
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert len(h.origin.connections) == 1


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_ping_and_settings_floods_are_cut(kind: str) -> None:
    h = Harness()
    raw = Raw(h)
    frame = PingFrame(0, opaque_data=b"12345678") if kind == "ping" else SettingsFrame(0)
    for _ in range(10):
        raw.send(*[frame] * 30)
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    answers = [f for f in raw.frames() if isinstance(f, type(frame))]
    print(f"{kind} flood: 300 sent, {len(answers)} answered")
    assert len(answers) <= CONTROL_FRAMES_PER_SECOND + 2  # and our own SETTINGS, and its ACK


def test_a_peer_that_never_opens_the_connection_window_meets_send_timeout() -> None:
    h = Harness(listener={"send_timeout": 30})
    raw = Raw(h)
    raw.send(raw.headers(1))
    body = b"y" * 70000  # more than the 65535 of the connection's initial window
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    h.clock.advance(0)
    data = [f for f in raw.frames() if isinstance(f, DataFrame)]
    assert sum(len(f.data) for f in data) == 65535
    h.clock.advance(31)
    resets = [f for f in raw.frames() if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(1, ErrorCodes.CANCEL)]
    assert h.stats.timeouts == 1


def test_a_peer_that_stops_reading_stops_being_read() -> None:
    h = Harness(listener={"send_timeout": 30, "header_timeout": 100})
    raw = Raw(h)
    raw.server.pauseProducing()  # what the transport does once its buffer is full
    assert raw.transport.producerState == "paused"
    h.clock.advance(31)
    assert raw.transport.disconnecting, "aborted at send_timeout"


def test_data_on_a_window_never_granted_is_a_flow_control_error() -> None:
    h = Harness()
    raw = Raw(h)
    raw.send(
        HeadersFrame(1, data=raw.encoder.encode(request(b"/", b"POST")), flags=["END_HEADERS"])
    )
    raw.send(*[DataFrame(1, data=b"d" * 16384) for _ in range(5)])
    goaway = raw.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_window_update_to_a_closed_window_does_not_leak() -> None:
    h = Harness()
    raw = Raw(h)
    raw.send(WindowUpdateFrame(0, window_increment=1000), raw.headers(1))
    assert len(h.origin.connections) == 1


# -- choosing the protocol --------------------------------------------------------------------


def _negotiating(h: Harness, cleartext: bool, alpn: bytes | None = None) -> Any:
    connection = NegotiatingConnection(h.ctx, cleartext=cleartext)
    transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
    if alpn is not None:
        transport.negotiatedProtocol = alpn  # type: ignore[attr-defined]
    connection.makeConnection(transport)
    return connection, transport


def test_h2c_prior_knowledge_is_recognised_even_byte_by_byte() -> None:
    from persistproxy.http.client_connection import ClientConnection

    h = Harness()
    connection, _ = _negotiating(h, cleartext=True)
    for byte in PREFACE:
        connection.dataReceived(bytes([byte]))
    assert isinstance(connection.inner, H2Connection)
    connection, _transport = _negotiating(h, cleartext=True)
    connection.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(connection.inner, ClientConnection)
    assert h.origin.sent().startswith(b"GET / HTTP/1.1")


@pytest.mark.parametrize("alpn", [b"h2", b"http/1.1", None])
def test_alpn_decides_and_anything_but_h2_is_http11(alpn: bytes | None) -> None:
    from persistproxy.http.client_connection import ClientConnection

    h = Harness()
    connection, _transport = _negotiating(h, cleartext=False, alpn=alpn)
    if alpn == b"h2":
        connection.dataReceived(PREFACE + SettingsFrame(0).serialize())
        assert isinstance(connection.inner, H2Connection)
    else:
        connection.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert isinstance(connection.inner, ClientConnection)


def test_without_h2_the_listener_builds_the_http11_protocol_directly() -> None:
    from persistproxy.http.client_connection import ClientConnection
    from persistproxy.http.plugin import HTTPProtocolPlugin, NegotiatingFactory

    plugin = HTTPProtocolPlugin()
    h = Harness()
    context: Any = type(
        "Ctx",
        (),
        {
            "clock": h.clock,
            "log": h.log,
            "access_log": None,
            "upstream": lambda self, name, connector: h.group,
            "stats": lambda self, name: h.stats,
            "limits": lambda self, name: None,
            "draining": lambda self: False,
        },
    )()
    plain = plugin.build_factory(h.listener_config, context)
    assert isinstance(plain.buildProtocol(None), ClientConnection)
    from dataclasses import replace

    h2c = plugin.build_factory(replace(h.listener_config, extra={"h2c": True}), context)
    assert isinstance(h2c, NegotiatingFactory)


def test_config_keys_are_checked() -> None:
    from dataclasses import replace

    from persistproxy.http.plugin import HTTPProtocolPlugin
    from persistproxy.interfaces import ConfigError

    plugin = HTTPProtocolPlugin()
    base = Harness().listener_config

    def problem(**extra: Any) -> str:
        with pytest.raises(ConfigError) as e:
            plugin.validate(replace(base, extra=extra))
        return str(e.value)

    assert problem(h2c="yes") == "h2c: expected true or false, got 'yes'"
    assert problem(h2_max_concurrent_streams=0).startswith("h2_max_concurrent_streams: must be")
    assert problem(h2_max_concurrent_streams=True).startswith(
        "h2_max_concurrent_streams: expected an integer"
    )
    assert problem(h2_push=True) == "h2_push: unknown key"
    with pytest.raises(ConfigError, match="h2c: cleartext HTTP/2 only"):
        plugin.validate(replace(base, extra={"h2c": True}, tls={"alpn": ["h2"]}))
    plugin.validate(replace(base, extra={"h2c": True, "h2_max_concurrent_streams": 10}))


def test_metrics_split_requests_by_version() -> None:
    from persistproxy.metrics import ProxyStats, StatsCollector

    h = Harness()
    c = Client(h)
    c.get(1)
    h.origin.respond(OK_RESPONSE)
    client, _ = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    proxy_stats = ProxyStats(listeners={"web": h.stats})
    families = {m.name: m for m in StatsCollector(proxy_stats, list).collect()}
    samples = {
        s.labels["version"]: s.value
        for s in families["persistproxy_requests_by_version"].samples
        if s.name.endswith("_total")
    }
    assert samples == {"1.x": 1, "2": 1}


def test_the_hook_into_h2s_frame_buffer_is_probed() -> None:
    from persistproxy.http.h2_defences import header_block_probe

    assert header_block_probe() is None, "h2's FrameBuffer internals changed"


def test_check_summary_says_which_listeners_offer_http2() -> None:
    from persistproxy.check import summary
    from persistproxy.config import parse_config
    from persistproxy.http.plugin import HTTPProtocolPlugin

    document = {
        "listener": [{"name": "clear", "bind": "tcp:0", "upstream": "app", "h2c": True}],
        "upstream": [{"name": "app", "servers": ["127.0.0.1:1"]}],
    }
    config = parse_config(document, "t.toml", {"http": HTTPProtocolPlugin().validate})
    assert "HTTP/2 with prior knowledge (h2c)" in next(iter(summary(config)))


def test_with_send_proxy_protocol_streams_pick_connections_of_their_client_connection() -> None:
    """The streams of one HTTP/2 connection share its upstream connections (their PROXY
    protocol header names that connection); another client connection never gets them."""
    from persistproxy.interfaces import ClientAddresses

    h = Harness(upstream={"send_proxy_protocol": "v2"})
    c = Client(h)
    assert c.server.upstream_key == ClientAddresses(
        IPv4Address("TCP", "10.1.2.3", 5555), c.transport.getHost()
    )
    c.get(1)
    h.origin.respond(OK_RESPONSE)
    c.pump()
    c.get(3)
    assert len(h.origin.connections) == 1, "the next stream reuses its connection's"
    h.origin.respond(OK_RESPONSE)
    c.pump()
    other = Client(h)  # connected from the same fake address: say it is another client's
    other.server.upstream_key = ClientAddresses(IPv4Address("TCP", "10.9.9.9", 1), None)
    other.get(1)
    assert len(h.origin.connections) == 2, "another client opens its own"
