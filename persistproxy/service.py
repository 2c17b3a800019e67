# -*- test-case-name: tests.unit.test_service -*-
"""
The composition root at run time: listeners, upstream groups, metrics, graceful drain, and
reload in place.

L{ProxyService} is also the L{IProxyContext} lent to protocol plugins, which therefore see
the upstream groups, their listener's counters, the connection registry and the drain state,
and nothing else of the configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory

from persistproxy.config import ListenerConfig, ProxyConfig, UpstreamConfig
from persistproxy.descriptors import DescriptorBudget, Process
from persistproxy.interfaces import IProtocolPlugin, ProxyContext
from persistproxy.listener.admission import ConnectionRegistry
from persistproxy.listener.limits import ConnectionLimits
from persistproxy.listener.service import ListenerService, proxy_protocol_problem
from persistproxy.logs import AccessLog, EventLog
from persistproxy.metrics import PoolState, ProxyStats
from persistproxy.tls.server import ListenerTLSSettings, ServerTLS, TLSLoadError
from persistproxy.tls.upstream import endpoint_wrapper
from persistproxy.upstream.group import EndpointWrapper, Router, RouterSwitch

__all__ = ["ProxyService", "ReloadError", "ReloadSummary"]

#: Settings a running process cannot change (the log's destinations and level are set up
#: before anything else, the metrics listener is not reloaded): a reload that changes them
#: applies the rest and says these need a restart.
_RESTART_ONLY = {
    "log_level": "log.level",
    "access_log_file": "log.access_log",
    "log_buffer_size": "log.buffer_size",
    "log_format": "log.format",
    "metrics_bind": "metrics.bind",
}


def _check_kinds(config: ProxyConfig) -> Callable[[str], str]:
    """
    What each upstream's active health check is: a C{tcp} connect when only C{tcp}
    listeners use it, an HTTP GET otherwise.
    """
    protocols: dict[str, set[str]] = {}
    for listener in config.listeners:
        protocols.setdefault(listener.upstream, set()).add(listener.protocol)

    def kind(name: str) -> str:
        return "tcp" if protocols.get(name) == {"tcp"} else "http"

    return kind


class ReloadError(Exception):
    """
    A configuration that validated but cannot be applied (a port that cannot be bound, a
    certificate changed under our feet): nothing was changed. One line, for the log.
    """


@dataclass
class ReloadSummary:
    """What a reload changed, by name, for the C{config.reloaded} line."""

    listeners_added: list[str] = field(default_factory=list)
    listeners_removed: list[str] = field(default_factory=list)
    listeners_changed: list[str] = field(default_factory=list)
    upstreams_added: list[str] = field(default_factory=list)
    upstreams_removed: list[str] = field(default_factory=list)
    upstreams_changed: list[str] = field(default_factory=list)
    #: Keys whose new value only a restart applies (the old value stays in force).
    restart_needed: list[str] = field(default_factory=list)
    #: The TLS contexts the reload kept: their certificate files are read again.
    kept_tls: list[ServerTLS] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "kept_tls" and v}


class _Slot:
    """
    What a listener's name keeps across reloads, whatever its settings and its port: its
    limits (the connections counted stay counted), its connections (to drain them if a
    reload removes it), and the context its plugin got, which says it drains once removed.
    """

    __slots__ = ("context", "limits", "registry", "removed")

    def __init__(self, limits: ConnectionLimits, registry: ConnectionRegistry) -> None:
        self.limits = limits
        self.registry = registry
        self.removed = False
        self.context: ProxyContext | None = None


class ProxyService(MultiService):
    """
    Everything one persistproxy process runs.

    L{reload} applies a new configuration in place: listeners are matched by name, upstream
    groups by name, and whatever is unchanged is left alone (its port, its pools, its TLS
    session cache).
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
        self._plugins = plugins
        self._process = process
        #: Every listener admits, and every pool opens, within it.
        self.budget = DescriptorBudget(log)
        self._wrap: Callable[[UpstreamConfig], EndpointWrapper | None] = (
            (lambda up: upstream_tls)
            if upstream_tls is not None
            else (lambda up: endpoint_wrapper(reactor, up, log))
        )
        self._routes = RouterSwitch(
            Router(
                reactor,
                config.upstreams,
                log,
                self._wrap,
                self.budget,
                check_kind=_check_kinds(config),
            )
        )
        self.connections = ConnectionRegistry()
        self._limits: dict[str, ConnectionLimits] = {}
        self._slots: dict[str, _Slot] = {}
        #: Listeners a reload removed, still draining, with the timer that cuts them.
        self._retiring: dict[_Slot, IDelayedCall] = {}
        self._draining = False
        #: Waiting for the drain to finish (L{when_drained}); None once it has.
        self._drain_waiters: list[Deferred[None]] | None = []
        #: What every plugin is lent (see L{persistproxy.interfaces.IProxyContext}); each
        #: listener gets a copy whose C{draining()} is also true once a reload removed it.
        self.context = ProxyContext(
            reactor=reactor,
            clock=reactor,
            log=log,
            access_log=self.access_log,
            _upstream=self._routes.upstream,
            _limits=self._limits,
            _stats=self.proxy_stats.listener,
            _draining=lambda: self._draining,
        )
        self.listeners: list[ListenerService] = []
        for listener in config.listeners:
            service = self._listener_service(listener, self._new_slot(listener))
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.listeners.append(service)

    @property
    def router(self) -> Router:
        """The upstream groups new requests go to."""
        return self._routes.router

    def _new_slot(self, listener: ListenerConfig) -> _Slot:
        limits = ConnectionLimits(
            listener.name,
            listener.max_connections,
            listener.max_connections_per_client,
            listener.max_idle_per_client,
            self.log,
            self.proxy_stats.listener(listener.name),
            self.budget,
        )
        slot = _Slot(limits, ConnectionRegistry(self.connections))
        slot.context = replace(self.context, _draining=lambda: self._draining or slot.removed)
        self._limits[listener.name] = limits
        self._slots[listener.name] = slot
        return slot

    def _listener_service(
        self, listener: ListenerConfig, slot: _Slot, tls: ServerTLS | None = None
    ) -> ListenerService:
        plugin = self._plugins[listener.protocol]
        assert slot.context is not None
        return ListenerService(
            self.reactor,
            listener,
            plugin,
            plugin.build_factory(listener, slot.context),
            self.log,
            slot.limits,
            self.proxy_stats.listener(listener.name),
            slot.registry,
            tls,
        )

    def requests_total(self) -> int:
        """Requests received on every listener since start."""
        return sum(stats.requests_total for stats in self.proxy_stats.listeners.values())

    # -- reload -------------------------------------------------------------------------------

    def reload(self, config: ProxyConfig) -> ReloadSummary:
        """
        Apply a new, validated configuration, all or nothing, without dropping a connection.

         - A new listener binds; a removed one stops listening and its connections drain
           (idle ones close now, busy ones finish, what is left after C{drain_timeout} is
           cut). A changed one serves the connections it accepts from now on with the new
           settings, on the same port, or on its new C{bind}, bound before the old one
           closes; connections already open keep the settings they started with. Its
           connection limits apply at once, to the connections counted already.
         - An unchanged upstream group keeps its pools. A new or changed one serves the
           next request (also on connections already open); a request already lent a
           connection finishes on it, and the old pools close their connections as they
           come back.
         - TLS contexts of listeners whose C{[listener.tls]} is unchanged are kept (the
           session cache and ticket keys survive); the caller reloads their certificates.

        Everything that can fail (binding, TLS files, the plugins' factories) happens before
        anything changes.

        @raise ReloadError: the configuration cannot be applied; nothing changed.
        """
        if self._draining:
            raise ReloadError("the proxy is stopping")
        old = self.config
        current = {service.config.name: service for service in self.listeners}
        wanted = {listener.name for listener in config.listeners}
        summary = ReloadSummary(
            listeners_added=[n for n in wanted if n not in current],
            listeners_removed=[n for n in current if n not in wanted],
            listeners_changed=[
                lc.name
                for lc in config.listeners
                if lc.name in current and current[lc.name].config != lc
            ],
            restart_needed=[
                key
                for attr, key in _RESTART_ONLY.items()
                if getattr(old, attr) != getattr(config, attr)
            ],
        )
        created: list[str] = []
        stats_before = set(self.proxy_stats.listeners)
        ports_before = {name: slot.limits.port for name, slot in self._slots.items()}
        switches: list[tuple[ListenerService, ListenerConfig, IProtocolFactory, ServerTLS | None]]
        switches = []
        binds: list[tuple[ListenerService | None, ListenerService]] = []
        try:
            router = Router(
                self.reactor,
                config.upstreams,
                self.log,
                self._wrap,
                self.budget,
                self.router,
                _check_kinds(config),
            )
            for listener in config.listeners:
                service = current.get(listener.name)
                if service is not None and service.config == listener:
                    if service.tls is not None:
                        summary.kept_tls.append(service.tls)
                    continue
                tls = None
                if (
                    service is not None
                    and service.tls is not None
                    and (service.config.tls == listener.tls)
                ):
                    tls = service.tls
                    summary.kept_tls.append(tls)
                if service is None:
                    slot = self._new_slot(listener)
                    created.append(listener.name)
                else:
                    slot = self._slots[listener.name]
                if service is not None and service.config.bind == listener.bind:
                    unusable = proxy_protocol_problem(listener)
                    if unusable is not None:
                        raise ReloadError(unusable)
                    if tls is None and listener.tls is not None:
                        tls = ServerTLS(
                            ListenerTLSSettings.from_mapping(listener.tls), listener.name
                        )
                    assert slot.context is not None
                    plugin = self._plugins[listener.protocol]
                    factory = plugin.build_factory(listener, slot.context)
                    switches.append((service, listener, factory, tls))
                else:
                    binds.append((service, self._listener_service(listener, slot, tls)))
            for _, new in binds:
                failure = new.listen()
                if failure is not None:
                    raise ReloadError(failure)
        except Exception as e:
            for _, new in binds:
                new.stop_listening()
            for name in created:
                self.budget.remove_listener(self._slots.pop(name).limits)
                self._limits.pop(name, None)
            for name in set(self.proxy_stats.listeners) - stats_before:
                del self.proxy_stats.listeners[name]
            for name, port in ports_before.items():
                self._slots[name].limits.port = port
            if isinstance(e, ReloadError):
                raise
            if isinstance(e, TLSLoadError):
                raise ReloadError(f"listener TLS: {e}") from None
            raise

        # -- nothing can fail from here on ---------------------------------------------------
        old_router = self._routes.swap(router)
        summary.upstreams_added = sorted(n for n in config.upstreams if n not in old.upstreams)
        summary.upstreams_removed = sorted(n for n in old.upstreams if n not in config.upstreams)
        summary.upstreams_changed = sorted(
            n for n in config.upstreams if n in old.upstreams and n not in router.kept
        )
        old_router.retire_replaced(router)
        router.start_checks()
        by_name = {service.config.name: service for service in self.listeners}
        for service, listener, factory, tls in switches:
            service.switch(listener, self._plugins[listener.protocol], factory, tls)
        for previous, new in binds:
            if previous is not None:
                # The new port is bound already: clients always find one of the two.
                previous.disownServiceParent()  # type: ignore[no-untyped-call]
            new.setServiceParent(self)  # type: ignore[no-untyped-call]
            by_name[new.config.name] = new
        for listener in config.listeners:
            if listener.name in summary.listeners_changed:
                self._slots[listener.name].limits.update(
                    listener.max_connections,
                    listener.max_connections_per_client,
                    listener.max_idle_per_client,
                )
        self.config = config  # the drain of removed listeners takes the new drain_timeout
        for name in summary.listeners_removed:
            self._retire(by_name.pop(name))
        self.listeners = [by_name[listener.name] for listener in config.listeners]
        return summary

    def _retire(self, service: ListenerService) -> None:
        """
        A reload removed this listener: stop accepting, and drain its connections as the
        whole proxy drains on SIGTERM, with C{drain_timeout}.
        """
        name = service.config.name
        slot = self._slots.pop(name)
        self._limits.pop(name, None)
        self.budget.remove_listener(slot.limits)
        slot.removed = True
        service.disownServiceParent()  # type: ignore[no-untyped-call]
        registry = slot.registry
        for connection in registry.snapshot():
            connection.close_if_idle()
        if not len(registry):
            self.log.info("listener.drained", listener=name)
            return
        timeout = self.config.drain_timeout
        self.log.info(
            "listener.draining", listener=name, open_connections=len(registry), timeout=timeout
        )
        self._retiring[slot] = self.reactor.callLater(timeout, self._cut, name, slot)

        def drained() -> None:
            call = self._retiring.pop(slot, None)
            if call is not None and call.active():
                call.cancel()
            self.log.info("listener.drained", listener=name)

        registry.on_empty = drained

    def _cut(self, name: str, slot: _Slot) -> None:
        self._retiring.pop(slot, None)
        slot.registry.on_empty = None
        self.log.warning(
            "listener.drain_timeout", listener=name, open_connections=len(slot.registry)
        )
        for connection in slot.registry.snapshot():
            connection.drain_cut()

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
        self.router.start_checks()

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
        now = self.reactor.seconds()
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
                server.health.state(now),
            )
            for group in self.router.groups
            for server, pool in zip(group.servers, group.pools, strict=True)
        ]
        seen = {(state.upstream, state.server) for state in states}
        for name, servers in self.router.servers.items():
            for server in servers:
                if (name, server.address) not in seen:
                    states.append(PoolState(name, server.address, health=server.health.state(now)))
        return states

    async def _drain(self) -> None:
        self._draining = True
        # Listeners a reload removed drain with the rest now.
        for call in self._retiring.values():
            if call.active():
                call.cancel()
        self._retiring.clear()
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
