"""End-to-end connection governance (issue 3): timeouts, connection limits, idle reaping, lifetime,
TCP keep-alive, graceful drain on SIGTERM and slowloris / slow-body resistance.

Every test runs the real proxy (``twistd -n persistproxy``) in front of a real origin process
(tests/e2e/origin.py) and talks to it through real sockets (plus ``ss`` and ``slowhttptest``).
Timeouts are configured small (1-3 s) and every "closes at T" check also checks "still open
before T", so that a proxy closing too early fails as surely as one never closing."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2ehelpers import (
    LISTENER_DEFAULTS,
    UPSTREAM_DEFAULTS,
    Closed,
    Origin,
    Proxy,
    RawConn,
    Response,
    assert_no_traceback,
    build_request,
    toml_value,
    upstream_waiting,
    wait_metric,
    wait_until,
)

ProxyFactory = Callable[..., Proxy]

#: governance_config(top=METRICS): the Prometheus endpoint, to wait on the proxy's state.
METRICS: dict[str, Any] = {"metrics": {"bind": "tcp:0:interface=127.0.0.1"}}


# ==============================================================================================
# Helpers of this file (shared ones: e2ehelpers.py; fixtures: conftest.py)
# ==============================================================================================

def _toml(v: Any) -> str:
    """toml_value plus inline tables (tcp_keepalive = { idle = 30, ... })."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return toml_value(v)


def governance_config(origin: Origin, listener: dict[str, Any] | None = None,
                      upstream: dict[str, Any] | None = None, top: dict[str, Any] | None = None,
                      more_listeners: tuple[dict[str, Any], ...] = ()) -> str:
    """A whole config file: top-level keys (drain_timeout), listener "web" (+ others), "app"."""
    out = [f"{k} = {_toml(v)}" for k, v in (top or {}).items()]
    out.append("")
    listeners = [dict(LISTENER_DEFAULTS, **(listener or {}))]
    listeners += [dict(LISTENER_DEFAULTS, **more) for more in more_listeners]
    for lst in listeners:
        out.append("[[listener]]")
        out += [f"{k} = {_toml(v)}" for k, v in lst.items()]
        out.append("")
    ups = dict(UPSTREAM_DEFAULTS, servers=[f"127.0.0.1:{origin.port}"], **(upstream or {}))
    out.append("[[upstream]]")
    out += [f"{k} = {_toml(v)}" for k, v in ups.items()]
    return "\n".join(out) + "\n"


def start_proxy(proxy_factory: ProxyFactory, origin: Origin, **kw: Any) -> Proxy:
    return proxy_factory(config_text=governance_config(origin, **kw))  # type: ignore[no-any-return]


def listener_port(p: Proxy, name: str) -> int:
    ev = p.wait_event("listener.started", 5, lambda e: e.get("listener") == name)
    assert ev is not None, f"listener {name!r} did not start"
    return int(ev["port"])


def assert_silent(c: RawConn, seconds: float, what: str) -> None:
    """Nothing at all (no byte, no FIN, no RST) arrives on c for `seconds`."""
    t0 = time.monotonic()
    try:
        closed = c.closed_within(seconds)
    except AssertionError as e:
        raise AssertionError(f"{what}: bytes arrived after {time.monotonic() - t0:.2f}s "
                             f"instead of silence for {seconds}s ({e})") from None
    assert not closed, (f"{what}: connection closed after {time.monotonic() - t0:.2f}s, "
                        f"expected it open for at least {seconds}s")


def wait_quiet_close(c: RawConn, timeout: float, what: str) -> float:
    """Seconds until c is closed by the peer without a single byte (fails on bytes/timeout)."""
    t0 = time.monotonic()
    try:
        t = c.time_to_close(timeout)
    except AssertionError as e:
        raise AssertionError(f"{what}: expected a quiet close, got bytes after "
                             f"{time.monotonic() - t0:.2f}s: {e}") from None
    assert t is not None, f"{what}: still open {timeout}s later"
    return t


def keep_alive(r: Response) -> bool:
    return "close" not in r.tokens("Connection")


def open_keepalive(port: int, target: str = "/echo") -> RawConn:
    """A client connection that completed one request and is now idle (kept alive)."""
    c = RawConn(port)
    r = c.roundtrip("GET", target)
    assert r.status == 200 and keep_alive(r), r
    return c


def connect_refused(port: int) -> bool:
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        return True
    finally:
        s.close()
    return False


