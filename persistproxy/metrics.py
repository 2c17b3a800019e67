# -*- test-case-name: tests.unit.test_metrics -*-
"""
Counters kept as plain integers on the hot path and exposed to Prometheus at scrape time.

Incrementing an attribute costs nothing measurable; a prometheus_client counter takes a
lock on every increment. So the proxy counts into L{ProxyStats} and a custom collector reads
the numbers (and the pools' live gauges) only when someone scrapes C{/metrics}.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "ABORTED_BY",
    "DURATION_BUCKETS",
    "Histogram",
    "ListenerStats",
    "PoolState",
    "ProxyStats",
    "StatsCollector",
    "UpstreamStats",
]

#: Upper bounds (seconds) of the request-duration histograms' buckets.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip

#: Who may end an exchange early (C{ListenerStats.aborted}'s keys), all shown from the start.
ABORTED_BY = ("client", "upstream", "timeout", "drain", "bad_request")


class Histogram:
    """
    Counts of observations per bucket of L{DURATION_BUCKETS} (the last one is C{+Inf}),
    kept as plain integers: observing costs one C{bisect} and two additions, no lock and no
    object, and the cumulative counts Prometheus wants are computed at scrape time.
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bound >= seconds, so a value equal to a bound is in it (le).
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: Histogram) -> None:
        """Add C{other}'s observations to these (scrape time: one upstream, all listeners)."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def cumulative(self) -> list[tuple[str, float]]:
        """The buckets as Prometheus states them: C{(le, observations <= le)}, then +Inf."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(DURATION_BUCKETS, self.counts, strict=False):
            total += count
            out.append((repr(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


@dataclass
class UpstreamStats:
    """
    What one listener's exchanges did with one upstream server: the requests sent to it
    (answered or not), how many went on a reused pooled connection, and how long they took.
    """

    requests: int = 0
    reused: int = 0
    durations: Histogram = field(default_factory=Histogram)


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
    #: Bytes read from clients and written to them (after TLS: application bytes).
    bytes_in: int = 0
    bytes_out: int = 0
    #: Connections that spoke plain text to a TLS listener (answered, closed).
    tls_plaintext: int = 0
    #: Exchanges' durations, from the request head to the end of the response (or its cut).
    durations: Histogram = field(default_factory=Histogram)
    #: Per C{(upstream, server)} the exchanges of this listener went to.
    upstreams: dict[tuple[str, str], UpstreamStats] = field(default_factory=dict)
    #: How many of the listener's connections are idle between requests, if the protocol
    #: knows (set by the plugin; read at scrape time only).
    idle: Callable[[], int] | None = None

    def count_response(self, status: int) -> None:
        key = status // 100
        self.responses[key] = self.responses.get(key, 0) + 1

    def upstream(self, upstream: str, server: str) -> UpstreamStats:
        """The counters of C{server} of C{upstream} for this listener's exchanges."""
        key = (upstream, server)
        found = self.upstreams.get(key)
        if found is None:
            found = self.upstreams[key] = UpstreamStats()
        return found

    def idle_connections(self) -> int | None:
        return self.idle() if self.idle is not None else None


@dataclass
class ProxyStats:
    listeners: dict[str, ListenerStats] = field(default_factory=dict)

    def listener(self, name: str) -> ListenerStats:
        return self.listeners.setdefault(name, ListenerStats())


@dataclass(frozen=True)
class PoolState:
    """
    One upstream server's pool as a scrape or the status page sees it.

    @ivar connects: connections opened (connected); C{connect_failures} the attempts that
        failed. @ivar idle_ages: seconds each idle connection has been idle (status page).
    """

    upstream: str
    server: str
    active: int = 0
    idle: int = 0
    waiting: int = 0
    connects: int = 0
    connect_failures: int = 0
    idle_ages: tuple[float, ...] = ()
    #: The idle limit learned from the server's closes (None while nothing is learned).
    learned_idle: float | None = None
    #: The server's health: "up", "down (check)" (active check) or "down (fails)" (passive).
    health: str = "up"


PoolGauges = Callable[[], Iterable[PoolState]]
LogDrops = Callable[[], Iterable[tuple[str, int]]]


def _no_log_drops() -> Iterable[tuple[str, int]]:
    return ()


def build_info() -> dict[str, str]:
    """The labels of C{persistproxy_build_info}: what is running, for dashboards and alerts."""
    import twisted
    from persistproxy import __version__

    return {
        "version": __version__,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
    }


class StatsCollector(Collector):
    """
    Renders L{ProxyStats} and the pools' state for C{prometheus_client}.

    Every labelled series that can be known in advance is there from the first scrape, at 0
    (each listener's response classes and abort reasons, each configured server's pool), so
    that C{rate()} and alerts see a series begin at 0 instead of appearing with its first
    event. Only the TLS handshake kinds appear as they happen.

    @param pools: yields a L{PoolState} per upstream server and protocol.
    @param log_drops: yields C{(output, lines dropped)} per log output (see
        L{persistproxy.log_output.LogOutput}).
    """

    def __init__(
        self, stats: ProxyStats, pools: PoolGauges, log_drops: LogDrops = _no_log_drops
    ) -> None:
        self._stats = stats
        self._pools = pools
        self._log_drops = log_drops

    def collect(self) -> Iterator[Metric]:
        listeners = self._stats.listeners
        info = build_info()
        build = GaugeMetricFamily(
            "persistproxy_build_info", "What is running: always 1", labels=sorted(info)
        )
        build.add_metric([info[k] for k in sorted(info)], 1)
        yield build
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
            "tls_plaintext": (
                "tls_plaintext",
                "Connections that sent plain text to a TLS listener (answered, then closed)",
            ),
            "received_bytes": ("bytes_in", "Bytes read from clients (inside TLS)"),
            "sent_bytes": ("bytes_out", "Bytes of responses written to clients (inside TLS)"),
        }
        for metric, (attr, help_text) in counters.items():
            family = CounterMetricFamily(f"persistproxy_{metric}", help_text, labels=["listener"])
            for name, ls in listeners.items():
                family.add_metric([name], getattr(ls, attr))
            yield family
        open_conns = GaugeMetricFamily(
            "persistproxy_connections_open", "Client connections open", labels=["listener"]
        )
        idle_conns = GaugeMetricFamily(
            "persistproxy_connections_idle",
            "Client connections idle between requests (keep-alive)",
            labels=["listener"],
        )
        responses = CounterMetricFamily(
            "persistproxy_responses", "Responses sent by status class", labels=["listener", "code"]
        )
        for name, ls in listeners.items():
            open_conns.add_metric([name], ls.connections_open)
            idle = ls.idle_connections()
            if idle is not None:
                idle_conns.add_metric([name], idle)
            for klass in sorted({1, 2, 3, 4, 5, *ls.responses}):
                responses.add_metric([name, f"{klass}xx"], ls.responses.get(klass, 0))
        aborted = CounterMetricFamily(
            "persistproxy_requests_aborted",
            "Requests whose response was cut short or never sent, by who ended them",
            labels=["listener", "by"],
        )
        for name, ls in listeners.items():
            for by in sorted({*ABORTED_BY, *ls.aborted}):
                aborted.add_metric([name, by], ls.aborted.get(by, 0))
        by_version = CounterMetricFamily(
            "persistproxy_requests_by_version",
            "Requests received, by HTTP version of the client's hop (1.x or 2)",
            labels=["listener", "version"],
        )
        for name, ls in listeners.items():
            by_version.add_metric([name, "1.x"], ls.requests_total - ls.h2_requests)
            by_version.add_metric([name, "2"], ls.h2_requests)
        yield open_conns
        yield idle_conns
        yield responses
        yield aborted
        yield by_version
        durations = HistogramMetricFamily(
            "persistproxy_request_duration_seconds",
            "Time from a request's head to the end of its response, per listener",
            labels=["listener"],
        )
        for name, ls in listeners.items():
            durations.add_metric([name], ls.durations.cumulative(), ls.durations.sum)
        yield durations
        tls = CounterMetricFamily(
            "persistproxy_tls_handshakes_by_kind",
            "TLS handshakes completed, by protocol version, ALPN result and resumption",
            labels=["listener", "version", "alpn", "resumed"],
        )
        for name, ls in listeners.items():
            for (version, alpn, resumed), count in sorted(ls.tls_kinds.items()):
                tls.add_metric([name, version, alpn, "true" if resumed else "false"], count)
        yield tls
        yield from self._upstream_families()
        dropped = CounterMetricFamily(
            "persistproxy_log_lines_dropped",
            "Log lines dropped because their destination did not take them in time",
            labels=["output"],
        )
        for output, count in self._log_drops():
            dropped.add_metric([output], count)
        yield dropped

    def _upstream_families(self) -> Iterator[Metric]:
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
            "persistproxy_upstream_connects",
            "Upstream connections opened (connected)",
            labels=labels,
        )
        learned = GaugeMetricFamily(
            "persistproxy_upstream_learned_idle_seconds",
            "How long the server is believed to keep an idle connection, learned from its"
            " closes of idle pooled connections (absent while nothing is learned)",
            labels=labels,
        )
        failures = CounterMetricFamily(
            "persistproxy_upstream_connect_failures",
            "Upstream connection attempts that failed (refused, timed out, no descriptor)",
            labels=labels,
        )
        up = GaugeMetricFamily(
            "persistproxy_upstream_up",
            "1 while the server is in the rotation, 0 while it is down (its active health"
            " check failed, or max_fails connects failed within fail_timeout)",
            labels=labels,
        )
        # Pools are per server and protocol: a server's line sums its pools.
        sums: dict[tuple[str, str], list[int]] = {}
        limits: dict[tuple[str, str], float] = {}
        health: dict[tuple[str, str], str] = {}
        for state in self._pools():
            key = (state.upstream, state.server)
            health[key] = state.health
            if state.learned_idle is not None:
                # The tightest any protocol's pool learned is what the server does.
                limits[key] = min(limits.get(key, state.learned_idle), state.learned_idle)
            row = sums.setdefault(key, [0, 0, 0, 0, 0])
            for i, value in enumerate(
                (state.active, state.idle, state.waiting, state.connects, state.connect_failures)
            ):
                row[i] += value
        for key, (n_active, n_idle, n_waiting, n_connects, n_failures) in sums.items():
            active.add_metric(list(key), n_active)
            idle.add_metric(list(key), n_idle)
            waiting.add_metric(list(key), n_waiting)
            connects.add_metric(list(key), n_connects)
            failures.add_metric(list(key), n_failures)
        for key, limit in limits.items():
            learned.add_metric(list(key), limit)
        for key, condition in health.items():
            up.add_metric(list(key), 1 if condition == "up" else 0)
        yield from (active, idle, waiting, connects, failures, learned, up)
        per_server: dict[tuple[str, str], UpstreamStats] = {key: UpstreamStats() for key in sums}
        for ls in self._stats.listeners.values():
            for key, us in ls.upstreams.items():
                total = per_server.setdefault(key, UpstreamStats())
                total.requests += us.requests
                total.reused += us.reused
                total.durations.add(us.durations)
        requests = CounterMetricFamily(
            "persistproxy_upstream_requests", "Requests sent to the server", labels=labels
        )
        reused = CounterMetricFamily(
            "persistproxy_upstream_reused",
            "Requests sent on a pooled (reused) connection",
            labels=labels,
        )
        durations = HistogramMetricFamily(
            "persistproxy_upstream_request_duration_seconds",
            "Time from a request's head to the end of its response, per upstream server",
            labels=labels,
        )
        for key, us in per_server.items():
            requests.add_metric(list(key), us.requests)
            reused.add_metric(list(key), us.reused)
            durations.add_metric(list(key), us.durations.cumulative(), us.durations.sum)
        yield from (requests, reused, durations)
