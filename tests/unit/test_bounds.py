"""
What a peer can make the proxy hold or do, bounded (the hardening issue's denial-of-service
section): trailers, chunks, header counts, Content-Length values, bodiless statuses, versions.
Each is driven over StringTransports with a Clock, in both directions where both apply.
"""

from __future__ import annotations

from typing import Any

import pytest
from fakes import OK_RESPONSE, Harness, parse_response

from persistproxy.http.request_body import CHUNK_WINDOW

CHUNKED_POST = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"
CHUNKED_OK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def _count_writes(transport: Any) -> list[bytes]:
    """Record every write() on a StringTransport (and still perform it)."""
    writes: list[bytes] = []
    write = transport.write

    def counting(data: bytes) -> None:
        writes.append(data)
        write(data)

    transport.write = counting
    return writes


def _chunks(data: bytes) -> list[bytes]:
    """The chunk data of a chunked body (up to and without the last chunk)."""
    out = []
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out.append(data[:size])
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]


def _upstream_body(h: Harness) -> bytes:
    return h.origin.sent().partition(b"\r\n\r\n")[2]


# -- trailers --------------------------------------------------------------------------------


def test_a_request_trailer_line_that_never_ends_is_cut_at_max_head_size() -> None:
    """
    llhttp hands httptools the unfinished line piece by piece and it is accumulated: the
    bytes of reads that complete nothing are counted with the head, as while the head is read.
    """
    h = Harness(listener={"max_head_size": 1024})
    client, transport = h.client()
    client.dataReceived(CHUNKED_POST + b"3\r\nabc\r\n0\r\nX-Trailer: ")
    upstream = h.origin.connections[0]
    reads = 0
    while not transport.value():
        client.dataReceived(b"a" * 100)
        reads += 1
        assert reads < 20, "never cut"
    assert 1024 - len(CHUNKED_POST) <= reads * 100 <= 1024 + 100
    status, headers, _ = parse_response(transport.value())
    assert status == 431 and headers[b"connection"] == [b"close"]
    assert transport.write_closed
    assert upstream.transport.disconnecting, "the request was streamed: its upstream is dropped"  # type: ignore[union-attr]
    assert (
        h.events("request.rejected")[0]["reason"] == "request trailers or chunk framing too large"
    )


def test_a_request_trailer_trickled_a_byte_at_a_time_is_cut_too() -> None:
    h = Harness(listener={"max_head_size": 512})
    client, transport = h.client()
    client.dataReceived(CHUNKED_POST + b"0\r\nX: ")
    for _ in range(600):
        client.dataReceived(b"a")
        if transport.value():
            break
    assert parse_response(transport.value())[0] == 431


def test_a_chunk_extension_that_never_ends_is_cut_too() -> None:
    """llhttp skips chunk extensions without a callback: only the byte count sees them."""
    h = Harness(listener={"max_head_size": 1024})
    client, transport = h.client()
    client.dataReceived(CHUNKED_POST + b"3\r\nabc\r\n5;ext=")
    for _ in range(20):
        client.dataReceived(b"e" * 100)
    assert parse_response(transport.value())[0] == 431


def test_complete_trailer_fields_count_with_the_head() -> None:
    h = Harness(listener={"max_head_size": 1024})
    client, transport = h.client()
    client.dataReceived(CHUNKED_POST + b"0\r\n")
    for i in range(40):
        client.dataReceived(b"X-T%d: %s\r\n" % (i, b"v" * 20))
    assert parse_response(transport.value())[0] == 431


def test_trailers_within_bounds_pass() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(CHUNKED_POST + b"3\r\nabc\r\n0\r\nX-T: 1\r\n")
    client.dataReceived(b"Y-T: 2\r\n\r\n")
    assert _upstream_body(h) == b"3\r\nabc\r\n0\r\n\r\n", "trailers are not forwarded"
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[0] == 200


def test_a_pipelined_head_that_never_ends_is_bounded_while_busy() -> None:
    """The head behind a request in flight was never counted ("busy" phase)."""
    h = Harness(listener={"max_head_size": 1024})
    client, transport = h.client()
    client.dataReceived(GET + b"GET /b HTTP/1.1\r\nX: ")
    for _ in range(20):
        client.dataReceived(b"a" * 100)
    assert not transport.value(), "answered in order: /a first"
    h.origin.respond(OK_RESPONSE)
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 431 " in out
    assert h.origin.connections[0].requests == 1


def test_a_response_trailer_that_never_ends_cuts_the_client_connection() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(CHUNKED_OK + b"5\r\nhello\r\n0\r\nX-Trailer: ")
    upstream = h.origin.connections[0]
    for _ in range(64):
        h.origin.respond(b"a" * 1024)
    assert not transport.disconnecting
    h.origin.respond(b"a" * 1024)
    assert transport.disconnecting, "the response had begun: the client connection is cut"
    assert upstream.transport.disconnecting  # type: ignore[union-attr]
    [error] = h.events("upstream.error")
    assert "trailers" in error["reason"]
    [line] = h.events("access")
    assert (line["status"], line["aborted"]) == (200, "upstream")


