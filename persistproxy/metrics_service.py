# -*- test-case-name: tests.e2e.test_metrics -*-
"""
The C{/metrics} endpoint for Prometheus, on its own listener (C{[metrics] bind}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.application.service import IService, Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from persistproxy.logs import EventLog, LogOutput
from persistproxy.metrics import StatsCollector

__all__ = ["metrics_service"]


class _MetricsService(Service):
    """
    Listens in C{privilegedStartService} (a low port is bound before twistd drops
    privileges), and a port that cannot be bound stops start-up with its error, as
    C{StreamServerEndpointService} with its private C{_raiseSynchronously} would; written with
    public API only.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, site: Site, log: EventLog) -> None:
        self._endpoint = endpoint
        self._site = site
        self._log = log
        self._listening: Deferred[IListeningPort | None] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        starting = True
        failed: list[Failure] = []

        def started(port: IListeningPort) -> IListeningPort:
            address: Any = port.getHost()
            self._log.info(
                "metrics.started",
                host=getattr(address, "host", None),
                port=getattr(address, "port", None),
                path="/metrics",
            )
            return port

        def failure(reason: Failure) -> None:
            if starting:
                failed.append(reason)
            elif not reason.check(CancelledError):
                self._log.error("metrics.listen_failed", reason=reason.getErrorMessage())

        self._listening = self._endpoint.listen(self._site).addCallbacks(started, failure)
        starting = False
        if failed:
            failed[0].raiseException()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)
        listening.cancel()

        def stop(port: IListeningPort | None) -> Any:
            return port.stopListening() if port is not None else None

        return listening.addCallback(stop)


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
