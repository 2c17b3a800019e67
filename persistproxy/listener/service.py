# -*- test-case-name: tests.unit.test_listener -*-
"""
A listening endpoint: where the path of every connection starts.

The service binds in C{privilegedStartService}, so a low port is bound before twistd drops
privileges, and a bind failure stops start-up loudly instead of leaving a proxy running
without one of its listeners.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory

from persistproxy.config import ListenerConfig
from persistproxy.interfaces import IProtocolPlugin
from persistproxy.listener.admission import ConnectionRegistry, ListenerFactory
from persistproxy.listener.limits import ConnectionLimits
from persistproxy.listener.proxied import ProxyHeaderFactory, Senders
from persistproxy.logs import EventLog
from persistproxy.metrics import ListenerStats
from persistproxy.net.selfcheck import problem
from persistproxy.net.sockopts import configure_listening_socket
from persistproxy.tls.server import ListenerTLSSettings, ServerTLS
from persistproxy.tls.transport import TLSListenerFactory

__all__ = ["ListenerService"]


class ListenerService(Service):
    """
    Binds one listener's endpoint to the factory its protocol plugin built, wrapped in what
    every protocol gets: admission, drain registration, counters, then TLS, and with
    C{proxy_protocol = true} the PROXY protocol header's reader outermost (it comes in clear,
    before the TLS handshake).
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
    ) -> None:
        self.name = f"listener:{config.name}"
        self.config = config
        self.factory = factory
        admitted = ListenerFactory(
            factory,
            reactor,
            limits,
            stats,
            registry,
            plugin.refusal,
            identified=config.proxy_protocol,
        )
        self._listening_factory: IProtocolFactory = admitted
        #: The listener's TLS contexts, built once here: never per connection, which would
        #: defeat session resumption. The SIGHUP reloader reaches them through this.
        self.tls: ServerTLS | None = None
        if config.tls is not None:
            self.tls = ServerTLS(ListenerTLSSettings.from_mapping(config.tls), config.name)
            self._listening_factory = TLSListenerFactory(  # type: ignore[assignment]
                self.tls,
                admitted,
                stats,
                log,
                reactor,
                log_facts=config.access_log,
                plaintext_answer=plugin.plaintext_answer,
            )
        if config.proxy_protocol:
            self._listening_factory = ProxyHeaderFactory(
                self._listening_factory,
                reactor,
                limits,
                stats,
                registry,
                log,
                config.name,
                Senders(config.proxy_protocol_from),
                config.header_timeout,
            )
        self.port: IListeningPort | None = None
        self._reactor = reactor
        self._log = log
        self._limits = limits

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        finding = problem("proxyproto") if self.config.proxy_protocol else None
        if finding is not None:
            print(
                f"persistproxy: listener {self.config.name}: proxy_protocol: Twisted's PROXY "
                f"protocol parsers are not usable: {finding}",
                file=sys.stderr,
            )
            sys.exit(1)
        try:
            endpoint = serverFromString(self._reactor, self.config.bind)
            d = endpoint.listen(self._listening_factory)
            result: list[Any] = []
            d.addBoth(result.append)
            if not result:
                raise RuntimeError("the endpoint did not listen at once")
            outcome = result[0]
            if not IListeningPort.providedBy(outcome):
                outcome.raiseException()
        except Exception as e:
            # A port in use or a socket systemd did not pass: one line, not a traceback, and
            # no half-started proxy.
            reason = str(e) or type(e).__name__
            if isinstance(e, KeyError):
                reason = f"no inherited socket named {reason}"
            print(
                f"persistproxy: listener {self.config.name}: cannot listen on "
                f"{self.config.bind!r}: {reason}",
                file=sys.stderr,
            )
            sys.exit(1)
        self.port = outcome
        # Inherited by every accepted socket: no per-connection setsockopt.
        configure_listening_socket(getattr(outcome, "socket", None), self.config.tcp_keepalive)
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

    def stop_listening(self) -> Deferred[None]:
        """
        Stop accepting; connections already open are left to the drain.
        """
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        return stopped if isinstance(stopped, Deferred) else succeed(None)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.stop_listening()