def require_tool(name: str) -> None:
    """Like e2ehelpers.curl: `make test` installs these (scripts/system-deps.sh), so a missing
    one is a failure, not a skip that would hide the behaviour."""
    if shutil.which(name) is None:
        raise AssertionError(f"{name} is not installed (scripts/system-deps.sh installs it)")


def origin_has(origin: Origin, req_id: str, timeout: float = 5) -> None:
    """Wait until the request with this X-Req-Id reached the origin (it is in flight there)."""
    assert wait_until(lambda: req_id in origin.stats()["ids"], timeout), \
        f"request {req_id!r} did not reach the origin within {timeout}s"


def wait_events(p: Proxy, name: str, n: int = 1, timeout: float = 3,
                pred: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[dict[str, Any]]:
    """The proxy's `name` events matching pred, once there are n (its stdout is read by a
    thread, so a line written a moment ago may not be there yet)."""
    def found() -> list[dict[str, Any]]:
        return [e for e in p.events(name) if pred(e)]
    wait_until(lambda: len(found()) >= n, timeout)
    return found()


@contextlib.contextmanager
def conns(*cs: RawConn) -> Iterator[None]:
    try:
        yield
    finally:
        for c in cs:
            c.close()


# ==============================================================================================
# 1. header_timeout, keep-alive idle timeout, send_408_on_idle
# ==============================================================================================

def test_partial_head_gets_408_at_header_timeout(fresh_origin: Origin,
                                                 proxy_factory: ProxyFactory) -> None:
    """A head that stops (or trickles a header line every 0.2 s) is answered 408 and closed
    header_timeout after its first byte; the trickle does not extend the deadline."""
    p = start_proxy(proxy_factory, fresh_origin, listener={"header_timeout": 1.5})
    s0 = fresh_origin.stats()
    silent, trickle = RawConn(p.port), RawConn(p.port)
    with conns(silent, trickle):
        t0 = time.monotonic()
        silent.send(b"GET /echo HTTP/1.1\r\nHost: e2e.test\r\n")
        trickle.send(b"GET /echo HTTP/1.1\r\nHost: e2e.test\r\n")
        i = 0
        while time.monotonic() - t0 < 1.2:
            trickle.send(b"X-Slow-%d: %s\r\n" % (i, b"x" * 10))
            i += 1
            assert_silent(silent, 0.2, "partial head before header_timeout")
        assert i >= 5
        for name, c in (("silent", silent), ("trickle", trickle)):
            r = c.read_response(timeout=3)
            elapsed = time.monotonic() - t0
            assert r.status == 408, (name, r)
            assert "close" in r.tokens("Connection"), (name, r)
            assert 1.4 <= elapsed <= 2.6, f"{name}: 408 after {elapsed:.2f}s, header_timeout=1.5"
            assert c.closed_within(2), f"{name}: not closed after the 408"
    timeouts = wait_events(p, "client.timeout", 2, pred=lambda e: e.get("phase") == "head")
    assert len(timeouts) >= 2, p.events("client.timeout")
    assert timeouts[0]["client"] == "127.0.0.1"
    assert fresh_origin.stats()["requests"] == s0["requests"], "a partial head reached the origin"


def test_new_silent_connection_closed_quietly_at_header_timeout(
        origin: Origin, proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, origin, listener={"header_timeout": 1, "keepalive_timeout": 75})
    with RawConn(p.port) as c:
        t0 = time.monotonic()
        assert_silent(c, 0.6, "new connection before header_timeout")
        wait_quiet_close(c, 2.5, "new connection that sent nothing")
        elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed <= 1.8, f"closed after {elapsed:.2f}s, header_timeout=1"


@pytest.mark.parametrize("send_408", [False, True], ids=["quiet", "send_408_on_idle"])
def test_idle_keepalive_connection_closed_at_keepalive_timeout(
        origin: Origin, proxy_factory: ProxyFactory, send_408: bool) -> None:
    """The idle timer of a kept-alive connection is keepalive_timeout (1.5 s), not the shorter
    header_timeout (0.8 s); at expiry the close is silent unless send_408_on_idle is set."""
    p = start_proxy(proxy_factory, origin, listener={
        "keepalive_timeout": 1.5, "header_timeout": 0.8, "send_408_on_idle": send_408})
    with open_keepalive(p.port) as c:
        t0 = time.monotonic()
        assert_silent(c, 0.9, "idle keep-alive connection before keepalive_timeout")
        if send_408:
            r = c.read_response(timeout=2.5)
            assert r.status == 408, r
            assert "close" in r.tokens("Connection"), r
            assert c.closed_within(2), "not closed after the idle 408"
        else:
            wait_quiet_close(c, 2.5, "idle keep-alive connection")
        elapsed = time.monotonic() - t0
    assert 1.4 <= elapsed <= 2.4, f"idle connection ended after {elapsed:.2f}s, timeout 1.5"


# ==============================================================================================
# 2. body_timeout
# ==============================================================================================

def test_body_timeout_408_and_origin_connection_not_reused(
        fresh_origin: Origin, proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, fresh_origin, listener={"body_timeout": 1.5})
    with open_keepalive(p.port) as warm:
        # One pooled origin connection, which the next request will take (LIFO pool).
        r = warm.roundtrip("GET", "/echo")
        pooled = r.get("X-Origin-Conn")
        assert pooled is not None and r.get("X-Origin-Req") == "2", r
        s0 = fresh_origin.stats()
        assert s0["open"] == 1, s0
        with RawConn(p.port) as c:
            c.send(build_request("POST", "/echo", [("Content-Length", "100"),
                                                   ("X-Req-Id", "stalled-body")]) + b"x" * 10)
            t0 = time.monotonic()
            assert_silent(c, 0.9, "stalled body before body_timeout")
            r = c.read_response(timeout=3)
            elapsed = time.monotonic() - t0
            assert r.status == 408, r
            assert "close" in r.tokens("Connection"), r
            assert 1.4 <= elapsed <= 2.6, f"408 after {elapsed:.2f}s, body_timeout=1.5"
            assert c.closed_within(2), "not closed after the body 408"
        # The origin saw that request's connection die, and never got the request.
        assert wait_until(lambda: fresh_origin.stats()["open"] == 0, 2), fresh_origin.stats()
        s1 = fresh_origin.stats()
        assert s1["requests"] == s0["requests"] and "stalled-body" not in s1["ids"], s1
        # ... and the next request goes on a new origin connection.
        r = warm.roundtrip("GET", "/echo")
        assert r.status == 200, r
        assert r.get("X-Origin-Conn") != pooled and r.get("X-Origin-Req") == "1", r
        assert fresh_origin.stats()["accepts"] == s0["accepts"] + 1
    assert wait_events(p, "client.timeout", pred=lambda e: e.get("phase") == "body"), \
        p.events("client.timeout")


def test_body_timeout_is_silence_not_total_time(fresh_origin: Origin,
                                                proxy_factory: ProxyFactory) -> None:
    """body_timeout bounds the silence inside a body (etc/persistproxy.toml): a body arriving
    in pieces 0.5 s apart for 2 s in all passes with body_timeout = 1."""
    p = start_proxy(proxy_factory, fresh_origin, listener={"body_timeout": 1})
    with RawConn(p.port) as c:
        c.send(build_request("POST", "/echo", [("Content-Length", "40")]))
        for _ in range(4):
            time.sleep(0.5)
            c.send(b"y" * 10)
        r = c.read_response(timeout=3)
    assert r.status == 200, r
    assert r.json()["body_len"] == 40, r


# ==============================================================================================
# 3-5. Connection limits
# ==============================================================================================

def test_per_client_limit_503_retry_after_and_existing_keep_working(
        fresh_origin: Origin, proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, fresh_origin, listener={"max_connections_per_client": 2})
    c1, c2 = open_keepalive(p.port), open_keepalive(p.port)
    with conns(c1, c2):
        with RawConn(p.port) as c3:
            c3.request("GET", "/echo", [("X-Req-Id", "refused")])
            r = c3.read_response(timeout=3)
            assert r.status == 503, r
            retry = r.get("Retry-After")
            assert retry is not None and retry.isdigit(), r
            assert "close" in r.tokens("Connection"), r
            assert c3.closed_within(3), "refused connection not closed"
        ev = p.wait_event("client.refused", 3)
        assert ev is not None, "no client.refused event on the proxy's stdout"
        assert ev["client"] == "127.0.0.1" and ev.get("listener") == "web", ev
        assert "refused" not in fresh_origin.stats()["ids"], "refused request reached the origin"
        # The client's existing connections are untouched by the refusal.
        for c in (c1, c2):
            r = c.roundtrip("GET", "/echo")
            assert r.status == 200 and keep_alive(r), r
        # Closing one frees its slot.
        c1.close()

        def admitted() -> bool:
            with RawConn(p.port) as c4:
                return c4.roundtrip("GET", "/echo").status == 200
        assert wait_until(admitted, 3, 0.1), "a slot freed by a closed connection was not reused"
        r = c2.roundtrip("GET", "/echo")
        assert r.status == 200, r


def test_max_idle_per_client_reaps_oldest(origin: Origin, proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, origin, listener={"max_idle_per_client": 2})
    c1 = open_keepalive(p.port)
    c2 = open_keepalive(p.port)
    with conns(c1, c2):
        assert_silent(c1, 0.3, "oldest of 2 idle connections (limit 2)")
        c3 = open_keepalive(p.port)
        with c3:
            wait_quiet_close(c1, 2, "oldest idle connection over max_idle_per_client")
            for c in (c2, c3):
                r = c.roundtrip("GET", "/echo")
                assert r.status == 200 and keep_alive(r), r
            assert_silent(c2, 0.2, "2nd idle connection")
            assert_silent(c3, 0.2, "3rd idle connection")
    ev = p.wait_event("client.idle_reaped", 2)
    assert ev is not None and ev["client"] == "127.0.0.1", p.lines()[-20:]


def test_listener_max_connections_waits_in_backlog(origin: Origin,
                                                   proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, origin, listener={"max_connections": 2})
    c1, c2 = open_keepalive(p.port), open_keepalive(p.port)
    with conns(c1, c2), RawConn(p.port) as c3:  # connect() succeeds: the kernel's backlog
        c3.request("GET", "/echo")
        with pytest.raises(TimeoutError):
            r = c3.read_response(timeout=1.0)
            raise AssertionError(f"3rd connection served over max_connections=2: {r}")
        c1.close()
        t0 = time.monotonic()
        r = c3.read_response(timeout=3)
        assert r.status == 200, r
        assert time.monotonic() - t0 < 1.5
        r = c2.roundtrip("GET", "/echo")
        assert r.status == 200, r
    assert wait_events(p, "listener.full") and wait_events(p, "listener.accepting"), \
        p.lines()[-20:]
    assert not p.events("client.refused"), p.events("client.refused")


def test_listener_max_connections_burst_waits_in_backlog(origin: Origin,
                                                         proxy_factory: ProxyFactory) -> None:
    """Three clients connecting at the same moment (the proxy finds them together in its
    accept queue): the third must wait like a late one, not be refused."""
    p = start_proxy(proxy_factory, origin, listener={"max_connections": 2}, top=METRICS)
    warm = open_keepalive(p.port)  # let Twisted's accept loop grow past 1 accept per wakeup
    warm.close()
    wait_metric(p, 'persistproxy_connections_open{listener="web"}', 0)
    os.kill(p.pid, signal.SIGSTOP)
    try:
        cs = [RawConn(p.port) for _ in range(3)]
        for c in cs:
            c.request("GET", "/echo")
    finally:
        os.kill(p.pid, signal.SIGCONT)
    with conns(*cs):
        served = []
        for c in cs:
            with contextlib.suppress(TimeoutError):
                served.append(c.read_response(timeout=1.0).status)
        assert served == [200, 200], f"statuses within 1 s: {served} (expected 2 x 200, 1 waiting)"


# ==============================================================================================
# 6. Upstream max_connections, queue_size, queue_timeout
# ==============================================================================================

def test_upstream_max_connections_serializes_and_queue_full_503(
        fresh_origin: Origin, proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, fresh_origin, top=METRICS,
                    upstream={"max_connections": 1, "queue_size": 1, "queue_timeout": 2})
    c1, c2, c3 = RawConn(p.port), RawConn(p.port), RawConn(p.port)
    with conns(c1, c2, c3):
        t0 = time.monotonic()
        c1.request("GET", "/slow/1.5", [("X-Req-Id", "first")])
        origin_has(fresh_origin, "first")  # c1 holds the only connection
        c2.request("GET", "/slow/1.5")
        wait_metric(p, upstream_waiting(fresh_origin.port), 1)  # c2 fills the queue
        c3.request("GET", "/echo", [("X-Req-Id", "over-queue")])
        r3 = c3.read_response(timeout=3)
        t3 = time.monotonic() - t0
        r1 = c1.read_response(timeout=5)
        t1 = time.monotonic() - t0
        r2 = c2.read_response(timeout=5)
        t2 = time.monotonic() - t0
    assert r3.status == 503 and r3.has("Retry-After"), r3
    assert t3 < 1.0, f"queue-full 503 took {t3:.2f}s"
    assert r1.status == 200 and r2.status == 200, (r1, r2)
    assert 1.4 <= t1 <= 2.3, t1
    assert t2 >= t1 + 1.4, f"second request not served after the first ({t1:.2f}s, {t2:.2f}s)"
    s = fresh_origin.stats()
    assert s["accepts"] == 1, f"more than one origin connection: {s}"
    assert "over-queue" not in s["ids"], s


def test_upstream_queue_timeout_503(fresh_origin: Origin, proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, fresh_origin,
                    upstream={"max_connections": 1, "queue_size": 1, "queue_timeout": 2})
    c1, c2 = RawConn(p.port), RawConn(p.port)
    with conns(c1, c2):
        c1.request("GET", "/slow/3", [("X-Req-Id", "holder")])
        origin_has(fresh_origin, "holder")
        t0 = time.monotonic()
        c2.request("GET", "/echo", [("X-Req-Id", "queued-too-long")])
        r2 = c2.read_response(timeout=4)
        waited = time.monotonic() - t0
        assert r2.status == 503 and r2.has("Retry-After"), r2
        assert 1.8 <= waited <= 2.8, f"queued request answered after {waited:.2f}s, timeout 2"
        r1 = c1.read_response(timeout=4)
        assert r1.status == 200, r1
        r = c1.roundtrip("GET", "/echo")  # the pool is usable again
        assert r.status == 200, r
    assert "queued-too-long" not in fresh_origin.stats()["ids"]


def test_upstream_queue_full_then_cancelled_waiters_free_their_places(
        fresh_origin: Origin, proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, fresh_origin, top=METRICS,
                    upstream={"max_connections": 2, "queue_size": 3, "queue_timeout": 5})
    busy = [RawConn(p.port) for _ in range(2)]
    queued = [RawConn(p.port) for _ in range(3)]
    try:
        for i, c in enumerate(busy):
            c.request("GET", "/slow/0.8", [("X-Req-Id", f"busy-{i}")])
        for i in range(2):
            origin_has(fresh_origin, f"busy-{i}")
        for c in queued:
            c.request("GET", "/echo")
        wait_metric(p, upstream_waiting(fresh_origin.port), 3)
        with RawConn(p.port) as extra:
            r = extra.roundtrip("GET", "/echo")
            assert r.status == 503 and r.get("retry-after"), r
        for c in queued:
            c.close()  # these clients give up while queued
        for c in busy:
            assert c.read_response(timeout=3).status == 200
    finally:
        for c in busy + queued:
            c.close()
    # A client's FIN alone is a half-close: the queued requests of those that only shut
    # down writing may still be answered. Wait until nothing is queued or lent, so that the
    # four below find the two connections and three places free.
    wait_metric(p, upstream_waiting(fresh_origin.port), 0)
    wait_metric(p, upstream_waiting(fresh_origin.port).replace("waiting", "active"), 0)
    results: list[int] = []

    def one() -> None:
        with RawConn(p.port) as c:
            results.append(c.roundtrip("GET", "/slow/0.2").status)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    assert_no_traceback(p)


# ==============================================================================================
# 7. max_lifetime
# ==============================================================================================

def test_max_lifetime_ends_a_busy_connection(origin: Origin, proxy_factory: ProxyFactory) -> None:
    """Requests every 0.3 s; the one in flight when the 2 s lifetime ends is answered with
    Connection: close, and the connection then closes; none before says close."""
    p = start_proxy(proxy_factory, origin, listener={"max_lifetime": 2})
    with RawConn(p.port) as c:
        t0 = time.monotonic()
        n = 0
        while True:
            due = t0 + 0.3 * n
            time.sleep(max(0.0, due - time.monotonic()))
            slow = due - t0 >= 1.75  # this one is still in flight at t = 2 s
            r = c.roundtrip("GET", "/slow/0.6" if slow else "/echo")
            t = time.monotonic() - t0
            assert r.status == 200, r
            if slow:
                break
            assert keep_alive(r), f"Connection: close at {t:.2f}s, before max_lifetime=2: {r}"
            n += 1
        assert n >= 5
        assert 2.0 <= t <= 3.0, t
        assert "close" in r.tokens("Connection"), \
            f"response at {t:.2f}s, after max_lifetime=2, kept the connection: {r}"
        assert c.closed_within(2), "connection not closed after its Connection: close response"


def test_max_lifetime_closes_idle_connection(origin: Origin, proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, origin, listener={"max_lifetime": 2, "keepalive_timeout": 75})
    t0 = time.monotonic()
    with open_keepalive(p.port) as c:
        assert_silent(c, 1.3, "idle connection before max_lifetime")
        wait_quiet_close(c, 2, "idle connection past max_lifetime")
        t = time.monotonic() - t0
    assert 1.9 <= t <= 2.7, f"closed {t:.2f}s after connect, max_lifetime=2"


def test_max_lifetime_lets_an_upload_in_progress_finish(
        fresh_origin: Origin, proxy_factory: ProxyFactory) -> None:
    """A request whose body is still arriving when the lifetime ends is not a timeout: it is
    answered (with Connection: close), like any request in flight at that moment."""
    p = start_proxy(proxy_factory, fresh_origin, listener={"max_lifetime": 2, "body_timeout": 60})
    with open_keepalive(p.port) as c:
        t0 = time.monotonic()
        time.sleep(1.0)
        c.send(build_request("POST", "/echo", [("Content-Length", "40")]))
        for _ in range(4):  # pieces at ~1.0, 1.4, 1.8, 2.2 s: the lifetime ends mid-body
            c.send(b"z" * 10)
            time.sleep(0.4)
        r = c.read_response(timeout=3)
        t = time.monotonic() - t0
    assert r.status == 200 and r.json()["body_len"] == 40, f"at {t:.2f}s: {r}"
    assert "close" in r.tokens("Connection"), r


# ==============================================================================================
# 8. tcp_keepalive, seen in the kernel with ss
# ==============================================================================================

_TIMER_RE = re.compile(r"timer:\((\w+),([^,]+),(\d+)\)")


def _seconds(text: str) -> float:
    """An ss timer value: "992ms", "5sec", "1min29sec", "119min", and "4.748ms", which this
    iproute2 prints for 4 s 748 ms (any value with a decimal point counts whole seconds)."""
    m = re.fullmatch(r"(?:(\d+)min)?(?:(\d+)(\.\d+)?(sec|ms))?", text.strip())
    assert m is not None, f"cannot parse ss timer {text!r}"
    minutes, whole, frac, unit = m.groups()
    total = 60.0 * int(minutes or 0)
    if whole is not None:
        if frac is not None or unit == "sec":
            total += float(whole + (frac or ""))
        else:
            total += int(whole) / 1000
    return total


def ss_timer(local_port: int, peer_port: int) -> tuple[str, float] | None:
    """The kernel timer of the ESTABLISHED socket 127.0.0.1:local -> 127.0.0.1:peer."""
    out = subprocess.run(
        ["ss", "-tnoiH", "state", "established", "(", "sport", "=", f":{local_port}", "and",
         "dport", "=", f":{peer_port}", ")"],
        capture_output=True, text=True, timeout=5, check=True).stdout
    assert f":{local_port}" in out and f":{peer_port}" in out, f"socket not found by ss: {out!r}"
    m = _TIMER_RE.search(out)
    return (m.group(1), _seconds(m.group(2))) if m else None


def test_tcp_keepalive_set_on_accepted_sockets(origin: Origin,
                                               proxy_factory: ProxyFactory) -> None:
    """"web": idle=30 -> the proxy's socket shows a keep-alive timer of <= 30 s (Linux's
    default is 2 h). "fast": idle=1, interval=5 -> after the first probe the timer runs on the
    5 s interval (default 75 s). "plain" (no tcp_keepalive): no keep-alive timer at all."""
    p = start_proxy(proxy_factory, origin,
                    listener={"tcp_keepalive": {"idle": 30, "interval": 5, "count": 3}},
                    more_listeners=(
                        {"name": "fast", "tcp_keepalive": {"idle": 1, "interval": 5, "count": 3}},
                        {"name": "plain"}))
    require_tool("ss")
    ports = {"web": p.port, "fast": listener_port(p, "fast"), "plain": listener_port(p, "plain")}
    cs = {name: open_keepalive(port) for name, port in ports.items()}
    with conns(*cs.values()):
        client_port = {name: c.sock.getsockname()[1] for name, c in cs.items()}
        web = ss_timer(ports["web"], client_port["web"])
        assert web is not None and web[0] == "keepalive", web
        assert 20 <= web[1] <= 30, f"keep-alive timer {web[1]}s with idle = 30"
        # The client's end of the same connection has no keep-alive (the filter is right).
        assert ss_timer(client_port["web"], ports["web"]) is None
        plain = ss_timer(ports["plain"], client_port["plain"])
        assert plain is None, f"keep-alive on a listener without tcp_keepalive: {plain}"
        # idle = 1: until the first probe the timer counts down from 1 s; once a probe went
        # out and was answered it runs on the 5 s interval.
        timers: list[tuple[str, float] | None] = []

        def probed() -> bool:
            timers.append(ss_timer(ports["fast"], client_port["fast"]))
            return timers[-1] is not None and timers[-1][1] > 1.0

        assert wait_until(probed, 5), f"no keep-alive probe within 5 s, idle = 1: {timers[-3:]}"
        fast = timers[-1]
        assert fast is not None and fast[0] == "keepalive", fast
        assert 2.5 <= fast[1] <= 5.0, f"keep-alive timer {fast[1]}s after a probe, interval = 5"


# ==============================================================================================
# 9. Graceful drain on SIGTERM
# ==============================================================================================

def test_sigterm_drains_gracefully(origin: Origin, proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, origin, top={"drain_timeout": 30})
    idle = open_keepalive(p.port)
    busy = RawConn(p.port)
    with conns(idle, busy):
        t_req = time.monotonic()
        busy.request("GET", "/slow/2", [("X-Req-Id", "in-flight")])
        origin_has(origin, "in-flight")
        t_term = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        # The idle connection is closed at once, quietly.
        t = wait_quiet_close(idle, 1.5, "idle keep-alive connection at SIGTERM")
        assert t <= 0.5, f"idle connection closed {t:.2f}s after SIGTERM"
        idle.close()
        # New connections are refused shortly after.
        assert wait_until(lambda: connect_refused(p.port), 1.0, 0.02), \
            "new connections still accepted 1 s after SIGTERM"
        assert p.alive(), "proxy exited with a request in flight"
        # The request in flight completes, with Connection: close.
        r = busy.read_response(timeout=5)
        t_resp = time.monotonic()
        assert r.status == 200 and r.body == b"slow\n", r
        assert t_resp - t_req >= 1.9, "response came before the origin answered?"
        assert "close" in r.tokens("Connection"), r
        assert busy.closed_within(2), "drained connection not closed after its response"
    try:
        rc = p.proc.wait(5)
    except subprocess.TimeoutExpired:
        raise AssertionError("proxy still running 5 s after its last request ended "
                             "(drain_timeout = 30)") from None
    assert rc == 0, f"exit status {rc} after a clean drain"
    assert time.monotonic() - t_term < 10
    assert wait_events(p, "drain.started") and wait_events(p, "drain.finished"), p.lines()[-10:]
    assert not p.events("drain.timeout")


def test_sigterm_drain_timeout_cuts_in_flight(origin: Origin,
                                              proxy_factory: ProxyFactory) -> None:
    p = start_proxy(proxy_factory, origin, top={"drain_timeout": 1})
    with RawConn(p.port) as busy:
        busy.request("GET", "/slow/5", [("X-Req-Id", "cut-by-drain")])
        origin_has(origin, "cut-by-drain")
        t_term = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        try:
            rc = p.proc.wait(4)
        except subprocess.TimeoutExpired:
            raise AssertionError("proxy did not exit 4 s after SIGTERM, drain_timeout=1") from None
        exited = time.monotonic() - t_term
        assert rc == 0, f"exit status {rc} after a drain that timed out"
        assert 0.8 <= exited <= 2.5, f"exited {exited:.2f}s after SIGTERM, drain_timeout=1"
        with pytest.raises(Closed):
            r = busy.read_response(timeout=2)
            raise AssertionError(f"got a response from a drain that timed out: {r}")
    assert wait_events(p, "drain.timeout"), p.lines()[-10:]


def test_sigterm_exit_status_is_zero(origin: Origin, proxy_factory: ProxyFactory) -> None:
    """twistd re-raises the stopping signal after shutdown; the drain must still end with
    status 0 (shell 0, not 143), as the systemd unit says, also with nothing in flight."""
    p = start_proxy(proxy_factory, origin)
    with open_keepalive(p.port):
        pass
    p.proc.send_signal(signal.SIGTERM)
    rc = p.proc.wait(5)
    assert wait_events(p, "drain.finished"), p.lines()[-10:]
    assert rc == 0, f"exit status {rc} after a clean drain (systemd unit says: exit 0)"


# ==============================================================================================
# 10. slowloris and slow body (slowhttptest) while a normal client keeps being served
# ==============================================================================================

class NormalClient:
    """Sequential GETs in a thread, alternately on a kept-alive and on a new connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NormalClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        kept: RawConn | None = None
        n = 0
        while not self._stop.is_set():
            fresh = n % 2 == 1
            n += 1
            t0 = time.monotonic()
            try:
                if fresh:
                    with RawConn(self.port, timeout=5) as c:
                        r = c.roundtrip("GET", f"/echo?n={n}")
                else:
                    if kept is None:
                        kept = RawConn(self.port, timeout=5)
                    r = kept.roundtrip("GET", f"/echo?n={n}")
                    if not keep_alive(r):
                        kept.close()
                        kept = None
                self.latencies.append(time.monotonic() - t0)
                if r.status != 200:
                    self.failures.append(f"#{n}: {r.status}")
            except Exception as e:  # any failure of a normal request is a test failure
                self.failures.append(f"#{n} ({'new' if fresh else 'kept'}): {e!r}")
                if kept is not None:
                    kept.close()
                    kept = None
            self._stop.wait(0.02)
        if kept is not None:
            kept.close()


def _slowhttptest(mode: str, port: int, out: Path, interval: int) -> subprocess.Popen[str]:
    argv = ["slowhttptest", mode, "-c", "300", "-r", "100", "-i", str(interval), "-l", "8",
            "-x", "24", "-p", "3", "-s", "8192", "-g", "-o", str(out),
            "-u", f"http://127.0.0.1:{port}/echo"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _csv_rows(path: Path) -> list[dict[str, int]]:
    with path.open() as f:
        return [{k.strip(): int(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_slowloris_and_slow_body_normal_clients_still_served(
        origin: Origin, proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    """300 slowloris connections (a header line every 2 s: the header deadline must not be
    extended by them) and 300 slow-body connections (a body piece every 5 s) against
    header_timeout = body_timeout = 3, while a normal client keeps getting 200s."""
    require_tool("slowhttptest")
    p = start_proxy(proxy_factory, origin, listener={"header_timeout": 3, "body_timeout": 3})
    procs: dict[str, subprocess.Popen[str]] = {}
    with NormalClient(p.port) as client:
        assert wait_until(lambda: len(client.latencies) >= 5, 5), client.failures[:5]
        try:
            procs["H"] = _slowhttptest("-H", p.port, tmp_path / "slowloris", 2)
            procs["B"] = _slowhttptest("-B", p.port, tmp_path / "slowbody", 5)
            outputs = {m: proc.communicate(timeout=20)[0] for m, proc in procs.items()}
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        served = len(client.latencies)
        assert wait_until(lambda: len(client.latencies) >= served + 5, 5), client.failures[:5]
    lat = sorted(client.latencies)
    assert not client.failures, f"normal requests failed under attack: {client.failures[:10]}"
    assert len(lat) >= 100, f"only {len(lat)} normal requests completed"
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    p50 = lat[len(lat) // 2]
    result = {"requests": len(lat), "p50_ms": round(p50 * 1000, 2), "p99_ms": round(p99 * 1000, 2),
              "max_ms": round(lat[-1] * 1000, 2)}
    (tmp_path / "slowloris-latency.json").write_text(json.dumps(result) + "\n")
    print(f"\nnormal client under slowloris + slow body: {result} "
          f"(saved in {tmp_path / 'slowloris-latency.json'})")
    assert p99 < 2.0, f"p99 {p99:.3f}s (sanity bound 2 s)"

    for mode, prefix, phase in (("H", "slowloris", "head"), ("B", "slowbody", "body")):
        assert procs[mode].returncode == 0, f"slowhttptest {mode}: {outputs[mode][-2000:]}"
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", outputs[mode])
        assert re.search(r"service available:\s*YES", text), f"{mode}: {text[-1500:]}"
        assert not re.search(r"service available:\s*NO", text), f"{mode}: {text[-1500:]}"
        rows = _csv_rows(tmp_path / f"{prefix}.csv")
        assert rows and all(row["Service Available"] > 0 for row in rows), (mode, rows)
        # Slow connections were closed by the proxy, and not before the 3 s timeout
        # (slowhttptest notices a close only when it next writes: -i seconds later).
        assert max(row["Closed"] for row in rows) >= 150, (mode, rows)
        early = [row for row in rows if row["Seconds"] <= 2 and row["Closed"] > 0]
        assert not early, f"{mode}: connections closed before the 3 s timeout: {early}"
        n = len(wait_events(p, "client.timeout", 250, pred=lambda e, ph=phase: e["phase"] == ph))
        assert n >= 250, f"{mode}: only {n} client.timeout events with phase {phase}"
