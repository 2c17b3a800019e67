# -*- test-case-name: tests.e2e.test_http_core -*-
"""
The C{/metrics} endpoint for Prometheus, on its own listener (C{[metrics] bind}).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.application.service import IService
from twisted.application.strports import service
from twisted.web.resource import Resource
from twisted.web.server import Site

from persistproxy.metrics import StatsCollector

__all__ = ["metrics_service"]


def metrics_service(reactor: Any, bind: str, proxy: Any) -> IService:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StatsCollector(proxy.proxy_stats, proxy.pool_gauges))
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))  # type: ignore[no-untyped-call]
    site = Site(root)
    site.noisy = False
    return service(bind, site, reactor=reactor)
