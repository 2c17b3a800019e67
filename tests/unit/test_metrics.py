"""
The counters (metrics.py) as Prometheus reads them: L{StatsCollector} renders the plain
integers of every listener and the pools' gauges only at scrape time, in the exposition
format a scrape returns; histograms counted into plain integers, every labelled series
present from the first scrape, the build info, and what the hot path feeds them.
"""

from __future__ import annotations

import time
from typing import Any

from fakes import OK_RESPONSE, Harness, parse_response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from persistproxy.metrics import (
    DURATION_BUCKETS,
    Histogram,
    ListenerStats,
    PoolState,
    ProxyStats,
    StatsCollector,
)

Pools = list[PoolState]
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
    pools: Pools = [
        PoolState("app", "127.0.0.1:8081", 2, 5, 1, 9, learned_idle=1.25),
        PoolState("app", "[::1]:8082", 0, 0, 0, 1),
    ]
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
    assert value("persistproxy_responses_total", listener="web", code="3xx") == 0
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
    assert value("persistproxy_upstream_learned_idle_seconds", **first) == 1.25
    second = (("server", "[::1]:8082"), ("upstream", "app"))
    assert ("persistproxy_upstream_learned_idle_seconds", second) not in got, "nothing learned"


def test_numbers_are_read_at_scrape_time() -> None:
    stats = ProxyStats()
    pools: Pools = []
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StatsCollector(stats, lambda: pools))
    assert b"listener=" not in generate_latest(registry), "nothing to say before any listener"
    stats.listener("web").requests_total = 1
    pools.append(PoolState("app", "a:1", 1, 0, 0, 1))
    text = generate_latest(registry).decode()
    assert 'persistproxy_requests_total{listener="web"} 1.0' in text
    assert 'persistproxy_upstream_active{server="a:1",upstream="app"} 1.0' in text
    stats.listener("web").requests_total = 2
    assert 'persistproxy_requests_total{listener="web"} 2.0' in generate_latest(registry).decode()


# -- histograms, series from the start, what exchanges feed ------------------------------------

GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"


def _scrape_lines(stats: ProxyStats, pools: Any = list) -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StatsCollector(stats, pools))
    samples: dict[str, float] = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_a_histogram_counts_each_value_in_the_first_bucket_at_or_above_it() -> None:
    h = Histogram()
    for value in (0.0, 0.001, 0.0011, 0.3, 61.0):
        h.observe(value)
    assert h.count == 5 and abs(h.sum - 61.3021) < 1e-9
    cumulative = dict(h.cumulative())
    assert cumulative["0.001"] == 2  # le: 0.001 itself is in the 0.001 bucket
    assert cumulative["0.0025"] == 3
    assert cumulative["0.25"] == 3 and cumulative["0.5"] == 4
    assert cumulative["60.0"] == 4 and cumulative["+Inf"] == 5
    assert len(cumulative) == len(DURATION_BUCKETS) + 1


def test_every_labelled_series_is_there_before_anything_happened() -> None:
    stats = ProxyStats()
    stats.listener("web")
    pools = [PoolState("app", "127.0.0.1:8081"), PoolState("app", "127.0.0.1:8082")]
    samples = _scrape_lines(stats, lambda: pools)
    for klass in ("1xx", "2xx", "3xx", "4xx", "5xx"):
        assert samples[f'persistproxy_responses_total{{code="{klass}",listener="web"}}'] == 0
    for by in ("client", "upstream", "timeout", "drain", "bad_request"):
        assert samples[f'persistproxy_requests_aborted_total{{by="{by}",listener="web"}}'] == 0
    for server in ("127.0.0.1:8081", "127.0.0.1:8082"):
        labels = f'server="{server}",upstream="app"'
        for name in (
            "upstream_connects_total",
            "upstream_connect_failures_total",
            "upstream_requests_total",
            "upstream_reused_total",
            "upstream_idle",
            "upstream_request_duration_seconds_count",
        ):
            assert samples[f"persistproxy_{name}{{{labels}}}"] == 0, name
    for name in ("received_bytes_total", "sent_bytes_total", "tls_plaintext_total"):
        assert samples[f'persistproxy_{name}{{listener="web"}}'] == 0
    assert samples['persistproxy_request_duration_seconds_bucket{le="+Inf",listener="web"}'] == 0
    build = [k for k in samples if k.startswith("persistproxy_build_info{")]
    assert len(build) == 1 and 'version="' in build[0] and 'python="' in build[0]
    assert samples[build[0]] == 1


