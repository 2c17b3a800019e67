"""
One persistent HTTP/1.1 connection to an origin (http/upstream_connection.py), over a
StringTransport with a Clock: its states, what it reports to the exchange holding it, the
response framings, hop-by-hop headers stripped, the origin's keep-alive timeout, when it may
carry another request, and what it does with bytes that answer nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
from fakes import OK_RESPONSE, Harness, parse_response
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from persistproxy.config import UpstreamConfig
from persistproxy.http.upstream_connection import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    FRAMING_NONE,
    MAX_RESPONSE_HEAD,
    HTTPConnector,
    UpstreamConnection,
)
from persistproxy.upstream.group import Server

GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"


class Sink:
    """Records what the connection reports, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.body = b""
        #: Which timeout each failure was, if one ("response", "read", "write").
        self.which: list[str] = []

    def response_interim(self, status: int, reason: bytes, headers: list[Any]) -> None:
        self.events.append(("interim", status, headers))

    def response_head(self, status: int, reason: bytes, headers: list[Any], framing: int) -> None:
        self.events.append(("head", status, reason, headers, framing))

    def response_body(self, data: bytes) -> None:
        self.body += data

    def response_complete(self, connection: UpstreamConnection, reusable: bool) -> None:
        self.events.append(("complete", reusable))

    def upstream_failed(self, reason: str, timeout: bool, which: str = "") -> None:
        self.events.append(("failed", reason, timeout))
        self.which.append(which)

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


def _connection(clock: Clock | None = None, **config: Any) -> UpstreamConnection:
    """A connected upstream connection, built the way the pools build them."""
    clock = clock or Clock()
    upstream = UpstreamConfig(name="app", servers=(("127.0.0.1", 8081),), **config)
    factory = HTTPConnector(clock).factory_for(Server("127.0.0.1", 8081, None), upstream)  # type: ignore[arg-type]
    connection = factory.buildProtocol(None)
    assert isinstance(connection, UpstreamConnection)
    assert connection.state == "CONNECTING"
    connection.makeConnection(StringTransport())
    return connection


def _sent(connection: UpstreamConnection) -> bytes:
    transport = connection.transport
    assert isinstance(transport, StringTransport)
    return transport.value()


def _request(connection: UpstreamConnection, method: bytes = b"GET") -> Sink:
    sink = Sink()
    connection.send_head(sink, method + b" / HTTP/1.1\r\nHost: x\r\n\r\n", method, True)
    return sink


def test_one_request_at_a_time_and_nothing_sent_unless_idle() -> None:
    connection = _connection()
    assert connection.state == "IDLE"
    sink = _request(connection)
    assert connection.state == "ACTIVE" and connection.requests == 1
    assert _sent(connection) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    with pytest.raises(RuntimeError, match="state ACTIVE"):
        _request(connection)
    connection.dataReceived(OK_RESPONSE)
    assert sink.kinds() == ["head", "complete"] and sink.body == b"hello"
    assert sink.events[-1] == ("complete", True)
    assert connection.state == "IDLE"
    connection.connectionLost(Failure(ConnectionDone()))
    assert connection.state == "CLOSED"
    with pytest.raises(RuntimeError, match="state CLOSED"):
        _request(connection)


