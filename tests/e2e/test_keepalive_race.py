"""
The keep-alive race with an origin that closes idle connections without saying when (no
``Keep-Alive: timeout=``): the proxy learns the limit from the closes, and neither a GET nor a
POST fails, even in bursts timed to meet the moment the origin closes.

``PERSISTPROXY_SOAK_SECONDS`` lengthens the soak (5 s by default), e.g.
``PERSISTPROXY_SOAK_SECONDS=300 .venv/bin/python -m pytest -s tests/e2e/test_keepalive_race.py``;
``bash bench/run.sh race`` runs the same workload through persistproxy and nginx.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.request
from collections.abc import Callable

from conftest import ProxyFactory
from e2ehelpers import Origin, RawConn, make_config
from soak import check_origin, soak

OriginFactory = Callable[..., Origin]

#: The origin's idle close, as in the measurement of the hardening issue.
IDLE_CLOSE = 1.0


def _soak_seconds() -> float:
    return float(os.environ.get("PERSISTPROXY_SOAK_SECONDS", "5"))


def _with_metrics(text: str) -> str:
    return '[metrics]\nbind = "tcp:0:interface=127.0.0.1"\n\n' + text


def _learned(proxy_metrics_port: int, server: str) -> float | None:
    url = f"http://127.0.0.1:{proxy_metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    metric = "persistproxy_upstream_learned_idle_seconds"
    match = re.search(
        rf'^{metric}{{server="{re.escape(server)}",upstream="app"}} (\S+)$', text, re.MULTILINE
    )
    return float(match.group(1)) if match else None


def test_bursts_at_the_origin_idle_close_fail_no_get_and_no_post(
    origin_factory: OriginFactory, proxy_factory: ProxyFactory
) -> None:
    """Bursts of 16 GETs and 16 POSTs, each timed a few ms around the moment the origin closes
    the connections the last burst used. Without the learned limit, several POSTs get 502
    in every such run (the first bursts already); nginx has the same problem."""
    o = origin_factory(idle_close=IDLE_CLOSE)
    text = make_config([f"127.0.0.1:{o.port}"], listener={"access_log": False})
    p = proxy_factory(config_text=_with_metrics(text))
    metrics = p.wait_event("metrics.started", 10)
    assert metrics is not None
    result = asyncio.run(soak(p.port, IDLE_CLOSE, _soak_seconds(), clients=32))
    check_origin(result, o.port)
    report = result.as_json()
    print(f"\nkeep-alive race soak through persistproxy: {json.dumps(report)}")
    assert result.rounds >= 3, report
    assert result.methods["POST"].errors == 0, report
    assert result.methods["GET"].errors == 0, report
    assert result.duplicated_posts == 0, report
    learned = _learned(int(metrics["port"]), f"127.0.0.1:{o.port}")
    print(f"learned idle limit: {learned} s (the origin closes at {IDLE_CLOSE} s)")
    assert learned is not None and 0.5 < learned < 2 * IDLE_CLOSE, learned


def test_post_after_half_the_learned_limit_goes_on_a_new_connection(
    origin_factory: OriginFactory, proxy_factory: ProxyFactory
) -> None:
    """Once the origin has closed an idle connection after 1 s, a POST takes a pooled
    connection only if it has been idle for less than half of that; a GET still takes one
    until keepalive_margin (0.1 s here) before it."""
    o = origin_factory(idle_close=IDLE_CLOSE)
    text = make_config([f"127.0.0.1:{o.port}"], upstream={"keepalive_margin": 0.1})
    p = proxy_factory(config_text=_with_metrics(text))
    metrics = p.wait_event("metrics.started", 10)
    assert metrics is not None
    server = f"127.0.0.1:{o.port}"
    with RawConn(p.port) as c:
        assert c.roundtrip("GET", "/echo").status == 200
        assert _learned(int(metrics["port"]), server) is None, "nothing learned yet"
        ev = p.wait_event("upstream.idle_limit_learned", 5)
        assert ev is not None and ev["server"] == server, ev
        assert 0.5 < ev["seconds"] < 2 * IDLE_CLOSE, ev
        learned = _learned(int(metrics["port"]), server)
        assert learned is not None and abs(learned - ev["seconds"]) < 0.01, (learned, ev)

        first = c.roundtrip("GET", "/echo").json()
        assert first["req"] == 1, "the closed connection was not lent"
        time.sleep(0.7)  # past half of the learned limit, short of it minus the margin
        get = c.roundtrip("GET", "/echo").json()
        assert (get["conn"], get["req"]) == (first["conn"], 2), (first, get)
        time.sleep(0.7)
        post = c.roundtrip("POST", "/echo", body=b"must not race").json()
        assert post["req"] == 1, f"the POST went on a connection idle 0.7 s: {post}"
    assert o.stats()["bad"] == 0
