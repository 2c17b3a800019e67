"""
The status page: a snapshot of the service rendered as plain HTML (no script), escaped, with
the idle-age histogram of the pools; the operator's endpoints /healthz, /readyz and /status
answered by the resources the metrics listener serves.
"""

from __future__ import annotations

import io
import re
from typing import Any

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from persistproxy.config import parse_config
from persistproxy.logs import make_event_log
from persistproxy.metrics import Histogram
from persistproxy.metrics_service import metrics_root
from persistproxy.service import ProxyService
from persistproxy.status import (
    REFRESH_SECONDS,
    ListenerRow,
    ServerRow,
    StatusView,
    age_histogram,
    render,
    status_view,
)
from persistproxy.tap import protocol_plugins


class _Port:
    def __init__(self, port: int) -> None:
        self.port = port

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> None:
        return None


def _service(clock: Clock, name: str = "web") -> ProxyService:
    doc = {
        "listener": [{"name": name, "bind": "tcp:0", "upstream": "app"}],
        "upstream": [{"name": "app", "servers": ["127.0.0.1:1", "127.0.0.1:2"]}],
    }
    config = parse_config(doc, "<test>", {n: p.validate for n, p in protocol_plugins().items()})
    return ProxyService(clock, config, protocol_plugins(), make_event_log(io.StringIO()))


def _get(resource: Any, path: bytes) -> tuple[int, bytes, DummyRequest]:
    request = DummyRequest([path])
    child = resource.getChildWithDefault(path, request)
    body = child.render(request)
    return request.responseCode or 200, body, request


def test_ages_fall_in_buckets_with_the_bound_in_the_upper_one() -> None:
    assert age_histogram([0.0, 0.99, 1.0, 4.9, 14, 29, 59, 119, 299, 300, 5000]) == [
        2, 2, 1, 1, 1, 1, 1, 2,
    ]  # fmt: skip
    assert age_histogram([]) == [0] * 8


def test_everything_from_the_configuration_or_the_network_is_escaped() -> None:
    evil = '<script>alert("x")</script>'
    view = StatusView(
        version="1",
        uptime=3725,
        draining=False,
        ready=True,
        listeners=[ListenerRow(evil, "http", evil, False, True, 1, 0, 2, 3, {2: 3}, Histogram())],
        servers=[ServerRow(evil, evil, 0, 0, 0, 0, 0, 0, 0, Histogram(), [0] * 8)],
    )
    page = render(view).decode()
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' in page
    assert "1h 2m 5s" in page


def test_the_page_shows_listeners_servers_and_idle_ages() -> None:
    clock = Clock()
    clock.advance(1000)
    service = _service(clock)
    service.startService()
    service.listeners[0].port = _Port(8080)  # type: ignore[assignment]
    stats = service.proxy_stats.listener("web")
    stats.connections_total, stats.requests_total, stats.connections_open = 4, 10, 2
    stats.responses[2] = 9
    stats.responses[5] = 1
    up = stats.upstream("app", "127.0.0.1:1")
    up.requests, up.reused = 10, 8
    for _ in range(10):
        up.durations.observe(0.004)
    view = status_view(service, started=400, now=clock.seconds())
    assert view.ready and not view.draining and view.uptime == 600
    assert [(r.name, r.address, r.requests) for r in view.listeners] == [
        ("web", "127.0.0.1:8080", 10)
    ]
    rows = {r.server: r for r in view.servers}
    assert set(rows) == {"127.0.0.1:1", "127.0.0.1:2"}  # configured, traffic or not
    assert (rows["127.0.0.1:1"].requests, rows["127.0.0.1:1"].reused) == (10, 8)
    page = render(view).decode()
    assert "80.0 %" in page  # reuse of the upstream connections
    assert "2.5" in page  # requests per client connection
    assert re.search(r"<td>4\.0</td><td>&le; 5</td>", page), "average and p99 in ms"
    assert 'class="state ok">serving' in page


def test_healthz_readyz_and_status_follow_the_service() -> None:
    clock = Clock()
    service = _service(clock)
    root = metrics_root(clock, service)
    assert _get(root, b"healthz")[:2] == (200, b"ok\n")
    status, body, _ = _get(root, b"readyz")
    assert (status, body) == (503, b"not ready\n"), "listeners not bound yet"
    service.startService()
    service.listeners[0].port = _Port(8080)  # type: ignore[assignment]
    assert _get(root, b"readyz")[:2] == (200, b"ready\n")
    status, body, request = _get(root, b"status")
    assert status == 200 and b"127.0.0.1:8080" in body
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    drained: list[object] = []
    service.when_drained().addCallback(drained.append)
    service.stopService()  # nothing open: the drain is over at once
    assert _get(root, b"readyz")[:2] == (503, b"draining\n")
    assert b"draining" in _get(root, b"status")[1]
    assert drained == [None]
    assert service.when_drained().called, "after the drain, at once"


def test_a_servers_learned_idle_limit_is_on_its_row() -> None:
    """The keep-alive race's learned limit (the tightest of the server's pools) is shown."""
    from persistproxy.status import ServerRow, _servers_table

    def row(limit: float | None) -> ServerRow:
        return ServerRow(
            "app", "127.0.0.1:1", 0, 1, 0, 1, 0, 3, 2, Histogram(), [0] * 8, learned_idle=limit
        )

    assert "<td>1.2 s</td>" in _servers_table([row(1.25)])
    assert "<td>-</td>" in _servers_table([row(None)])


def test_the_page_and_the_metrics_show_whether_each_server_is_up() -> None:
    clock = Clock()
    service = _service(clock)
    service.startService()
    service.router.servers["app"][1].health.failed(clock.seconds())
    view = status_view(service, started=0, now=clock.seconds())
    rows = {r.server: r.health for r in view.servers}
    assert rows == {"127.0.0.1:1": "up", "127.0.0.1:2": "down (fails)"}
    page = render(view).decode()
    assert '<td class="name warn">down (fails)</td>' in page
    assert '<td class="name">up</td>' in page
    states = {s.server: s.health for s in service.pool_gauges()}
    assert states == rows
    service.router.servers["app"][0].health.checked_up = False
    assert {s.server: s.health for s in service.pool_gauges()}["127.0.0.1:1"] == "down (check)"
