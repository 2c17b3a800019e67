"""The hardening issue's denial-of-service section, end to end: the real proxy under twistd in
front of tests/e2e/origin.py, driven with raw sockets.

Memory and CPU bounds are shown by measurements printed in the test output (run with ``-s``
to see them: RSS from /proc/<pid>/status, CPU from /proc/<pid>/stat); the assertions on them
are generous sanity bounds, not timings. Without the fixes, the trailer attacks run until the
test's own limits (64 MiB or 10 s per connection) and the proxy never answers.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2ehelpers import (
    Closed,
    Origin,
    Proxy,
    RawConn,
    proc_cpu_seconds,
    proc_status_kib,
)

ProxyFactory = Callable[..., Proxy]

CHUNKED_HEAD = b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nTransfer-Encoding: chunked\r\n\r\n"
MiB = 1 << 20


def push_until_answered(
    conn: RawConn, first: bytes, filler: bytes, max_bytes: int, max_seconds: float
) -> int:
    """
    Send C{first}, then C{filler} again and again, until the peer answers (or closes), or
    C{max_bytes} / C{max_seconds} run out; returns the bytes of filler sent.
    """
    sock = conn.sock
    sock.sendall(first)
    sock.setblocking(False)
    pushed = 0
    pending = memoryview(b"")
    deadline = time.monotonic() + max_seconds
    try:
        while pushed < max_bytes and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 0.5)
            if readable:
                break
            if writable:
                if not pending:
                    pending = memoryview(filler)
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    continue
                except OSError:
                    break
                pushed += n
                pending = pending[n:]
    finally:
        sock.settimeout(conn.timeout)
    return pushed


def rss(proxy: Proxy) -> int:
    return proc_status_kib(proxy.pid)


# -- trailers --------------------------------------------------------------------------------


def test_endless_request_trailers_on_8_connections_get_431_in_bounded_memory(
    origin: Origin, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(origin)
    rss0, cpu0 = rss(proxy), proc_cpu_seconds(proxy.pid)

    def attack(_: int) -> tuple[int, int]:
        with RawConn(proxy.port, timeout=5) as c:
            pushed = push_until_answered(
                c, CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-Trailer: ", b"a" * 65536, 64 * MiB, 10
            )
            try:
                return pushed, c.read_response().status
            except (Closed, TimeoutError):
                return pushed, 0  # no answer: printed, then failed below

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attack, range(8)))
    seconds = time.monotonic() - t0
    rss1, cpu1 = rss(proxy), proc_cpu_seconds(proxy.pid)
    pushed = [p for p, _ in results]
    print(
        f"\nendless request trailer, 8 connections: statuses {sorted({s for _, s in results})},"
        f" {sum(pushed) / MiB:.1f} MiB pushed in all (max {max(pushed) / 1024:.0f} KiB on one"
        " connection: bytes sent before an answer came, mostly into socket buffers) in"
        f" {seconds:.2f}s;"
        f" proxy RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB"
        f" (peak {proc_status_kib(proxy.pid, 'VmHWM') / 1024:.1f} MiB), CPU {cpu1 - cpu0:.2f}s"
    )
    assert [s for _, s in results] == [431] * 8
    assert rss1 - rss0 < 32 * 1024, "sanity bound: the issue saw +500 MiB"
    # The proxy's lines reach its stdout through a writer thread, after the answers: wait.
    deadline = time.monotonic() + 5
    while len(rejected := proxy.events("request.rejected")) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(rejected) == 8
    assert {e["reason"] for e in rejected} == {"request trailers or chunk framing too large"}


def test_endless_response_trailer_cuts_the_client_in_bounded_memory(
    fresh_origin: Origin, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(fresh_origin)
    rss0, cpu0 = rss(proxy), proc_cpu_seconds(proxy.pid)
    t0 = time.monotonic()
    with RawConn(proxy.port, timeout=15) as c:
        c.request("GET", "/endless-trailer")
        head = c.read_head()
        assert head.status == 200 and head.get("transfer-encoding") == "chunked"
        got = bytearray(c.buf)
        c.buf.clear()
        while True:
            try:
                c._fill(time.monotonic() + 15)
            except (Closed, TimeoutError):  # a timeout: printed, then failed below
                break
            got += c.buf
            c.buf.clear()
    seconds = time.monotonic() - t0
    rss1, cpu1 = rss(proxy), proc_cpu_seconds(proxy.pid)
    sent = fresh_origin.stats()["endless_trailer_bytes"]
    print(
        f"\nendless response trailer: the origin got {sent / 1024:.0f} KiB of trailer out before"
        f" the cut ({seconds:.2f}s); proxy RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB,"
        f" CPU {cpu1 - cpu0:.2f}s; the client got {bytes(got)!r}"
    )
    assert got == b"5\r\nhello\r\n", "the body so far, then a cut: no last chunk"
    assert sent < 64 * MiB, "sanity bound: the issue saw 70 MB relayed into memory"
    assert rss1 - rss0 < 32 * 1024
    line = proxy.wait_event("access", 5, lambda e: e["path"] == "/endless-trailer")
    assert line is not None and (line["status"], line["aborted"]) == (200, "upstream")
    [error] = proxy.events("upstream.error")
    assert "trailers" in error["reason"]


# -- chunks ----------------------------------------------------------------------------------


def _tiny_chunks(n: int) -> bytes:
    return b"1\r\nx\r\n" * n + b"0\r\n\r\n"


def test_a_megabyte_in_1_byte_chunks_reaches_the_origin_coalesced(
    fresh_origin: Origin, proxy_factory: ProxyFactory
) -> None:
    """With the tiny-chunk defence off, the coalescing alone: CPU, chunks upstream, stalls."""
    proxy = proxy_factory(fresh_origin, listener={"min_chunk_size": 0})
    stalls: list[float] = []
    stop = threading.Event()

    def other_client() -> None:
        with RawConn(proxy.port, timeout=10) as c:
            while not stop.is_set():
                t = time.monotonic()
                assert c.roundtrip("GET", "/echo").status == 200
                stalls.append(time.monotonic() - t)

    watcher = threading.Thread(target=other_client)
    cpu0 = proc_cpu_seconds(proxy.pid)
    watcher.start()
    t0 = time.monotonic()
    with RawConn(proxy.port, timeout=120) as c:
        c.send(CHUNKED_HEAD + _tiny_chunks(MiB))
        response = c.read_response()
    seconds = time.monotonic() - t0
    cpu1 = proc_cpu_seconds(proxy.pid)
    stop.set()
    watcher.join(15)
    echo = response.json()
    print(
        f"\n1 MiB in 1-byte chunks ({len(_tiny_chunks(MiB)) / MiB:.1f} MiB on the wire):"
        f" proxy CPU {cpu1 - cpu0:.2f}s (including {len(stalls)} requests of another client,"
        f" whose slowest took {max(stalls, default=0) * 1000:.1f} ms), {seconds:.2f}s in all;"
        f" the origin got {echo['chunks']} chunks"
    )
    assert echo["body_len"] == MiB and echo["chunked"] is True
    assert echo["chunks"] < MiB // 100, "coalesced: about one chunk per read, not per byte"


def test_a_flood_of_1_byte_chunks_is_refused_early(
    fresh_origin: Origin, proxy_factory: ProxyFactory
) -> None:
    """The second line of defence (min_chunk_size, on by default)."""
    proxy = proxy_factory(fresh_origin)
    cpu0 = proc_cpu_seconds(proxy.pid)
    with RawConn(proxy.port, timeout=20) as c:
        pushed = push_until_answered(c, CHUNKED_HEAD, _tiny_chunks(MiB)[:-5], 7 * MiB, 15)
        response = c.read_response()
    cpu1 = proc_cpu_seconds(proxy.pid)
    chunks = fresh_origin.stats()["chunks"]
    print(
        f"\n1-byte chunk flood: {response.status} after {pushed / 1024:.0f} KiB pushed (part"
        f" still in socket buffers), proxy CPU {cpu1 - cpu0:.2f}s; the origin read {chunks}"
        " chunks before the upstream connection was dropped"
    )
    assert response.status == 400 and b"averaging under 16 bytes" in response.body
    assert chunks < 4096


def test_tiny_response_chunks_reach_the_client_coalesced(origin: Origin, proxy: Proxy) -> None:
    with RawConn(proxy.port) as c:
        response = c.roundtrip("GET", "/tiny-chunks/100000")
    print(f"\n100,000 1-byte chunks from the origin reached the client as {response.chunks}")
    assert response.body == b"x" * 100000
    assert response.chunks < 1000


# -- header counts, lengths, bodiless statuses, versions ----------------------------------------


def _head_with(fields: int, target: str = "/echo") -> bytes:
    """A request head of C{fields} header fields, Host included."""
    lines = [f"GET {target} HTTP/1.1", "Host: e2e.test"]
    lines += [f"X{i}: {i % 10}" for i in range(fields - 1)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_max_header_count(origin: Origin, proxy: Proxy) -> None:
    for fields, status in ((100, 200), (101, 431), (2500, 431)):
        with RawConn(proxy.port) as c:
            c.send(_head_with(fields))
            response = c.read_response()
        assert response.status == status, (fields, response)
        if status == 200:
            names = [
                k for k, _ in response.json()["headers"] if k.startswith("X") and k[1:].isdigit()
            ]
            assert len(names) == fields - 1
        else:
            assert response.get("connection") == "close"


def test_origin_max_header_count(origin: Origin, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(origin, upstream={"max_header_count": 50})
    with RawConn(proxy.port) as c:
        assert c.roundtrip("GET", "/many-headers/40").status == 200
        assert c.roundtrip("GET", "/many-headers/60").status == 502


def test_content_length_bounds_and_normalisation(origin: Origin, proxy: Proxy) -> None:
    before = origin.stats()["requests"]
    for value in ("9223372036854775808", "18446744073709551615"):
        with RawConn(proxy.port) as c:
            c.send(
                b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nContent-Length: %s\r\n\r\n"
                % value.encode()
            )
            response = c.read_response()
        assert response.status == 400 and b"Content-Length too large" in response.body
    assert origin.stats()["requests"] == before, "refused before the origin"
    with RawConn(proxy.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: e2e.test\r\nContent-Length: 00005\r\n\r\nhello")
        echo = c.read_response().json()
        assert ["Content-Length", "5"] in echo["headers"] and echo["body_len"] == 5
        response = c.roundtrip("GET", "/raw-length/0005")
        assert response.get_all("content-length") == ["5"] and response.body == b"xxxxx"
        assert c.roundtrip("GET", "/raw-length/9223372036854775808").status == 502


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_status_loses_its_content_length(
    origin: Origin, proxy: Proxy, status: int
) -> None:
    with RawConn(proxy.port) as c:
        c.request("GET", f"/status-length/{status}")
        response = c.read_head()
        assert response.status == status and not response.has("content-length")
        assert c.roundtrip("GET", "/echo").status == 200, "the connection goes on"


@pytest.mark.parametrize(
    ("version", "status"),
    [("HTTP/1.2", 505), ("HTTP/1.10", 505), ("HTTP/2.0", 505), ("HTTP/x.y", 400)],
)
def test_well_formed_other_versions_get_505_malformed_ones_400(
    origin: Origin, proxy: Proxy, version: str, status: int
) -> None:
    with RawConn(proxy.port) as c:
        c.send(f"GET /echo {version}\r\nHost: e2e.test\r\n\r\n".encode())
        response = c.read_response()
        assert response.status == status, response
        assert c.closed_within(5)
