"""Self-tests of the e2e origin (tests/e2e/origin.py), talking to it directly, no proxy.

If these fail, the proxy tests cannot be trusted."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from e2ehelpers import Origin, RawConn, curl, get, pattern, pattern_sha256


def test_prints_port_then_serves(origin: Origin) -> None:
    assert origin.port > 0
    assert origin.lines() == [f'{{"port": {origin.port}}}']  # nothing else on stdout


def test_conn_and_req_serials(origin: Origin) -> None:
    with RawConn(origin.port) as c:
        r1 = c.roundtrip("GET", "/echo")
        r2 = c.roundtrip("GET", "/echo")
    assert r1.get("X-Origin-Conn") == r2.get("X-Origin-Conn")
    assert (r1.get("X-Origin-Req"), r2.get("X-Origin-Req")) == ("1", "2")
    r3 = get(origin.port, "/echo")
    assert int(r3.get("X-Origin-Conn") or 0) > int(r1.get("X-Origin-Conn") or 0)


def test_stats_ignore_control_connections(origin: Origin) -> None:
    s0 = origin.stats()
    s1 = origin.stats()
    assert (s1["accepts"], s1["requests"]) == (s0["accepts"], s0["requests"])
    get(origin.port, "/echo", headers=[("X-Req-Id", "selftest-1")])
    s2 = origin.stats()
    assert s2["accepts"] == s0["accepts"] + 1
    assert s2["requests"] == s0["requests"] + 1
    assert s2["ids"]["selftest-1"] == 1


def test_echo_content_length_and_chunked(origin: Origin) -> None:
    r = get(origin.port, "/echo?q=1", method="POST", headers=[("X-Case", "MiXeD")],
            body=b"hello")
    e = r.json()
    assert e["method"] == "POST" and e["path"] == "/echo?q=1" and e["version"] == "HTTP/1.1"
    assert ["X-Case", "MiXeD"] in e["headers"]
    assert e["body_len"] == 5 and e["chunked"] is False
    assert e["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    body = b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nX-Trailer: 1\r\n\r\n"
    r = get(origin.port, "/echo", method="POST", headers=[("Transfer-Encoding", "chunked")],
            body=body)
    e = r.json()
    assert e["chunked"] is True and e["body_len"] == 6
    assert e["body_sha256"] == hashlib.sha256(b"hello!").hexdigest()


def test_bodies(origin: Origin) -> None:
    with RawConn(origin.port) as c:
        r = c.roundtrip("GET", "/bytes/200000")
        assert r.framing == "length" and r.body == pattern(200000)
        r = c.roundtrip("GET", "/chunked/150000")
        assert r.framing == "chunked" and r.body == pattern(150000)
        r = c.roundtrip("HEAD", "/bytes/1234")
        assert r.get("Content-Length") == "1234" and r.body == b""
        r = c.roundtrip("GET", "/status/204")
        assert r.status == 204 and r.body == b""
        r = c.roundtrip("GET", "/status/418")
        assert r.status == 418 and r.body
        r = c.roundtrip("GET", "/closedelim/70000")
        assert r.framing == "close" and r.body == pattern(70000)
    with RawConn(origin.port) as c:
        r = c.roundtrip("GET", "/http10/1000")
        assert r.version == "HTTP/1.0" and r.body == pattern(1000)
        assert c.closed_within(2)


def test_pipelining(origin: Origin) -> None:
    with RawConn(origin.port) as c:
        c.send(b"GET /slow/0.1 HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /echo?n=2 HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().body == b"slow\n"
        assert c.read_response().json()["path"] == "/echo?n=2"
        assert c.read_response().body == pattern(10)


def test_close_and_http10_semantics(origin: Origin) -> None:
    with RawConn(origin.port) as c:
        r = c.roundtrip("GET", "/close")
        assert r.get("Connection") == "close"
        assert c.closed_within(2)
    with RawConn(origin.port) as c:
        c.roundtrip("GET", "/echo", version="HTTP/1.0")
        assert c.closed_within(2)
    with RawConn(origin.port) as c:
        r = c.roundtrip("GET", "/echo", [("Connection", "keep-alive")], version="HTTP/1.0")
        assert r.get("Connection") == "keep-alive"
        assert not c.closed_within(0.2)


def test_hop_continue_reset(origin: Origin) -> None:
    r = get(origin.port, "/hop")
    assert r.get("X-Hop-Secret") == "leak" and r.get("X-End-To-End") == "yes"
    with RawConn(origin.port) as c:
        c.send(b"POST /continue HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
               b"Content-Length: 3\r\n\r\n")
        interim = c.read_response(interim=True, timeout=2)
        assert interim.status == 100
        c.send(b"abc")
        assert c.read_response().json() == {"body_len": 3}
    with RawConn(origin.port) as c:
        c.request("POST", "/reset", body=b"x")
        assert c.closed_within(2)


def test_idle_close_and_keepalive_timeout(origin_factory: Callable[..., Origin]) -> None:
    o = origin_factory(idle_close=0.3)
    with RawConn(o.port) as c:
        c.roundtrip("GET", "/echo")
        t = c.time_to_close(2)
        assert t is not None and 0.2 < t < 0.8
    plain = origin_factory()
    with RawConn(plain.port) as c:
        r = c.roundtrip("GET", "/keepalive-timeout/1")
        assert r.get("Keep-Alive") == "timeout=1"
        t = c.time_to_close(3)
        assert t is not None and 0.8 < t < 1.6


def test_drop_reused(origin_factory: Callable[..., Origin]) -> None:
    o = origin_factory()
    o.arm_drop_reused()
    with RawConn(o.port) as c:
        assert c.roundtrip("GET", "/echo").status == 200  # first request: not reused
        c.request("POST", "/echo", [("X-Req-Id", "dropme")], body=b"x")
        assert c.closed_within(2)
    assert o.stats()["ids"] == {"dropme": 1}
    with RawConn(o.port) as c:  # one shot
        c.roundtrip("GET", "/echo")
        assert c.roundtrip("GET", "/echo").status == 200


def test_bad_requests(origin: Origin) -> None:
    for raw in (b"garbage\r\n\r\n", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"):
        with RawConn(origin.port) as c:
            c.send(raw)
            assert c.read_response().status == 400
            assert c.closed_within(2)


def test_curl_large_download(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.monotonic()
    cp = curl("-o", str(out), f"http://127.0.0.1:{origin.port}/bytes/20000000")
    assert cp.returncode == 0, cp.stderr
    assert out.stat().st_size == 20000000
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pattern_sha256(20000000)
    assert time.monotonic() - t0 < 5


def test_record_mode_notes_each_parsed_head_with_its_body_and_refusals(
        origin_factory: Callable[..., Origin]) -> None:
    o = origin_factory(record=True)
    assert o.take_records() == []
    with RawConn(o.port) as c:
        assert c.roundtrip("GET", "/echo/r1").status == 200
        c.send(b"POST /echo/r2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
    with RawConn(o.port) as c:
        c.send(b"POST /echo/r3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        assert c.read_response().status == 400
    with RawConn(o.port) as c:
        c.send(b"GET /echo/r4 HTTP/1.1\r\nBad Name: x\r\n\r\n")
        assert c.read_response().status == 400
    deadline = time.monotonic() + 5
    records: list[dict[str, object]] = []
    while len(records) < 4 and time.monotonic() < deadline:
        records += o.take_records()
        time.sleep(0.02)
    by_target = {r.get("target", r.get("line")): r for r in records}
    assert by_target["/echo/r1"]["body"] == "none" and by_target["/echo/r1"]["bad"] is None
    assert by_target["/echo/r2"]["body"] == "pending", "cut in the middle of its body"
    assert "chunk size" in str(by_target["/echo/r3"]["bad"])
    assert by_target["GET /echo/r4 HTTP/1.1"]["bad"]
    assert o.take_records() == [], "a fetch empties the record"