def test_response_trailers_within_bounds_are_dropped_and_the_connection_reused() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(CHUNKED_OK + b"5\r\nhello\r\n0\r\nX-T: 1\r\n")
    h.origin.respond(b"\r\n")
    _, _, body = parse_response(transport.value())
    assert body == b"5\r\nhello\r\n0\r\n\r\n"
    assert h.pool.idle == 1


# -- chunks ----------------------------------------------------------------------------------


def test_the_chunks_of_one_read_go_upstream_as_one_chunk_in_one_write() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(CHUNKED_POST)
    writes = _count_writes(h.origin.connections[0].transport)
    client.dataReceived(b"".join(b"1\r\n%c\r\n" % c for c in b"0123456789"))
    assert writes == [b"a\r\n0123456789\r\n"]
    client.dataReceived(b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
    assert writes[1:] == [b"5\r\nabcde\r\n", b"0\r\n\r\n"]
    assert _chunks(_upstream_body(h)) == [b"0123456789", b"abcde"]
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[0] == 200


def test_the_chunks_of_one_read_buffered_before_the_connection_are_coalesced() -> None:
    h = Harness()
    h.origin.pending = []
    client, _transport = h.client()
    client.dataReceived(CHUNKED_POST + b"".join(b"1\r\n%c\r\n" % c for c in b"abcdef"))
    client.dataReceived(b"1\r\ng\r\n0\r\n\r\n")
    h.origin.pending[0].callback(None)
    assert _chunks(_upstream_body(h)) == [b"abcdef", b"g"]


def test_the_chunks_of_one_origin_read_reach_the_client_as_one_chunk() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    writes = _count_writes(transport)
    h.origin.respond(CHUNKED_OK + b"".join(b"1\r\n%c\r\n" % c for c in b"0123456789"))
    h.origin.respond(b"".join(b"1\r\n%c\r\n" % c for c in b"abc") + b"0\r\n\r\n")
    _, _, body = parse_response(transport.value())
    assert _chunks(body) == [b"0123456789", b"abc"]
    assert len(writes) == 4, "head, one chunk per read, the last chunk"
    assert h.pool.idle == 1


def test_a_flood_of_tiny_chunks_is_refused() -> None:
    """The second line of defence: CHUNK_WINDOW chunks in under a second, averaging < 16 B."""
    h = Harness()
    client, transport = h.client()
    client.dataReceived(CHUNKED_POST)
    upstream = h.origin.connections[0]
    tiny = b"1\r\nx\r\n" * 1024
    for _ in range(CHUNK_WINDOW // 1024 - 1):
        client.dataReceived(tiny)
    assert not transport.value()
    client.dataReceived(tiny)
    assert parse_response(transport.value())[0] == 400
    assert upstream.transport.disconnecting  # type: ignore[union-attr]
    assert (
        "chunks in under 1s averaging under 16 bytes" in h.events("request.rejected")[0]["reason"]
    )


@pytest.mark.parametrize(
    ("listener", "piece", "seconds"),
    [
        ({}, b"1\r\nx\r\n", 1.0),  # tiny chunks at a human pace: a byte-at-a-time stream
        ({}, b"10\r\n" + b"x" * 16 + b"\r\n", 0.0),  # many chunks, fast, of 16 bytes
        ({"min_chunk_size": 0}, b"1\r\nx\r\n", 0.0),  # the defence switched off
    ],
)
def test_what_the_tiny_chunk_defence_lets_through(
    listener: dict[str, Any], piece: bytes, seconds: float
) -> None:
    h = Harness(listener=listener)
    client, transport = h.client()
    client.dataReceived(CHUNKED_POST)
    for _ in range(3 * CHUNK_WINDOW // 512):
        h.clock.advance(seconds * 512 / CHUNK_WINDOW)
        client.dataReceived(piece * 512)
    client.dataReceived(b"0\r\n\r\n")
    assert not transport.value()
    assert len(_chunks(_upstream_body(h))) == 3 * CHUNK_WINDOW // 512
    h.origin.respond(OK_RESPONSE)
    assert parse_response(transport.value())[0] == 200


# -- header counts ---------------------------------------------------------------------------


def _head_with(fields: int) -> bytes:
    """A request head of C{fields} header fields, Host included."""
    return (
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(fields - 1))
        + b"\r\n"
    )


def test_max_header_count_is_100_by_default() -> None:
    h = Harness()
    client, _transport = h.client()
    client.dataReceived(_head_with(100))
    assert h.origin.sent().count(b"X-") == 99 + 2  # and X-Forwarded-*

    h = Harness()
    client, transport = h.client()
    client.dataReceived(_head_with(101))
    status, _, body = parse_response(transport.value())
    assert status == 431 and b"more than 100 header fields" in body
    assert not h.origin.connections


def test_max_header_count_counts_trailer_fields_too() -> None:
    h = Harness(listener={"max_header_count": 5})
    client, transport = h.client()
    client.dataReceived(CHUNKED_POST + b"0\r\nA: 1\r\nB: 1\r\n")  # 2 + 2 fields
    assert not transport.value()
    client.dataReceived(b"C: 1\r\n")  # 5: the limit
    assert not transport.value()
    client.dataReceived(b"D: 1\r\n\r\n")
    assert parse_response(transport.value())[0] == 431


def test_an_origin_head_with_too_many_fields_is_a_502() -> None:
    h = Harness(upstream={"max_header_count": 10})
    client, transport = h.client()
    client.dataReceived(GET)
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(8))
    h.origin.respond(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n" + fields + b"Content-Length: 0\r\n\r\n"
    )
    assert parse_response(transport.value())[0] == 200

    h = Harness(upstream={"max_header_count": 10})
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n"
        + fields
        + b"X-9: 1\r\nContent-Length: 0\r\n\r\n"
    )
    assert parse_response(transport.value())[0] == 502
    assert "more than 10 header fields" in h.events("upstream.error")[0]["reason"]
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]


