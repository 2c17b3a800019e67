# -*- test-case-name: tests.unit.test_metrics -*-
"""
Counters kept as plain integers on the hot path and exposed to Prometheus at scrape time.

Incrementing an attribute costs nothing measurable; a prometheus_client counter takes a
lock on every increment. So the proxy counts into L{ProxyStats} and a custom collector reads
the numbers (and the pools' live gauges) only when someone scrapes C{/metrics}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ListenerStats", "ProxyStats", "StatsCollector"]


@dataclass
class ListenerStats:
    """
    What happened on one listener, for the access-log-free view of its traffic.
    """

    connections_total: int = 0
    connections_open: int = 0
    connections_rejected: int = 0
    requests_total: int = 0
    responses: dict[int, int] = field(default_factory=dict)
    bad_requests: int = 0
    timeouts: int = 0
    retries: int = 0
    upstream_errors: int = 0
    tls_handshakes: int = 0
    tls_resumed: int = 0
    #: Of requests_total and connections_total, those that spoke HTTP/2.
    h2_requests: int = 0
    h2_connections: int = 0
    #: Completed handshakes by (protocol version, ALPN protocol or "", resumed).
    tls_kinds: dict[tuple[str, str, bool], int] = field(default_factory=dict)
    #: Exchanges that ended without a complete response, by what ended them ("client",
    #: "upstream", "timeout", "drain", "bad_request"); also counted in C{responses} (499 if
    #: no response had started).
    aborted: dict[str, int] = field(default_factory=dict)

    def count_response(self, status: int) -> None:
        key = status // 100
        self.responses[key] = self.responses.get(key, 0) + 1


@dataclass
class ProxyStats:
    listeners: dict[str, ListenerStats] = field(default_factory=dict)

    def listener(self, name: str) -> ListenerStats:
        return self.listeners.setdefault(name, ListenerStats())


PoolGauges = Callable[[], Iterable[tuple[str, str, int, int, int, int]]]
LogDrops = Callable[[], Iterable[tuple[str, int]]]


def _no_log_drops() -> Iterable[tuple[str, int]]:
    return ()


class StatsCollector(Collector):
    """
    Renders L{ProxyStats} and the pools' state for C{prometheus_client}.

    @param pools: yields C{(upstream, server, active, idle, waiting, connects)} per pool.
    @param log_drops: yields C{(output, lines dropped)} per log output (see
        L{persistproxy.logs.LogOutput}).
    """

    def __init__(
        self, stats: ProxyStats, pools: PoolGauges, log_drops: LogDrops = _no_log_drops
    ) -> None:
        self._stats = stats
        self._pools = pools
        self._log_drops = log_drops

    def collect(self) -> Iterator[Metric]:
        counters = {
            "connections": ("connections_total", "Client connections accepted"),
            "connections_rejected": ("connections_rejected", "Client connections refused"),
            "requests": ("requests_total", "Requests received"),
            "bad_requests": ("bad_requests", "Malformed requests rejected"),
            "timeouts": ("timeouts", "Client connections closed by a timeout"),
            "retries": ("retries", "Requests retried on a new upstream connection"),
            "upstream_errors": ("upstream_errors", "Requests failed upstream"),
            "tls_handshakes": ("tls_handshakes", "TLS handshakes completed"),
            "tls_resumed": ("tls_resumed", "TLS handshakes that resumed a session"),
        }
        for metric, (attr, help_text) in counters.items():
            family = CounterMetricFamily(f"persistproxy_{metric}", help_text, labels=["listener"])
            for name, ls in self._stats.listeners.items():
                family.add_metric([name], getattr(ls, attr))
            yield family
        open_conns = GaugeMetricFamily(
            "persistproxy_connections_open", "Client connections open", labels=["listener"]
        )
        responses = CounterMetricFamily(
            "persistproxy_responses", "Responses sent by status class", labels=["listener", "code"]
        )
        for name, ls in self._stats.listeners.items():
            open_conns.add_metric([name], ls.connections_open)
            for klass, count in sorted(ls.responses.items()):
                responses.add_metric([name, f"{klass}xx"], count)
        aborted = CounterMetricFamily(
            "persistproxy_requests_aborted",
            "Requests whose response was cut short or never sent, by who ended them",
            labels=["listener", "by"],
        )
        for name, ls in self._stats.listeners.items():
            for by, count in sorted(ls.aborted.items()):
                aborted.add_metric([name, by], count)
        by_version = CounterMetricFamily(
            "persistproxy_requests_by_version",
            "Requests received, by HTTP version of the client's hop (1.x or 2)",
            labels=["listener", "version"],
        )
        for name, ls in self._stats.listeners.items():
            by_version.add_metric([name, "1.x"], ls.requests_total - ls.h2_requests)
            by_version.add_metric([name, "2"], ls.h2_requests)
        yield open_conns
        yield responses
        yield aborted
        yield by_version
        tls = CounterMetricFamily(
            "persistproxy_tls_handshakes_by_kind",
            "TLS handshakes completed, by protocol version, ALPN result and resumption",
            labels=["listener", "version", "alpn", "resumed"],
        )
        for name, ls in self._stats.listeners.items():
            for (version, alpn, resumed), count in sorted(ls.tls_kinds.items()):
                tls.add_metric([name, version, alpn, "true" if resumed else "false"], count)
        yield tls
        labels = ["upstream", "server"]
        active = GaugeMetricFamily(
            "persistproxy_upstream_active", "Upstream connections lent out", labels=labels
        )
        idle = GaugeMetricFamily(
            "persistproxy_upstream_idle", "Idle pooled upstream connections", labels=labels
        )
        waiting = GaugeMetricFamily(
            "persistproxy_upstream_waiting", "Requests queued for a connection", labels=labels
        )
        connects = CounterMetricFamily(
            "persistproxy_upstream_connects", "Upstream connections opened", labels=labels
        )
        for upstream, server, n_active, n_idle, n_waiting, n_connects in self._pools():
            active.add_metric([upstream, server], n_active)
            idle.add_metric([upstream, server], n_idle)
            waiting.add_metric([upstream, server], n_waiting)
            connects.add_metric([upstream, server], n_connects)
        yield from (active, idle, waiting, connects)
        dropped = CounterMetricFamily(
            "persistproxy_log_lines_dropped",
            "Log lines dropped because their destination did not take them in time",
            labels=["output"],
        )
        for output, count in self._log_drops():
            dropped.add_metric([output], count)
        yield dropped
