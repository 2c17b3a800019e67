# -*- test-case-name: tests.unit.test_service -*-
"""
The composition root at run time: listeners, upstream groups, metrics and graceful drain.

L{ProxyService} is also the L{IProxyContext} lent to protocol plugins, which therefore see
the upstream groups, their listener's counters, the connection registry and the drain state,
and nothing else of the configuration.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IProtocolFactory
from zope.interface import implementer

from persistproxy.config import ProxyConfig
from persistproxy.interfaces import IProtocolPlugin, IProxyContext
from persistproxy.listener.limits import ConnectionLimits
from persistproxy.listener.service import ListenerService
from persistproxy.logs import AccessLog, EventLog
from persistproxy.metrics import ListenerStats, ProxyStats
from persistproxy.tls.upstream import endpoint_wrapper
from persistproxy.upstream.group import EndpointWrapper, Router, UpstreamGroup

__all__ = ["ProxyService"]


class Drainable(Protocol):
    def close_if_idle(self) -> bool: ...


@implementer(IProxyContext)
class ProxyService(MultiService):
    """
    Everything one persistproxy process runs.
    """

    def __init__(
        self,
        reactor: Any,
        config: ProxyConfig,
        plugins: dict[str, IProtocolPlugin],
        log: EventLog,
        upstream_tls: EndpointWrapper | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reactor = reactor
        self.log = log
        self.access_log = access_log or AccessLog(reactor)
        self.config = config
        self.proxy_stats = ProxyStats()
        self.router = Router(
            {
                name: UpstreamGroup(
                    reactor, up, log, upstream_tls or endpoint_wrapper(reactor, up, log)
                )
                for name, up in config.upstreams.items()
            }
        )
        self._connections: dict[str, set[Drainable]] = {}
        self._limits = {
            lc.name: ConnectionLimits(
                lc.name,
                lc.max_connections,
                lc.max_connections_per_client,
                lc.max_idle_per_client,
                log,
                self.proxy_stats.listener(lc.name),
            )
            for lc in config.listeners
        }
        self._draining = False
        self._drained: Deferred[None] | None = None
        self.listeners: list[ListenerService] = []
        for listener in config.listeners:
            factory: IProtocolFactory = plugins[listener.protocol].build_factory(listener, self)
            service = ListenerService(
                reactor,
                listener,
                factory,
                log,
                self._limits[listener.name],
                stats=self.proxy_stats.listener(listener.name),
            )
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.listeners.append(service)

    # -- IProxyContext ------------------------------------------------------------------------

    def upstream(self, name: str) -> UpstreamGroup:
        return self.router.group(name)

    def limits(self, listener: str) -> ConnectionLimits:
        return self._limits[listener]

    def stats(self, listener: str) -> ListenerStats:
        return self.proxy_stats.listener(listener)

    def register_connection(self, listener: str, connection: Any) -> None:
        self._connections.setdefault(listener, set()).add(connection)

    def unregister_connection(self, listener: str, connection: Any) -> None:
        connections = self._connections.get(listener)
        if connections is not None:
            connections.discard(connection)
        if self._drained is not None and not self.open_connections():
            d, self._drained = self._drained, None
            d.callback(None)

    def draining(self) -> bool:
        return self._draining

    # -- drain --------------------------------------------------------------------------------

    def open_connections(self) -> int:
        return sum(len(c) for c in self._connections.values())

    def pool_gauges(self) -> list[tuple[str, str, int, int, int, int]]:
        return [
            (name, pool.address, pool.active, pool.idle, pool.waiting, pool.connects)
            for name, group in self.router.groups.items()
            for pool in group.pools
        ]

    async def _drain(self) -> None:
        self._draining = True
        timeout = self.config.drain_timeout
        self.log.info("drain.started", open_connections=self.open_connections(), timeout=timeout)
        await DeferredList([listener.stop_listening() for listener in self.listeners])
        for connections in list(self._connections.values()):
            for connection in list(connections):
                connection.close_if_idle()
        if self.open_connections():
            self._drained = Deferred()
            call = self.reactor.callLater(timeout, self._drain_expired)
            await self._drained
            if call.active():
                call.cancel()
        self.router.close()
        self.access_log.flush()
        self.log.info("drain.finished", open_connections=self.open_connections())
        # twistd re-raises the signal that stopped the reactor once it has stopped, so the
        # process would end "killed by SIGTERM". A drain that ran is a clean, requested exit:
        # say so with status 0, as the systemd unit and the drain contract expect.
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None

    def _drain_expired(self) -> None:
        self.log.warning("drain.timeout", open_connections=self.open_connections())
        for connections in list(self._connections.values()):
            for connection in list(connections):
                cut = getattr(connection, "drain_cut", None)
                if cut is not None:
                    cut()  # it accounts for what it was answering, then resets
                    continue
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abortConnection()
        if self._drained is not None:
            d, self._drained = self._drained, None
            d.callback(None)

    def stopService(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._drain())
        d.addCallback(lambda _: MultiService.stopService(self))
        return d
