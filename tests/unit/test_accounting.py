"""
Every exchange that began (asked the pool for an upstream connection, so its head may be at
the origin) ends with exactly one access line and one count, whichever way it ends: the
hardening issue found requests whose head reached the origin and that were never logged.

Each test drives one path to its end over StringTransports with a Clock; the C{ledger}
fixture watches every exchange that starts and every access line, and checks at teardown
that each started exchange was accounted for exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fakes import OK_RESPONSE, Harness, parse_response
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from persistproxy.http.client_connection import ClientConnection
from persistproxy.http.exchange import Exchange

GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"
CHUNKED_HEAD = b"POST /up HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\n\r\n"


class Ledger:
    """The exchanges that started and the ones accounted for, in order."""

    def __init__(self) -> None:
        self.started: list[Exchange] = []
        self.accounted: list[Exchange] = []

    def check(self) -> None:
        ids = [id(e) for e in self.accounted]
        assert len(ids) == len(set(ids)), "an exchange was accounted for twice"
        missing = [
            (e.method, e.target) for e in self.started if all(e is not a for a in self.accounted)
        ]
        assert not missing, f"began upstream but never accounted for: {missing}"


@pytest.fixture(autouse=True)
def ledger(monkeypatch: pytest.MonkeyPatch) -> Iterator[Ledger]:
    book = Ledger()
    start = Exchange.start
    account = ClientConnection._account

    def recording_start(self: Exchange) -> None:
        if all(self is not e for e in book.started):
            book.started.append(self)
        start(self)

    def recording_account(self: ClientConnection, exchange: Exchange, *args: Any) -> None:
        book.accounted.append(exchange)
        account(self, exchange, *args)

    monkeypatch.setattr(Exchange, "start", recording_start)
    monkeypatch.setattr(ClientConnection, "_account", recording_account)
    yield book
    book.check()


def _lines(h: Harness) -> list[tuple[str, str, int, str | None]]:
    return [(a["method"], a["path"], a["status"], a.get("aborted")) for a in h.events("access")]


def _pooled(h: Harness) -> Any:
    """A client connection whose first exchange left its upstream connection in the pool."""
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert h.pool.idle == 1
    transport.clear()
    return client, transport


def _gone(client: ClientConnection) -> None:
    client.connectionLost(Failure(ConnectionDone()))


# -- the request turns out bad or slow after its head went up ----------------------------------


def test_a_chunked_body_malformed_after_its_head_went_up_a_pooled_connection(
    ledger: Ledger,
) -> None:
    """The issue's case: the head reached the origin over a reused connection, then a chunk
    size turned out malformed; the request had no access line (only a nameless 400 had)."""
    h = Harness()
    client, transport = _pooled(h)
    client.dataReceived(CHUNKED_HEAD + b"1\r\na\r\n")
    upstream = h.origin.connections[0]
    assert len(h.origin.connections) == 1 and upstream.requests == 2, "over the pooled one"
    assert b"POST /up HTTP/1.1\r\n" in h.origin.sent()
    client.dataReceived(b"zz\r\n")
    assert upstream.transport.disconnecting, "the origin never gets the rest"  # type: ignore[union-attr]
    status, headers, _ = parse_response(transport.value())
    assert status == 400 and headers[b"connection"] == [b"close"]
    assert transport.write_closed
    _gone(client)
    assert _lines(h) == [("GET", "/a", 200, None), ("POST", "/up", 400, "bad_request")]
    assert h.stats.responses == {2: 1, 4: 1} and h.stats.aborted == {"bad_request": 1}
    assert h.stats.bad_requests == 1 and len(ledger.started) == 2


def test_a_malformed_chunk_while_the_connection_is_still_being_opened() -> None:
    """Begun, but its connection is not up yet: it is logged, and the connection, once up,
    goes to the pool without a byte of the request."""
    h = Harness()
    h.origin.pending = []
    client, transport = h.client()
    client.dataReceived(CHUNKED_HEAD + b"1\r\na\r\nzz\r\n")
    assert parse_response(transport.value())[0] == 400
    h.origin.pending[0].callback(None)
    assert h.origin.sent() == b"" and h.pool.idle == 1
    _gone(client)
    assert _lines(h) == [("POST", "/up", 400, "bad_request")]


def test_a_body_timeout_after_the_head_went_up() -> None:
    h = Harness(listener={"body_timeout": 5})
    client, transport = _pooled(h)
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert h.origin.sent().endswith(b"abc")
    h.clock.advance(5.1)
    assert parse_response(transport.value())[0] == 408
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]
    _gone(client)
    assert _lines(h)[1:] == [("POST", "/up", 408, "timeout")]
    assert h.stats.timeouts == 1 and h.stats.aborted == {"timeout": 1}


def test_a_body_below_min_body_rate_after_the_head_went_up() -> None:
    h = Harness(listener={"min_body_rate": 1000, "min_body_rate_window": 10})
    client, transport = _pooled(h)
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n")
    client.dataReceived(b"x" * 5000)
    h.clock.advance(10)
    client.dataReceived(b"x" * 1000)  # 6000 bytes in 10 s
    assert parse_response(transport.value())[0] == 408
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]
    _gone(client)
    assert _lines(h)[1:] == [("POST", "/up", 408, "timeout")]


def test_a_chunked_body_over_max_body_size_after_the_head_went_up() -> None:
    h = Harness(listener={"max_body_size": 10})
    client, transport = _pooled(h)
    client.dataReceived(CHUNKED_HEAD + b"8\r\n12345678\r\n")
    client.dataReceived(b"8\r\n12345678\r\n")
    assert parse_response(transport.value())[0] == 413
    _gone(client)
    assert _lines(h)[1:] == [("POST", "/up", 413, "bad_request")]


def test_trailers_over_max_header_count_after_the_head_went_up() -> None:
    h = Harness(listener={"max_header_count": 4})
    client, transport = _pooled(h)
    client.dataReceived(CHUNKED_HEAD + b"1\r\na\r\n")
    client.dataReceived(b"0\r\nT1: 1\r\nT2: 2\r\nT3: 3\r\n\r\n")
    assert parse_response(transport.value())[0] == 431
    _gone(client)
    assert _lines(h)[1:] == [("POST", "/up", 431, "bad_request")]


def test_a_malformed_chunk_after_a_100_continue() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(CHUNKED_HEAD.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
    h.origin.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
    client.dataReceived(b"1\r\na\r\nzz\r\n")
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request")
    _gone(client)
    assert _lines(h) == [("POST", "/up", 400, "bad_request")]


def test_a_malformed_chunk_while_the_response_streams_cuts_with_its_status() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(CHUNKED_HEAD + b"1\r\na\r\n")
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    client.dataReceived(b"zz\r\n")
    assert transport.disconnecting
    _gone(client)
    assert _lines(h) == [("POST", "/up", 200, "bad_request")]


def test_a_malformed_chunk_after_a_complete_early_response() -> None:
    """The origin answered before the body was in: that answer is its one line."""
    h = Harness()
    client, transport = h.client()
    client.dataReceived(CHUNKED_HEAD + b"1\r\na\r\n")
    h.origin.respond(OK_RESPONSE)
    client.dataReceived(b"zz\r\n")
    assert parse_response(transport.value())[0] == 200 and transport.disconnecting
    _gone(client)
    assert _lines(h) == [("POST", "/up", 200, None)]


def test_a_bad_request_pipelined_behind_one_being_answered_never_began() -> None:
    """Nothing of it went up: its line is the placeholder's (with what was parsed of it, and
    no "aborted"), the one before it has its own."""
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET + CHUNKED_HEAD + b"1\r\na\r\nzz\r\n")
    h.origin.respond(OK_RESPONSE)
    out = transport.value()
    assert out.index(b"HTTP/1.1 200 OK") < out.index(b"HTTP/1.1 400 Bad Request")
    assert b"POST" not in h.origin.sent()
    _gone(client)
    assert _lines(h) == [("GET", "/a", 200, None), ("POST", "/up", 400, None)]


# -- retries, connects and the pool ------------------------------------------------------------


def test_a_stale_connection_retried_on_a_connect_that_fails() -> None:
    h = Harness()
    client, transport = _pooled(h)
    client.dataReceived(GET)
    h.origin.refuse = True
    h.origin.close(0)  # the origin dropped the pooled connection as the request went
    assert parse_response(transport.value())[0] == 502
    _gone(client)
    [_, line] = h.events("access")
    assert (line["status"], line["retries"], line.get("aborted")) == (502, 1, None)


def test_a_client_gone_while_its_retry_connects() -> None:
    h = Harness()
    client, _transport = _pooled(h)
    client.dataReceived(GET)
    h.origin.pending = []
    h.origin.close(0)
    assert len(h.origin.pending) == 1, "the retry is connecting"
    _gone(client)
    h.origin.pending[0].callback(None)
    assert h.origin.sent(1) == b"" and h.pool.idle == 1
    assert _lines(h)[1:] == [("GET", "/a", 499, "client")]


def test_a_request_waiting_for_a_connection_times_out_or_finds_the_queue_full() -> None:
    h = Harness(upstream={"max_connections": 1, "queue_size": 1, "queue_timeout": 5})
    first, _ = h.client()
    first.dataReceived(GET)
    waiting, waiting_transport = h.client()
    waiting.dataReceived(GET)
    refused, refused_transport = h.client()
    refused.dataReceived(GET)
    assert parse_response(refused_transport.value())[0] == 503
    h.clock.advance(5.1)
    assert parse_response(waiting_transport.value())[0] == 503
    h.origin.respond(OK_RESPONSE)
    for c in (first, waiting, refused):
        _gone(c)
    assert sorted(line[2] for line in _lines(h)) == [200, 503, 503]


def test_a_client_gone_while_waiting_in_the_pool_queue() -> None:
    h = Harness(upstream={"max_connections": 1, "queue_timeout": 5})
    first, _ = h.client()
    first.dataReceived(GET)
    waiting, _ = h.client()
    waiting.dataReceived(GET)
    _gone(waiting)
    h.origin.respond(OK_RESPONSE)
    _gone(first)
    assert _lines(h) == [("GET", "/a", 499, "client"), ("GET", "/a", 200, None)]
    assert h.origin.connections[0].requests == 1


# -- the origin fails ------------------------------------------------------------------------


def test_an_invalid_response_a_response_timeout_and_a_refused_connect() -> None:
    h = Harness(upstream={"response_timeout": 2})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    assert parse_response(transport.value())[0] == 502
    transport.clear()
    client.dataReceived(GET)
    h.clock.advance(2.1)
    assert parse_response(transport.value())[0] == 504
    transport.clear()
    h.origin.refuse = True
    client.dataReceived(GET)
    assert parse_response(transport.value())[0] == 502
    _gone(client)
    assert [line[2] for line in _lines(h)] == [502, 504, 502]


def test_an_origin_gone_in_the_middle_of_the_request_body() -> None:
    h = Harness()
    client, transport = _pooled(h)
    client.dataReceived(CHUNKED_HEAD + b"1\r\na\r\n")
    h.origin.close(0)
    assert parse_response(transport.value())[0] == 502
    client.dataReceived(b"zz\r\n")  # the rest of the body no longer matters
    _gone(client)
    assert _lines(h)[1:] == [("POST", "/up", 502, None)]


def test_a_malformed_method_after_a_pipelined_request_is_not_named_after_it() -> None:
    """Found by the fuzz: the 501 test looked at the read's first line, here the request
    before the bad one; the refusal got its name (a second line for /a) and a 501."""
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET + b"GE T /b HTTP/1.1\r\nHost: example\r\n\r\n")
    h.origin.respond(OK_RESPONSE)
    out = transport.value()
    assert out.index(b"HTTP/1.1 200 OK") < out.index(b"HTTP/1.1 400 Bad Request")
    _gone(client)
    assert _lines(h) == [("GET", "/a", 200, None), ("-", "-", 400, None)]


def test_an_unknown_method_after_a_pipelined_request_is_a_501_under_its_own_name() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET + b"BREW /b HTTP/1.1\r\nHost: example\r\n\r\n")
    h.origin.respond(OK_RESPONSE)
    assert b"HTTP/1.1 501 Not Implemented" in transport.value()
    _gone(client)
    assert _lines(h) == [("GET", "/a", 200, None), ("BREW", "/b", 501, None)]


def test_a_read_that_begins_in_the_middle_of_a_request_line_is_not_taken_for_one() -> None:
    """Found by the fuzz: "ET /b ..." (the rest of "GET /b ...") is no unknown method."""
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET + b"G")
    client.dataReceived(b"ET /b HTTP/1.1\r\nHost: example\r\n\r\nGE T /c HTTP/1.1\r\n\r\n")
    h.origin.respond(OK_RESPONSE)
    h.origin.respond(OK_RESPONSE)
    assert b"HTTP/1.1 400 Bad Request" in transport.value()
    _gone(client)
    assert _lines(h) == [("GET", "/a", 200, None), ("GET", "/b", 200, None), ("-", "-", 400, None)]