# -- Content-Length --------------------------------------------------------------------------


def test_request_content_length_is_forwarded_normalised_and_bounded() -> None:
    h = Harness()
    client, _transport = h.client()
    client.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0005\r\n\r\nhello")
    sent = h.origin.sent()
    assert b"Content-Length: 5\r\n" in sent and b"0005" not in sent
    assert sent.endswith(b"\r\n\r\nhello")

    h = Harness()
    client, _transport = h.client()
    client.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9223372036854775807\r\n\r\n"
    )
    assert b"Content-Length: 9223372036854775807\r\n" in h.origin.sent(), "2^63 - 1 is fine"

    for length in (b"9223372036854775808", b"18446744073709551615"):
        h = Harness()
        client, transport = h.client()
        client.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n" % length)
        status, _, body = parse_response(transport.value())
        assert status == 400 and b"Content-Length too large" in body
        assert not h.origin.connections


def test_response_content_length_is_relayed_normalised_and_bounded() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 005\r\n\r\nhello")
    status, headers, body = parse_response(transport.value())
    assert (status, headers[b"content-length"], body) == (200, [b"5"], b"hello")
    assert h.pool.idle == 1

    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775808\r\n\r\nhello")
    assert parse_response(transport.value())[0] == 502
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]


@pytest.mark.parametrize("status", [204, 304])
def test_a_bodiless_status_loses_its_content_length(status: int) -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET + GET)
    h.origin.respond(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\nETag: e\r\n\r\n" % status)
    h.origin.respond(OK_RESPONSE)
    out = transport.value()
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 %d " % status)
    assert b"content-length" not in first.lower() and b"ETag: e" in first
    status2, _, body = parse_response(rest)
    assert (status2, body) == (200, b"hello")
    assert len(h.origin.connections) == 1, "the upstream connection was reused"


# -- versions --------------------------------------------------------------------------------


def _answer(request: bytes) -> tuple[int, bytes]:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(request)
    assert not h.origin.connections
    status, _, body = parse_response(transport.value())
    return status, body


@pytest.mark.parametrize("version", [b"1.2", b"1.10", b"1.9", b"12.0", b"3.0", b"2.0", b"0.9"])
def test_well_formed_versions_other_than_1x_get_505(version: bytes) -> None:
    status, body = _answer(b"GET / HTTP/%s\r\nHost: x\r\n\r\n" % version)
    assert status == 505
    assert b"HTTP/%s is not supported" % version in body


def test_a_version_behind_a_pipelined_request_gets_505_after_it() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET + b"GET / HTTP/1.2\r\nHost: x\r\n\r\n")
    h.origin.respond(OK_RESPONSE)
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 505 " in out


def test_an_error_elsewhere_is_not_taken_for_a_version_of_a_later_request() -> None:
    """Only a version error looks for a version: a bad header stays a 400."""
    status, _ = _answer(b"GET / HTTP/1.1\r\nHost : x\r\n\r\nGET / HTTP/1.2\r\nHost: x\r\n\r\n")
    assert status == 400


@pytest.mark.parametrize("version", [b"1.1x", b"x.y", b"1.", b"1", b"1.1 "])
def test_malformed_versions_get_400(version: bytes) -> None:
    assert _answer(b"GET / HTTP/%s\r\nHost: x\r\n\r\n" % version)[0] == 400
