# -*- test-case-name: tests.e2e.test_metrics -*-
"""
The C{/metrics} endpoint for Prometheus, on its own listener (C{[metrics] bind}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site

from persistproxy.logs import EventLog, LogOutput
from persistproxy.metrics import StatsCollector

__all__ = ["metrics_service"]


class _MetricsService(StreamServerEndpointService):
    def __init__(self, endpoint: Any, site: Site, log: EventLog) -> None:
        super().__init__(endpoint, site)  # type: ignore[no-untyped-call]
        self._log = log
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]

        def started(port: Any) -> Any:
            address = port.getHost()
            self._log.info(
                "metrics.started",
                host=getattr(address, "host", None),
                port=getattr(address, "port", None),
                path="/metrics",
            )
            return port

        waiting: Any = self._waitingForPort
        waiting.addCallback(started)


def metrics_service(
    reactor: Any,
    bind: str,
    proxy: Any,
    log: EventLog,
    log_outputs: Sequence[LogOutput] = (),
) -> IService:
    def log_drops() -> list[tuple[str, int]]:
        return [(output.name, output.dropped) for output in log_outputs]

    registry = CollectorRegistry(auto_describe=True)
    registry.register(StatsCollector(proxy.proxy_stats, proxy.pool_gauges, log_drops))
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))  # type: ignore[no-untyped-call]
    site = Site(root)
    site.noisy = False
    return _MetricsService(serverFromString(reactor, bind), site, log)