def test_an_upstream_servers_pools_are_summed_and_its_traffic_over_all_listeners() -> None:
    stats = ProxyStats()
    for name, durations in (("a", (0.002,)), ("b", (0.2, 0.3))):
        upstream = stats.listener(name).upstream("app", "s:1")
        for d in durations:
            upstream.requests += 1
            upstream.durations.observe(d)
        upstream.reused += 1
    pools = [PoolState("app", "s:1", 1, 2, 0, 3, 4), PoolState("app", "s:1", 0, 1, 0, 1, 0)]
    samples = _scrape_lines(stats, lambda: pools)
    labels = 'server="s:1",upstream="app"'
    assert samples[f"persistproxy_upstream_idle{{{labels}}}"] == 3
    assert samples[f"persistproxy_upstream_connects_total{{{labels}}}"] == 4
    assert samples[f"persistproxy_upstream_connect_failures_total{{{labels}}}"] == 4
    assert samples[f"persistproxy_upstream_requests_total{{{labels}}}"] == 3
    assert samples[f"persistproxy_upstream_reused_total{{{labels}}}"] == 2
    bucket = 'persistproxy_upstream_request_duration_seconds_bucket{{le="{}",{}}}'
    assert samples[bucket.format("0.0025", labels)] == 1
    assert samples[bucket.format("0.25", labels)] == 2
    assert samples[bucket.format("+Inf", labels)] == 3


def test_exchanges_feed_the_histograms_bytes_and_per_server_counters() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(GET)
    h.clock.advance(0.02)
    h.origin.respond(OK_RESPONSE)
    client.dataReceived(GET)
    h.clock.advance(0.2)
    h.origin.respond(OK_RESPONSE)
    stats: ListenerStats = h.stats
    assert stats.bytes_in == 2 * len(GET)
    assert stats.bytes_out == len(transport.value())
    assert stats.durations.count == 2
    assert dict(stats.durations.cumulative())["0.025"] == 1
    assert dict(stats.durations.cumulative())["0.25"] == 2
    upstream = stats.upstreams[("app", "127.0.0.1:8081")]
    assert (upstream.requests, upstream.reused, upstream.durations.count) == (2, 1, 2)


def test_a_refused_request_is_timed_but_has_no_server() -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(b"GET /a HTTP/1.1\r\n\r\n")  # no Host: 400
    assert parse_response(transport.value())[0] == 400
    assert h.stats.durations.count == 1
    assert h.stats.upstreams == {}


def test_the_idle_gauge_is_read_from_the_plugin_at_scrape_time() -> None:
    stats = ProxyStats()
    idle = [3]
    stats.listener("web").idle = lambda: idle[0]
    assert _scrape_lines(stats)['persistproxy_connections_idle{listener="web"}'] == 3
    idle[0] = 0
    assert _scrape_lines(stats)['persistproxy_connections_idle{listener="web"}'] == 0


def test_counting_a_duration_costs_little() -> None:
    """
    The histogram's cost per observation (a measurement, printed; the bound is generous): it
    is on the path of every request.
    """
    h = Histogram()
    n = 200_000
    start = time.perf_counter()
    for i in range(n):
        h.observe(i * 1e-6)
    per = (time.perf_counter() - start) / n * 1e9
    print(f"\nHistogram.observe: {per:.0f} ns per observation")
    assert h.count == n
    assert per < 5000


def test_connects_count_connections_opened_and_failures_apart() -> None:
    h = Harness()
    h.origin.refuse = True
    client, transport = h.client()
    client.dataReceived(GET)
    assert parse_response(transport.value())[0] == 502
    assert (h.pool.connects, h.pool.connect_failures) == (0, 1)
    h.origin.refuse = False
    client, transport = h.client()
    client.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert (h.pool.connects, h.pool.connect_failures) == (1, 1)


def test_idle_ages_are_read_from_the_idle_stack() -> None:
    h = Harness()
    first, _ = h.client()
    second, _ = h.client()
    first.dataReceived(GET)
    second.dataReceived(GET)
    h.origin.respond(OK_RESPONSE, 0)
    h.clock.advance(10)
    h.origin.respond(OK_RESPONSE, 1)
    h.clock.advance(2.5)
    assert sorted(h.pool.idle_ages()) == [2.5, 12.5]
    h.origin.connections[0].connectionLost(None)  # closed by the origin while idle
    assert h.pool.idle_ages() == [2.5]


def test_upstream_up_is_one_per_server_in_the_rotation() -> None:
    pools = [
        PoolState("app", "s:1"),
        PoolState("app", "s:2", health="down (fails)"),
        PoolState("app", "s:3", health="down (check)"),
    ]
    samples = _scrape(ProxyStats(), pools)
    up = {
        dict(labels)["server"]: value
        for (name, labels), value in samples.items()
        if name == "persistproxy_upstream_up"
    }
    assert up == {"s:1": 1, "s:2": 0, "s:3": 0}