def test_hop_by_hop_and_nominated_headers_never_reach_the_sink() -> None:
    connection = _connection()
    sink = _request(connection)
    connection.dataReceived(
        b"HTTP/1.1 200 Fine\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=30\r\n"
        b"X-Hop: secret\r\nProxy-Authenticate: x\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    [head, complete] = sink.events
    assert head == (
        "head",
        200,
        b"Fine",
        [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Content-Length", b"0")],
        FRAMING_LENGTH,
    )
    assert complete == ("complete", True)


@pytest.mark.parametrize(
    ("method", "response", "framing", "body"),
    [
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", FRAMING_LENGTH, b"abc"),
        (
            b"GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            FRAMING_CHUNKED,
            b"abc",
        ),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", FRAMING_NONE, b""),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", FRAMING_NONE, b""),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n", FRAMING_NONE, b""),
    ],
)
def test_framings_end_the_response_where_it_ends(
    method: bytes, response: bytes, framing: int, body: bytes
) -> None:
    connection = _connection()
    sink = _request(connection, method)
    connection.dataReceived(response)
    assert sink.events[0][4] == framing
    assert sink.events[-1] == ("complete", True) and sink.body == body
    # The next response parses from a clean start (llhttp is reset after a HEAD).
    again = _request(connection)
    connection.dataReceived(OK_RESPONSE)
    assert again.events[-1] == ("complete", True) and again.body == b"hello"


def test_a_close_delimited_body_ends_with_the_connection() -> None:
    connection = _connection()
    sink = _request(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
    connection.dataReceived(b"part two")
    assert sink.events[0][4] == FRAMING_CLOSE and sink.kinds() == ["head"]
    connection.connectionLost(Failure(ConnectionDone()))
    assert sink.events[-1] == ("complete", False)
    assert sink.body == b"part one, part two"


def test_a_connection_lost_before_the_end_of_a_framed_response_is_a_failure() -> None:
    connection = _connection()
    lost: list[UpstreamConnection] = []
    connection.on_lost = lost.append
    sink = _request(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    connection.connectionLost(Failure(ConnectionDone()))
    assert sink.events[-1] == ("failed", "origin closed the connection", False)
    assert lost == [connection], "the pool hears of it"


def test_interim_responses_are_passed_on_before_the_final_one() -> None:
    connection = _connection()
    sink = _request(connection)
    connection.dataReceived(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        + OK_RESPONSE
    )
    assert sink.kinds() == ["interim", "interim", "head", "complete"]
    assert sink.events[1] == ("interim", 103, [(b"Link", b"</s.css>")])
    assert sink.events[-1] == ("complete", True)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_a_response_that_closes_is_not_reusable_and_the_connection_is_closed(
    response: bytes,
) -> None:
    connection = _connection()
    sink = _request(connection)
    connection.dataReceived(response)
    assert sink.events[-1] == ("complete", False)
    assert connection.transport.disconnecting  # type: ignore[union-attr]


def test_max_requests_retires_the_connection_after_its_last_response() -> None:
    connection = _connection(max_requests=2)
    first = _request(connection)
    connection.dataReceived(OK_RESPONSE)
    assert first.events[-1] == ("complete", True)
    second = _request(connection)
    connection.dataReceived(OK_RESPONSE)
    assert second.events[-1] == ("complete", False)
    assert connection.transport.disconnecting  # type: ignore[union-attr]


def test_a_request_whose_body_is_not_all_sent_leaves_the_connection_unusable() -> None:
    connection = _connection()
    sink = Sink()
    connection.send_head(sink, b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n", b"POST", False)
    connection.send_body(b"abc")
    connection.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert sink.events[-1] == ("complete", False), "the origin still waits for 7 bytes"
    done = _connection()
    sink = Sink()
    done.send_head(sink, b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n", b"POST", False)
    done.send_body(b"abc")
    done.finish_request()
    done.dataReceived(OK_RESPONSE)
    assert sink.events[-1] == ("complete", True)


def test_the_origins_keep_alive_timeout_decides_when_it_may_be_reused() -> None:
    clock = Clock()
    connection = _connection(clock)
    assert connection.usable(clock.seconds(), 1.0), "no timeout announced: usable"
    _request(connection)
    connection.dataReceived(
        b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nContent-Length: 0\r\n\r\n"
    )
    assert connection.origin_timeout == 5.0 and connection.expires_at == 5.0
    assert connection.usable(3.9, 1.0)
    assert not connection.usable(4.0, 1.0), "too close to the origin's own close"
    assert connection.usable(2.4, 10.0) and not connection.usable(2.5, 10.0), (
        "the margin is at most half the origin's timeout"
    )
    _request(connection)
    assert not connection.usable(0.0, 1.0), "never while a request is outstanding"


def test_no_response_head_within_response_timeout_fails_with_a_timeout() -> None:
    clock = Clock()
    connection = _connection(clock, response_timeout=2)
    sink = _request(connection)
    clock.advance(1.9)
    assert sink.events == []
    clock.advance(0.2)
    assert sink.events == [("failed", "no response head within 2s", True)]
    assert connection.transport.disconnecting  # type: ignore[union-attr]


class _Producer:
    """The client connection, as the request body's producer."""

    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def test_each_timeout_says_which_it_was() -> None:
    clock = Clock()
    connection = _connection(clock, response_timeout=2)
    sink = _request(connection)
    clock.advance(2.1)
    assert sink.which == ["response"]

    connection = _connection(clock, read_timeout=3)
    sink = _request(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    clock.advance(2.9)
    connection.dataReceived(b"de")
    clock.advance(2.9)
    assert sink.events[-1][0] == "head"
    clock.advance(0.2)
    assert sink.events[-1] == ("failed", "no response bytes for 3s (44 bytes received)", True)
    assert sink.which == ["read"]

    connection = _connection(clock, write_timeout=4)
    sink = Sink()
    connection.send_head(sink, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n",
                         b"POST", False)
    producer = _Producer()
    connection.throttle(producer)
    connection.transport.producer.pauseProducing()  # type: ignore[union-attr]
    assert producer.paused
    clock.advance(3.9)
    assert sink.events == []
    clock.advance(0.2)
    assert sink.events == [("failed", "origin read no request body for 4s", True)]
    assert sink.which == ["write"]


def test_the_response_timeout_ends_with_the_head_and_is_stopped_on_close() -> None:
    clock = Clock()
    connection = _connection(clock, response_timeout=2)
    sink = _request(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    clock.advance(10)  # a slow body is not a response timeout
    assert sink.kinds() == ["head"]
    connection.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_bytes_while_idle_answer_nothing_and_cost_the_connection() -> None:
    connection = _connection()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert connection.transport.disconnecting  # type: ignore[union-attr]


def test_a_response_head_larger_than_the_bound_is_a_failure() -> None:
    connection = _connection()
    sink = _request(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nX-Big: ")
    connection.dataReceived(b"a" * MAX_RESPONSE_HEAD)
    assert sink.events == [
        ("failed", f"response head larger than {MAX_RESPONSE_HEAD} bytes", False)
    ]


def test_an_invalid_response_is_a_failure() -> None:
    connection = _connection()
    sink = _request(connection)
    connection.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    [(kind, reason, timeout)] = sink.events
    assert kind == "failed" and reason.startswith("invalid response from origin") and not timeout


def test_pausing_the_connection_pauses_its_transport_and_completion_resumes_it() -> None:
    connection = _connection()
    sink = _request(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    connection.pauseProducing()
    transport = connection.transport
    assert transport.producerState == "paused"  # type: ignore[union-attr]
    connection.dataReceived(b"def")
    assert sink.events[-1] == ("complete", True)
    assert transport.producerState == "producing", "an idle pooled connection reads"  # type: ignore[union-attr]


def test_connectors_for_one_reactor_are_equal_so_listeners_share_pools() -> None:
    clock = Clock()
    assert HTTPConnector(clock) == HTTPConnector(clock)
    assert hash(HTTPConnector(clock)) == hash(HTTPConnector(clock))
    assert HTTPConnector(clock) != HTTPConnector(Clock())


# -- through a client connection ---------------------------------------------------------------


def test_bytes_after_a_response_in_the_same_read_never_answer_the_next_request() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET + GET)
    h.origin.respond(OK_RESPONSE + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
    assert b"EVIL" not in transport.value()
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]
    assert len(h.origin.connections) == 2, "the next request went to a new connection"
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")
    assert transport.value().endswith(b"good")


def test_unsolicited_101_and_unknown_transfer_codings_are_502() -> None:
    for response in (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ):
        h = Harness()
        client, transport = h.client()
        client.dataReceived(GET)
        h.origin.respond(response)
        assert parse_response(transport.value())[0] == 502, response
