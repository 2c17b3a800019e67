# -*- test-case-name: tests.e2e.test_metrics -*-
"""
The operator's listener (C{[metrics] bind}): C{/metrics} for Prometheus, C{/healthz} and
C{/readyz} for probes and load balancers, and C{/status}, a page for a person.

It stays up during a drain, after the proxy's own listeners have closed, so that the drain can
be watched (C{/readyz} says 503 from its first moment, C{/metrics} and C{/status} show the
connections going away); it closes when the drain is over. Its requests are not logged: a
scrape every few seconds would drown the events that matter.
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
from twisted.web.server import Request, Site

from persistproxy.errors import StartupError
from persistproxy.log_output import LogOutput
from persistproxy.logs import EventLog
from persistproxy.metrics import StatsCollector
from persistproxy.status import render, status_view

__all__ = [
    "HealthResource",
    "MetricsSite",
    "ReadyResource",
    "StatusResource",
    "metrics_root",
    "metrics_service",
]

_PATHS = ["/metrics", "/healthz", "/readyz", "/status"]


class HealthResource(Resource):
    """C{/healthz}: 200 whenever the process answers at all (a liveness probe)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ok\n"


class ReadyResource(Resource):
    """
    C{/readyz}: 200 while every listener is bound and no drain has begun; 503 before the
    listeners are up and from the first moment of a drain, so that a load balancer stops
    sending new clients while the ones in flight finish.
    """

    isLeaf = True

    def __init__(self, proxy: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._proxy = proxy

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._proxy.ready():
            return b"ready\n"
        request.setResponseCode(503)
        return b"draining\n" if self._proxy.draining() else b"not ready\n"


class StatusResource(Resource):
    """C{/status}: the page of L{persistproxy.status}, computed per request."""

    isLeaf = True

    def __init__(self, proxy: Any, clock: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._proxy = proxy
        self._clock = clock
        self._started = clock.seconds()

    def render_GET(self, request: Request) -> bytes:
        now = self._clock.seconds()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        # No script, no external anything: the page is its own HTML and inline CSS.
        request.setHeader(
            b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'"
        )
        return render(status_view(self._proxy, self._started, now))


class _Index(Resource):
    """C{/}: where the other paths are."""

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return ("persistproxy: " + " ".join(_PATHS) + "\n").encode()


class MetricsSite(Site):
    def log(self, request: Any) -> None:
        """Scrapes and probes are not logged: they would drown the events that matter."""


def metrics_root(reactor: Any, proxy: Any, log_outputs: Sequence[LogOutput] = ()) -> Resource:
    """The resource tree of the operator's listener."""

    def log_drops() -> list[tuple[str, int]]:
        return [(output.name, output.dropped) for output in log_outputs]

    registry = CollectorRegistry(auto_describe=True)
    registry.register(StatsCollector(proxy.proxy_stats, proxy.pool_gauges, log_drops))
    root = _Index()  # type: ignore[no-untyped-call]
    root.putChild(b"", root)
    root.putChild(b"metrics", MetricsResource(registry=registry))  # type: ignore[no-untyped-call]
    root.putChild(b"healthz", HealthResource())  # type: ignore[no-untyped-call]
    root.putChild(b"readyz", ReadyResource(proxy))
    root.putChild(b"status", StatusResource(proxy, reactor))
    return root


class _MetricsService(Service):
    """
    Listens in C{privilegedStartService} (a low port is bound before twistd drops
    privileges), and a port that cannot be bound stops start-up with one line naming the key
    (L{StartupError}), as a listener's does; written with public API only. It stops only once
    the proxy's drain is over, so that the drain can be watched here.
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, site: Site, log: EventLog, bind: str, proxy: Any
    ) -> None:
        self._endpoint = endpoint
        self._site = site
        self._log = log
        self._bind = bind
        self._proxy = proxy
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
                paths=_PATHS,
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
            # A port in use: one line naming the key, as a listener's (see tap.py).
            value = failed[0].value
            reason = str(value) or type(value).__name__
            raise StartupError(f"metrics.bind: cannot listen on {self._bind!r}: {reason}")

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        drained: Deferred[None] = self._proxy.when_drained()
        return drained.addCallback(lambda _: self._stop_listening())

    def _stop_listening(self) -> Deferred[None]:
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
    site = MetricsSite(metrics_root(reactor, proxy, log_outputs))  # type: ignore[no-untyped-call]
    site.noisy = False
    return _MetricsService(serverFromString(reactor, bind), site, log, bind, proxy)
