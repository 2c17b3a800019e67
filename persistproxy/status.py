# -*- test-case-name: tests.unit.test_status -*-
"""
The status page (C{/status} on the metrics listener), like HAProxy's stats page: what each
listener and each upstream server is doing now, for a person with a browser.

It is plain server-rendered HTML and CSS, no script: the browser reloads it every few seconds
(C{<meta http-equiv="refresh">}). Everything on it is computed when it is requested, from the
same integer counters C{/metrics} reads and from the pools' idle stacks (each idle
connection's age), so the page costs the proxy nothing between requests. Every name on it
comes from the configuration or from the network (server addresses): all of it is escaped.

L{StatusView} is the snapshot, built from the running service by L{status_view}; L{render}
turns one into a page and is a pure function, so the page is tested without a reactor.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from persistproxy import __version__
from persistproxy.metrics import DURATION_BUCKETS, Histogram, PoolState, UpstreamStats

__all__ = [
    "AGE_BUCKETS",
    "REFRESH_SECONDS",
    "ListenerRow",
    "ServerRow",
    "StatusView",
    "age_histogram",
    "render",
    "status_view",
]

#: Seconds between the browser's reloads of the page.
REFRESH_SECONDS = 5

#: Upper bounds (seconds) of the idle-age histogram's buckets; the last bucket is open.
AGE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
_AGE_LABELS = ("<1s", "1-5s", "5-15s", "15-30s", "30-60s", "1-2m", "2-5m", "\u22655m")


def age_histogram(ages: Iterable[float]) -> list[int]:
    """How many idle connections fall in each bucket of L{AGE_BUCKETS} (plus the open one)."""
    counts = [0] * (len(AGE_BUCKETS) + 1)
    for age in ages:
        i = 0
        while i < len(AGE_BUCKETS) and age >= AGE_BUCKETS[i]:
            i += 1
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class ListenerRow:
    """One listener, as the page shows it."""

    name: str
    protocol: str
    address: str
    tls: bool
    listening: bool
    open: int
    idle: int | None
    connections: int
    requests: int
    responses: dict[int, int]
    durations: Histogram
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class ServerRow:
    """One upstream server (its pools summed), as the page shows it."""

    upstream: str
    server: str
    active: int
    idle: int
    waiting: int
    connects: int
    connect_failures: int
    requests: int
    reused: int
    durations: Histogram
    idle_ages: list[int]
    #: The idle limit learned from the server's closes, if any (see upstream/idle_estimate).
    learned_idle: float | None = None
    #: "up", "down (check)" or "down (fails)" (see upstream/health).
    health: str = "up"


@dataclass(frozen=True)
class StatusView:
    """Everything on the page, taken at one moment."""

    version: str
    uptime: float
    draining: bool
    ready: bool
    listeners: Sequence[ListenerRow]
    servers: Sequence[ServerRow]
    generated: float = field(default_factory=time.time)


def status_view(proxy: Any, started: float, now: float) -> StatusView:
    """
    A snapshot of a running L{persistproxy.service.ProxyService}: listeners from their
    services and counters, servers from the pools (idle stacks walked now) and from every
    listener's per-server counters.
    """
    listeners = []
    for service in proxy.listeners:
        config = service.config
        ls = proxy.proxy_stats.listener(config.name)
        port = service.port
        address = config.bind
        if port is not None:
            host = port.getHost()
            if getattr(host, "port", None) is not None:
                address = f"{host.host}:{host.port}"
        listeners.append(
            ListenerRow(
                name=config.name,
                protocol=config.protocol,
                address=address,
                tls=config.tls is not None,
                listening=port is not None,
                open=ls.connections_open,
                idle=ls.idle_connections(),
                connections=ls.connections_total,
                requests=ls.requests_total,
                responses=dict(ls.responses),
                durations=ls.durations,
                bytes_in=ls.bytes_in,
                bytes_out=ls.bytes_out,
            )
        )
    pools: dict[tuple[str, str], list[PoolState]] = {}
    for state in proxy.pool_gauges(with_ages=True):
        pools.setdefault((state.upstream, state.server), []).append(state)
    traffic: dict[tuple[str, str], UpstreamStats] = {}
    for ls in proxy.proxy_stats.listeners.values():
        for key, us in ls.upstreams.items():
            total = traffic.setdefault(key, UpstreamStats())
            total.requests += us.requests
            total.reused += us.reused
            total.durations.add(us.durations)
    servers = []
    for key in [*pools, *(k for k in traffic if k not in pools)]:
        states = pools.get(key, [])
        us = traffic.get(key, UpstreamStats())
        servers.append(
            ServerRow(
                upstream=key[0],
                server=key[1],
                active=sum(s.active for s in states),
                idle=sum(s.idle for s in states),
                waiting=sum(s.waiting for s in states),
                connects=sum(s.connects for s in states),
                connect_failures=sum(s.connect_failures for s in states),
                requests=us.requests,
                reused=us.reused,
                durations=us.durations,
                idle_ages=age_histogram(age for s in states for age in s.idle_ages),
                learned_idle=min(
                    (s.learned_idle for s in states if s.learned_idle is not None),
                    default=None,
                ),
                health=states[0].health if states else "up",
            )
        )
    return StatusView(
        version=__version__,
        uptime=max(0.0, now - started),
        draining=proxy.draining(),
        ready=proxy.ready(),
        listeners=listeners,
        servers=servers,
        generated=now,
    )


# -- rendering -------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em;
       color: #1d2330; background: #f6f7f9; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
h2 { font-size: 1.1em; margin: 1.6em 0 .5em; }
.meta { color: #5b6475; }
.state { display: inline-block; padding: .1em .6em; border-radius: 1em; font-weight: 600;
         color: #fff; }
.state.ok { background: #2e8540; } .state.draining { background: #c05600; }
table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px #0002; }
th, td { padding: .35em .7em; border-bottom: 1px solid #e3e6eb; text-align: right;
         white-space: nowrap; }
th { background: #2b3445; color: #fff; font-weight: 600; }
td.name, th.name { text-align: left; }
tr:last-child td { border-bottom: none; }
td.warn { color: #b00020; font-weight: 600; }
.muted { color: #8a93a3; }
.bars { display: flex; align-items: flex-end; gap: 2px; height: 36px; }
.bar { width: 14px; background: #4a78c2; border-radius: 2px 2px 0 0; min-height: 1px; }
.bar.zero { background: #d5dae3; }
.hist { display: grid; grid-template-columns: repeat(8, 4.2em); gap: .3em; align-items: end;
        background: #fff; padding: .8em; box-shadow: 0 1px 2px #0002; width: max-content; }
.hist .col { display: flex; flex-direction: column; align-items: center; }
.hist .bar { width: 2.6em; }
.hist .count { font-variant-numeric: tabular-nums; }
.hist .label { color: #5b6475; font-size: .85em; }
footer { margin-top: 2em; color: #8a93a3; font-size: .85em; }
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _ratio(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def _per(part: int, whole: int) -> str:
    return f"{part / whole:.1f}" if whole else "-"


def _avg_ms(h: Histogram) -> str:
    count = h.count
    return f"{1000 * h.sum / count:.1f}" if count else "-"


def _quantile_ms(h: Histogram, q: float) -> str:
    """The upper bound of the bucket holding the C{q} quantile (as Prometheus estimates)."""
    total = h.count
    if not total:
        return "-"
    seen = 0
    for bound, count in zip(DURATION_BUCKETS, h.counts, strict=False):
        seen += count
        if seen >= q * total:
            return f"&le; {1000 * bound:g}"
    return f"&gt; {1000 * DURATION_BUCKETS[-1]:g}"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {s}s"
    return f"{minutes}m {s}s"


def _bars(counts: Sequence[int]) -> str:
    top = max(counts) or 1
    cells = []
    for label, count in zip(_AGE_LABELS, counts, strict=True):
        height = max(1, round(36 * count / top)) if count else 1
        kind = "bar" if count else "bar zero"
        cells.append(
            f'<div class="{kind}" style="height:{height}px" title="{_e(label)}: {count}"></div>'
        )
    return f'<div class="bars">{"".join(cells)}</div>'


def _listeners_table(rows: Sequence[ListenerRow]) -> str:
    head = (
        "<tr><th class=name>listener</th><th class=name>protocol</th><th class=name>address</th>"
        "<th>open</th><th>idle</th><th>connections</th><th>requests</th><th>req/conn</th>"
        "<th>2xx</th><th>3xx</th><th>4xx</th><th>5xx</th><th>avg ms</th><th>p99 ms</th>"
        "<th>in</th><th>out</th></tr>"
    )
    body = []
    for r in rows:
        address = _e(r.address) + (" (TLS)" if r.tls else "")
        if not r.listening:
            address += ' <span class="muted">(not listening)</span>'
        fives = r.responses.get(5, 0)
        body.append(
            "<tr>"
            f"<td class=name><b>{_e(r.name)}</b></td><td class=name>{_e(r.protocol)}</td>"
            f"<td class=name>{address}</td>"
            f"<td>{r.open}</td><td>{'-' if r.idle is None else r.idle}</td>"
            f"<td>{r.connections}</td><td>{r.requests}</td>"
            f"<td>{_per(r.requests, r.connections)}</td>"
            f"<td>{r.responses.get(2, 0)}</td><td>{r.responses.get(3, 0)}</td>"
            f"<td>{r.responses.get(4, 0)}</td>"
            f"<td{' class=warn' if fives else ''}>{fives}</td>"
            f"<td>{_avg_ms(r.durations)}</td><td>{_quantile_ms(r.durations, 0.99)}</td>"
            f"<td>{_bytes(r.bytes_in)}</td><td>{_bytes(r.bytes_out)}</td>"
            "</tr>"
        )
    if not body:
        body.append('<tr><td class="name muted" colspan=16>no listener</td></tr>')
    return f"<table id=listeners>{head}{''.join(body)}</table>"


def _servers_table(rows: Sequence[ServerRow]) -> str:
    head = (
        "<tr><th class=name>upstream</th><th class=name>server</th><th class=name>state</th>"
        "<th>open</th><th>lent</th>"
        "<th>idle</th><th>queued</th><th>connects</th><th>failed</th><th>requests</th>"
        "<th>reused</th><th>req/conn</th><th>avg ms</th><th>p99 ms</th>"
        "<th>learned idle</th><th class=name>idle ages (&lt;1s &hellip; &ge;5m)</th></tr>"
    )
    body = []
    for r in rows:
        body.append(
            "<tr>"
            f"<td class=name><b>{_e(r.upstream)}</b></td><td class=name>{_e(r.server)}</td>"
            f'<td class="name{"" if r.health == "up" else " warn"}">{_e(r.health)}</td>'
            f"<td>{r.active + r.idle}</td><td>{r.active}</td><td>{r.idle}</td>"
            f"<td{' class=warn' if r.waiting else ''}>{r.waiting}</td>"
            f"<td>{r.connects}</td>"
            f"<td{' class=warn' if r.connect_failures else ''}>{r.connect_failures}</td>"
            f"<td>{r.requests}</td><td>{_ratio(r.reused, r.requests)}</td>"
            f"<td>{_per(r.requests, r.connects)}</td>"
            f"<td>{_avg_ms(r.durations)}</td><td>{_quantile_ms(r.durations, 0.99)}</td>"
            f"<td>{'-' if r.learned_idle is None else f'{r.learned_idle:.1f} s'}</td>"
            f"<td class=name>{_bars(r.idle_ages)}</td>"
            "</tr>"
        )
    if not body:
        body.append('<tr><td class="name muted" colspan=16>no upstream server</td></tr>')
    return f"<table id=servers>{head}{''.join(body)}</table>"


def _age_section(rows: Sequence[ServerRow]) -> str:
    totals = [sum(column) for column in zip(*(r.idle_ages for r in rows), strict=True)]
    if not totals:
        totals = [0] * len(_AGE_LABELS)
    top = max(totals) or 1
    cols = []
    for label, count in zip(_AGE_LABELS, totals, strict=True):
        height = max(2, round(120 * count / top)) if count else 2
        kind = "bar" if count else "bar zero"
        cols.append(
            f"<div class=col><span class=count>{count}</span>"
            f'<div class="{kind}" style="height:{height}px"></div>'
            f"<span class=label>{_e(label)}</span></div>"
        )
    return f"<div class=hist id=idle-ages>{''.join(cols)}</div>"


def render(view: StatusView) -> bytes:
    """The whole page for C{view}, as UTF-8 bytes."""
    state = (
        '<span class="state draining">draining</span>'
        if view.draining
        else (
            '<span class="state ok">serving</span>'
            if view.ready
            else '<span class="state draining">not ready</span>'
        )
    )
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.generated))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>persistproxy status</title>
<style>{_CSS}</style></head>
<body>
<h1>persistproxy {_e(view.version)} {state}</h1>
<div class=meta>up {_duration(view.uptime)} &middot; {generated} &middot; reloads every
{REFRESH_SECONDS} s &middot; <a href="/metrics">/metrics</a></div>
<h2>Listeners (client hop)</h2>
{_listeners_table(view.listeners)}
<h2>Upstream servers (upstream hop)</h2>
{_servers_table(view.servers)}
<h2>Idle pooled connections by age</h2>
{_age_section(view.servers)}
<footer>open = lent + idle; req/conn = requests per connection opened (keep-alive reuse);
reused = requests sent on a pooled connection; p99 = the upper bound of the bucket holding
the 99th percentile.</footer>
</body></html>
"""
    return page.encode("utf-8")
