# -*- test-case-name: tests.unit.test_listener -*-
"""
A listening endpoint: where the path of every connection starts.

The service binds in C{privilegedStartService}, so a low port is bound before twistd drops
privileges, and a bind failure stops start-up loudly instead of leaving a proxy running
without one of its listeners.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
)
from zope.interface import implementer

from persistproxy.config import ListenerConfig
from persistproxy.errors import StartupError
from persistproxy.interfaces import IProtocolPlugin
from persistproxy.listener.admission import ConnectionRegistry, ListenerFactory
from persistproxy.listener.limits import ConnectionLimits
from persistproxy.listener.proxied import ProxyHeaderFactory, Senders
from persistproxy.logs import EventLog
from persistproxy.metrics import ListenerStats
from persistproxy.net.selfcheck import problem
from persistproxy.net.sockopts import configure_listening_socket, with_default_backlog
from persistproxy.tls.server import ListenerTLSSettings, ServerTLS
from persistproxy.tls.transport import TLSListenerFactory

__all__ = ["ListenerService", "proxy_protocol_problem"]


def proxy_protocol_problem(config: ListenerConfig) -> str | None:
    """
    Why a listener with C{proxy_protocol = true} cannot run (the start-up self-check found
    Twisted's PROXY protocol parsers changed), as one line naming the key; L{None} if it can.
    """
    finding = problem("proxyproto") if config.proxy_protocol else None
    if finding is None:
        return None
    return (
        f"listener.{config.name}.proxy_protocol: Twisted's PROXY protocol parsers are not "
        f"usable: {finding}"
    )


@implementer(IProtocolFactory, ILoggingContext)
class _CurrentFactory:
    """
    What the listening port is given: the listener's factory of the moment, which a reload
    replaces without touching the port (connections accepted before keep theirs).
    """

    noisy = False

    def __init__(self, factory: IProtocolFactory) -> None:
        self.current = factory
        self._started = False

    def replace(self, factory: IProtocolFactory) -> None:
        previous, self.current = self.current, factory
        if self._started:
            factory.doStart()
            previous.doStop()

    def doStart(self) -> None:
        self._started = True
        self.current.doStart()

    def doStop(self) -> None:
        self._started = False
        self.current.doStop()

    def logPrefix(self) -> str:
        prefix = getattr(self.current, "logPrefix", None)
        return prefix() if prefix is not None else type(self.current).__name__  # type: ignore[no-any-return]

    def buildProtocol(self, addr: Any) -> IProtocol | None:
        return self.current.buildProtocol(addr)


class ListenerService(Service):
    """
    Binds one listener's endpoint to the factory its protocol plugin built, wrapped in what
    every protocol gets: admission, drain registration, counters, then TLS, and with
    C{proxy_protocol = true} the PROXY protocol header's reader outermost (it comes in clear,
    before the TLS handshake).

    A reload that changes the listener but not its C{bind} calls L{switch}: the port stays,
    and the connections it accepts from then on get the new settings. One that changes the
    C{bind} makes a new service, which binds before the old one stops listening.
    """

    def __init__(
        self,
        reactor: Any,
        config: ListenerConfig,
        plugin: IProtocolPlugin,
        factory: IProtocolFactory,
        log: EventLog,
        limits: ConnectionLimits,
        stats: ListenerStats,
        registry: ConnectionRegistry,
        tls: ServerTLS | None = None,
    ) -> None:
        """
        @param tls: the listener's TLS contexts, when a reload keeps those of the listener
            this one replaces (so the session cache and ticket keys survive); built from
            C{config.tls} otherwise.
        """
        self.name = f"listener:{config.name}"
        self.port: IListeningPort | None = None
        self.registry = registry
        self._reactor = reactor
        self._log = log
        self._limits = limits
        self._stats = stats
        self.config = config
        #: The listener's TLS contexts, built once: never per connection, which would defeat
        #: session resumption. The reload reaches them through this.
        self.tls: ServerTLS | None = None
        self.factory = factory
        self._keepalive = config.tcp_keepalive
        self._current = _CurrentFactory(self._wrap(config, plugin, factory, tls))

    def _wrap(
        self,
        config: ListenerConfig,
        plugin: IProtocolPlugin,
        factory: IProtocolFactory,
        tls: ServerTLS | None,
    ) -> IProtocolFactory:
        wrapped: IProtocolFactory = ListenerFactory(
            factory,
            self._reactor,
            self._limits,
            self._stats,
            self.registry,
            plugin.refusal,
            identified=config.proxy_protocol,
        )
        if config.tls is None:
            self.tls = None
        else:
            if tls is None:
                tls = ServerTLS(ListenerTLSSettings.from_mapping(config.tls), config.name)
            self.tls = tls
            wrapped = TLSListenerFactory(  # type: ignore[assignment]
                tls,
                wrapped,
                self._stats,
                self._log,
                self._reactor,
                log_facts=config.access_log,
                plaintext_answer=plugin.plaintext_answer,
            )
        if config.proxy_protocol:
            wrapped = ProxyHeaderFactory(
                wrapped,
                self._reactor,
                self._limits,
                self._stats,
                self.registry,
                self._log,
                config.name,
                Senders(config.proxy_protocol_from),
                config.header_timeout,
            )
        return wrapped

    def switch(
        self,
        config: ListenerConfig,
        plugin: IProtocolPlugin,
        factory: IProtocolFactory,
        tls: ServerTLS | None = None,
    ) -> None:
        """
        A reload changed the listener's settings, not its C{bind}: connections accepted from
        now on get C{factory} (and C{tls}); those already open keep what they have.
        """
        if config.bind != self.config.bind:
            raise ValueError("a changed bind needs a new listener service")
        self._current.replace(self._wrap(config, plugin, factory, tls))
        self.config = config
        self.factory = factory
        if self.port is not None and config.tcp_keepalive != self._keepalive:
            configure_listening_socket(getattr(self.port, "socket", None), config.tcp_keepalive)
            self._keepalive = config.tcp_keepalive

    def listen(self) -> str | None:
        """
        Bind now; the reason it failed, or L{None}. Binding twice is a no-op.
        """
        if self.port is not None:
            return None
        unusable = proxy_protocol_problem(self.config)
        if unusable is not None:
            return unusable
        try:
            endpoint = serverFromString(self._reactor, with_default_backlog(self.config.bind))
            d = endpoint.listen(self._current)
            result: list[Any] = []
            d.addBoth(result.append)
            if not result:
                raise RuntimeError("the endpoint did not listen at once")
            outcome = result[0]
            if not IListeningPort.providedBy(outcome):
                outcome.raiseException()
        except Exception as e:
            # A port in use or a socket systemd did not pass: one line naming the key (the
            # twistd plugin adds the file), not a traceback.
            reason = str(e) or type(e).__name__
            if isinstance(e, KeyError):
                reason = f"no inherited socket named {reason}"
            return (
                f"listener.{self.config.name}.bind: cannot listen on {self.config.bind!r}: {reason}"
            )
        self.port = outcome
        # Inherited by every accepted socket: no per-connection setsockopt.
        self._keepalive = self.config.tcp_keepalive
        configure_listening_socket(getattr(outcome, "socket", None), self._keepalive)
        self._limits.port = outcome
        address = outcome.getHost()
        self._log.info(
            "listener.started",
            listener=self.config.name,
            protocol=self.config.protocol,
            host=getattr(address, "host", None),
            port=getattr(address, "port", None),
            tls=bool(self.config.tls),
            proxy_protocol=self.config.proxy_protocol,
        )
        return None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        failure = self.listen()
        if failure is not None:
            # No half-started proxy: the twistd plugin prints it on stderr and exits.
            raise StartupError(failure)

    def stop_listening(self) -> Deferred[None]:
        """
        Stop accepting; connections already open are left to the drain.
        """
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        if self._limits.port is port:
            # Closing connections must not resume reading from a closed port.
            self._limits.port = None
        stopped = port.stopListening()
        return stopped if isinstance(stopped, Deferred) else succeed(None)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.stop_listening()
