# -*- test-case-name: tests.unit.test_service -*-
"""
The composition root at run time: listeners, upstream groups, metrics and graceful drain.

L{ProxyService} is also the L{IProxyContext} lent to protocol plugins, which therefore see
the upstream groups, their listener's counters, the connection registry and the drain state,
and nothing else of the configuration.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed

from persistproxy.config import ProxyConfig
from persistproxy.descriptors import DescriptorBudget, Process
from persistproxy.interfaces import IProtocolPlugin, ProxyContext
from persistproxy.listener.admission import ConnectionRegistry
from persistproxy.listener.limits import ConnectionLimits
from persistproxy.listener.service import ListenerService
from persistproxy.logs import AccessLog, EventLog
from persistproxy.metrics import PoolState, ProxyStats
from persistproxy.tls.upstream import endpoint_wrapper
from persistproxy.upstream.group import EndpointWrapper, Router

__all__ = ["ProxyService"]


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
        process: Process | None = None,
    ) -> None:
        """
        @param upstream_tls: wraps every upstream's endpoints (tests); by default each
            upstream's own TLS settings decide.
        @param process: the process whose descriptor limit is raised and budgeted at start
            (L{persistproxy.descriptors.ProcessDescriptors}); without it, no budget.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        self.reactor = reactor
        self.log = log
        self.access_log = access_log or AccessLog(reactor, flush_interval=config.access_log_flush)
        self.config = config
        self.proxy_stats = ProxyStats()
        self._process = process
        #: Every listener admits, and every pool opens, within it.
        self.budget = DescriptorBudget(log)
        self.router = Router(
            reactor,
            config.upstreams,
            log,
            (lambda up: upstream_tls)
            if upstream_tls is not None
            else (lambda up: endpoint_wrapper(reactor, up, log)),
            self.budget,
        )
        self.connections = ConnectionRegistry()
        self._limits = {
            lc.name: ConnectionLimits(
                lc.name,
                lc.max_connections,
                lc.max_connections_per_client,
                lc.max_idle_per_client,
                log,
                self.proxy_stats.listener(lc.name),
                self.budget,
            )
            for lc in config.listeners
        }
        self._draining = False
        #: Waiting for the drain to finish (L{when_drained}); None once it has.
        self._drain_waiters: list[Deferred[None]] | None = []
        #: What every plugin is lent (see L{persistproxy.interfaces.IProxyContext}).
        self.context = ProxyContext(
            reactor=reactor,
            clock=reactor,
            log=log,
            access_log=self.access_log,
            _upstream=self.router.group,
            _limits=self._limits,
            _stats=self.proxy_stats.listener,
            _draining=lambda: self._draining,
        )
        self.listeners: list[ListenerService] = []
        for listener in config.listeners:
            plugin = plugins[listener.protocol]
            service = ListenerService(
                reactor,
                listener,
                plugin,
                plugin.build_factory(listener, self.context),
                log,
                self._limits[listener.name],
                self.proxy_stats.listener(listener.name),
                self.connections,
            )
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.listeners.append(service)

    def draining(self) -> bool:
        return self._draining

    def ready(self) -> bool:
        """
        Whether new clients are served: every listener is bound and no drain has begun
        (C{/readyz}; a load balancer stops sending clients when it turns false).
        """
        return (
            bool(self.running)
            and not self._draining
            and all(listener.port is not None for listener in self.listeners)
        )

    def when_drained(self) -> Deferred[None]:
        """
        Fires once a drain has finished (at once if one has), so that what watches the drain
        (the metrics listener) stays up until then.
        """
        if self._drain_waiters is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def startService(self) -> None:
        # The listeners are bound (privilegedStartService) and the reactor has not polled
        # yet: the descriptors open now are the fixed ones, and no client is accepted before
        # the budget is set.
        if self._process is not None:
            wanted = [lc.max_connections for lc in self.config.listeners]
            self.budget.start(self._process, None if 0 in wanted else sum(wanted))
        super().startService()  # type: ignore[no-untyped-call]

    # -- drain --------------------------------------------------------------------------------

    def open_connections(self) -> int:
        return len(self.connections)

    def pool_gauges(self, with_ages: bool = False) -> list[PoolState]:
        """
        Every pool's state, and a zero state for each configured server no protocol has a
        pool for (yet): every server's series exists from the first scrape.

        @param with_ages: also walk the idle stacks for each connection's idle age (the
            status page).
        """
        states = [
            PoolState(
                group.config.name,
                pool.address,
                pool.active,
                pool.idle,
                pool.waiting,
                pool.connects,
                pool.connect_failures,
                tuple(pool.idle_ages()) if with_ages else (),
                pool.learned_idle,
            )
            for group in self.router.groups
            for pool in group.pools
        ]
        seen = {(state.upstream, state.server) for state in states}
        for name, servers in self.router.servers.items():
            for server in servers:
                if (name, server.address) not in seen:
                    states.append(PoolState(name, server.address))
        return states

    async def _drain(self) -> None:
        self._draining = True
        timeout = self.config.drain_timeout
        self.log.info("drain.started", open_connections=self.open_connections(), timeout=timeout)
        await DeferredList([listener.stop_listening() for listener in self.listeners])
        for connection in self.connections.snapshot():
            connection.close_if_idle()
        if self.open_connections():
            drained: Deferred[None] = Deferred()
            self.connections.on_empty = lambda: drained.callback(None)
            call = self.reactor.callLater(timeout, self._drain_expired)
            await drained
            if call.active():
                call.cancel()
        self.router.close()
        self.access_log.flush()
        self.log.info("drain.finished", open_connections=self.open_connections())
        waiters, self._drain_waiters = self._drain_waiters or [], None
        for waiter in waiters:
            waiter.callback(None)
        # twistd re-raises the signal that stopped the reactor once it has stopped, so the
        # process would end "killed by SIGTERM". A drain that ran is a clean, requested exit:
        # say so with status 0, as the systemd unit and the drain contract expect.
        # _exitSignal is private (twistd reads it through _ISupportsExitSignalCapturing):
        # without it this does nothing and the exit status is the signal's; the start-up
        # self-check (persistproxy.net.selfcheck, "exit_signal") logs that once.
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None

    def _drain_expired(self) -> None:
        self.log.warning("drain.timeout", open_connections=self.open_connections())
        for connection in self.connections.snapshot():
            connection.drain_cut()  # it accounts for what it was answering, then resets
        on_empty, self.connections.on_empty = self.connections.on_empty, None
        if on_empty is not None:
            on_empty()

    def stopService(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._drain())
        d.addCallback(lambda _: MultiService.stopService(self))
        return d
