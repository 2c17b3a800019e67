"""
The counters (metrics.py) as Prometheus reads them: L{StatsCollector} renders the plain
integers of every listener and the pools' gauges only at scrape time, in the exposition
format a scrape returns.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from persistproxy.metrics import ListenerStats, ProxyStats, StatsCollector

Pools = list[tuple[str, str, int, int, int, int]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(stats: ProxyStats, pools: Pools) -> Samples:
    """{(sample name, sorted labels): value}, from the text a scrape would return."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StatsCollector(stats, lambda: pools))
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_listener_stats_count_responses_by_class() -> None:
    stats = ListenerStats()
    for status in (200, 204, 301, 404, 499, 502, 504):
        stats.count_response(status)
    assert stats.responses == {2: 2, 3: 1, 4: 2, 5: 2}


def test_proxy_stats_make_one_listener_stats_per_name() -> None:
    stats = ProxyStats()
    web = stats.listener("web")
    assert stats.listener("web") is web
    assert stats.listener("api") is not web
    assert set(stats.listeners) == {"web", "api"}


def test_counters_and_gauges_of_every_listener_and_pool() -> None:
    stats = ProxyStats()
    web = stats.listener("web")
    web.connections_total, web.connections_open, web.connections_rejected = 10, 3, 2
    web.requests_total, web.bad_requests, web.timeouts = 42, 1, 4
    web.retries, web.upstream_errors = 5, 6
    for status in (200, 200, 404, 502):
        web.count_response(status)
    web.aborted = {"client": 2, "timeout": 1}
    web.tls_handshakes, web.tls_resumed = 8, 3
    web.tls_kinds = {("TLSv1.3", "http/1.1", False): 5, ("TLSv1.3", "http/1.1", True): 3}
    stats.listener("api").requests_total = 7
    pools = [("app", "127.0.0.1:8081", 2, 5, 1, 9), ("app", "[::1]:8082", 0, 0, 0, 1)]
    got = _scrape(stats, pools)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("persistproxy_connections_total", listener="web") == 10
    assert value("persistproxy_connections_rejected_total", listener="web") == 2
    assert value("persistproxy_connections_open", listener="web") == 3
    assert value("persistproxy_requests_total", listener="web") == 42
    assert value("persistproxy_requests_total", listener="api") == 7
    assert value("persistproxy_bad_requests_total", listener="web") == 1
    assert value("persistproxy_timeouts_total", listener="web") == 4
    assert value("persistproxy_retries_total", listener="web") == 5
    assert value("persistproxy_upstream_errors_total", listener="web") == 6
    assert value("persistproxy_responses_total", listener="web", code="2xx") == 2
    assert value("persistproxy_responses_total", listener="web", code="4xx") == 1
    assert value("persistproxy_responses_total", listener="web", code="5xx") == 1
    assert ("persistproxy_responses_total", (("code", "3xx"), ("listener", "web"))) not in got
    assert value("persistproxy_requests_aborted_total", listener="web", by="client") == 2
    assert value("persistproxy_requests_aborted_total", listener="web", by="timeout") == 1
    assert value("persistproxy_tls_handshakes_total", listener="web") == 8
    assert value("persistproxy_tls_resumed_total", listener="web") == 3
    kind = {"listener": "web", "version": "TLSv1.3", "alpn": "http/1.1"}
    assert value("persistproxy_tls_handshakes_by_kind_total", resumed="false", **kind) == 5
    assert value("persistproxy_tls_handshakes_by_kind_total", resumed="true", **kind) == 3
    first = {"upstream": "app", "server": "127.0.0.1:8081"}
    assert value("persistproxy_upstream_active", **first) == 2
    assert value("persistproxy_upstream_idle", **first) == 5
    assert value("persistproxy_upstream_waiting", **first) == 1
    assert value("persistproxy_upstream_connects_total", **first) == 9
    assert value("persistproxy_upstream_connects_total", upstream="app", server="[::1]:8082") == 1


def test_numbers_are_read_at_scrape_time() -> None:
    stats = ProxyStats()
    pools: Pools = []
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StatsCollector(stats, lambda: pools))
    assert b"listener=" not in generate_latest(registry), "nothing to say before any listener"
    stats.listener("web").requests_total = 1
    pools.append(("app", "a:1", 1, 0, 0, 1))
    text = generate_latest(registry).decode()
    assert 'persistproxy_requests_total{listener="web"} 1.0' in text
    assert 'persistproxy_upstream_active{server="a:1",upstream="app"} 1.0' in text
    stats.listener("web").requests_total = 2
    assert 'persistproxy_requests_total{listener="web"} 2.0' in generate_latest(registry).decode()
