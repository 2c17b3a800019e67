"""
Every request that reached an origin has its access line, end to end: the real proxy under
twistd in front of tests/e2e/origin.py in its recording mode, which notes every request head
it parses. The hardening issue's case first (a chunked body found malformed after its head
went up a pooled connection), then the body timeout that ends a request the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from e2ehelpers import Origin, Proxy, RawConn, build_request

ProxyFactory = Callable[..., Proxy]


def wait_for_record(origin: Origin, target: str, timeout: float = 5.0) -> dict[str, Any]:
    """The origin's record of the request for C{target}, once its head is parsed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in origin.take_records():
            if record.get("target") == target:
                return record
        time.sleep(0.02)
    raise AssertionError(f"the origin never parsed {target}")


def test_a_chunked_body_malformed_after_its_head_went_up_a_pooled_connection(
    origin_factory: Callable[..., Origin], proxy_factory: ProxyFactory
) -> None:
    origin = origin_factory(record=True)
    proxy = proxy_factory(origin)
    with RawConn(proxy.port) as c:
        warm = c.roundtrip("GET", "/echo/warm")
        assert warm.status == 200, "leaves its upstream connection in the pool"
        c.send(build_request("POST", "/echo/acct-1", [("Transfer-Encoding", "chunked")])
               + b"1\r\na\r\n")
        record = wait_for_record(origin, "/echo/acct-1")
        assert str(record["conn"]) == warm.get("X-Origin-Conn"), "over the pooled connection"
        c.send(b"zz\r\n")  # a malformed chunk size
        r = c.read_response()
        assert r.status == 400 and "close" in r.tokens("connection")
        assert c.closed_within(3)
    line = proxy.wait_event("access", 5, lambda e: e["path"] == "/echo/acct-1")
    assert line is not None, "its head reached the origin, and it has no access line"
    assert (line["method"], line["status"], line["aborted"]) == ("POST", 400, "bad_request")
    assert line["upstream_reused"] is True
    assert not [e for e in proxy.events("access") if e["path"] == "-"], "no nameless 400"


def test_a_body_timeout_after_the_head_went_up(
    origin_factory: Callable[..., Origin], proxy_factory: ProxyFactory
) -> None:
    origin = origin_factory(record=True)
    proxy = proxy_factory(origin, listener={"body_timeout": 1})
    with RawConn(proxy.port) as c:
        c.send(build_request("POST", "/echo/acct-2", [("Content-Length", "10")]) + b"abc")
        wait_for_record(origin, "/echo/acct-2")
        r = c.read_response()
        assert r.status == 408
        assert c.closed_within(3)
    line = proxy.wait_event("access", 5, lambda e: e["path"] == "/echo/acct-2")
    assert line is not None
    assert (line["method"], line["status"], line["aborted"]) == ("POST", 408, "timeout")
