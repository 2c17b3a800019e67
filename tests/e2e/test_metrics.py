"""
The Prometheus endpoint of a running proxy: counters move with traffic, pools are visible.
"""

from __future__ import annotations

import re
import urllib.request

from conftest import ProxyFactory
from e2ehelpers import Origin, get, make_config


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
    assert any("reactor class: persistproxy.reactor.ProxyReactor" in line for line in proxy.lines())
