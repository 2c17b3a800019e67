"""
The Prometheus endpoint of a running proxy: counters move with traffic, pools are visible.
"""

from __future__ import annotations

import re
import socket
import struct
import time
import urllib.request
import uuid

from conftest import ProxyFactory
from e2ehelpers import Origin, get, make_config, wait_until


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def _value(text: str, metric: str) -> float:
    match = re.search(rf"^{re.escape(metric)} (\S+)$", text, re.MULTILINE)
    assert match, f"{metric} not in:\n{text}"
    return float(match.group(1))


def test_metrics_count_requests_responses_and_pools(
    origin: Origin, proxy_factory: ProxyFactory
) -> None:
    text = make_config([f"127.0.0.1:{origin.port}"], listener={"name": "web"})
    text = '[metrics]\nbind = "tcp:0:interface=127.0.0.1"\n\n' + text
    proxy = proxy_factory(config_text=text)
    event = proxy.wait_event("metrics.started", 10)
    assert event is not None, proxy.lines()[-10:]
    before = _scrape(int(event["port"]))
    requests_before = _value(before, 'persistproxy_requests_total{listener="web"}')
    for _ in range(3):
        assert get(proxy.port, "/echo").status == 200
    assert get(proxy.port, "/status/404").status == 404
    after = _scrape(int(event["port"]))
    assert _value(after, 'persistproxy_requests_total{listener="web"}') == requests_before + 4
    assert _value(after, 'persistproxy_responses_total{code="2xx",listener="web"}') >= 3
    assert _value(after, 'persistproxy_responses_total{code="4xx",listener="web"}') >= 1
    # A client that gives up on its (slow) response with a reset: a 499 and an aborted count.
    # (A FIN alone is a half-close, which is still answered.)
    req_id = uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /slow/2 HTTP/1.1\r\nHost: example\r\nX-Req-Id: %s\r\n\r\n"
                     % req_id.encode())
        # In flight: the origin has it and answers in 2 s.
        assert wait_until(lambda: req_id in origin.stats()["ids"], 5), origin.stats()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    deadline = time.monotonic() + 5
    metric = 'persistproxy_requests_aborted_total{by="client",listener="web"}'
    while metric not in (text := _scrape(int(event["port"]))):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    assert _value(text, metric) == 1
    assert _value(text, 'persistproxy_responses_total{code="4xx",listener="web"}') >= 2
    server = f"127.0.0.1:{origin.port}"
    assert _value(after, f'persistproxy_upstream_idle{{server="{server}",upstream="app"}}') >= 1
    assert (
        _value(after, f'persistproxy_upstream_connects_total{{server="{server}",upstream="app"}}')
        >= 1
    )


def test_twistd_runs_the_proxy_reactor_unless_told_otherwise(
    origin: Origin, proxy_factory: ProxyFactory
) -> None:
    """The plugin installs persistproxy's epoll reactor (no per-event log context)."""
    proxy = proxy_factory(origin)
    wanted = "reactor class: persistproxy.net.reactor.ProxyReactor"
    assert any(wanted in line for line in proxy.lines())
    # The start-up self-check found every internal the fast paths use: no fallback line.
    assert not [line for line in proxy.all_output() if "internals.fallback" in line]


def test_a_client_that_half_closes_gets_its_answer_and_its_connection_ends_at_once(
    origin: Origin, proxy_factory: ProxyFactory
) -> None:
    """The client's FIN after its request: the response, our FIN, and the socket closed
    then, not held for the linger time (2 s) that drains clients still sending."""
    text = make_config([f"127.0.0.1:{origin.port}"], listener={"name": "web"})
    text = '[metrics]\nbind = "tcp:0:interface=127.0.0.1"\n\n' + text
    proxy = proxy_factory(config_text=text)
    event = proxy.wait_event("metrics.started", 10)
    assert event is not None, proxy.lines()[-10:]
    metric = 'persistproxy_connections_open{listener="web"}'
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: example\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 "), data[:200]
        eof_at = time.monotonic()
        while _value(_scrape(int(event["port"])), metric) != 0:
            assert time.monotonic() - eof_at < 1.5, "still open: lingering after the client's FIN"
            time.sleep(0.05)
