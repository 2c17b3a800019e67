# -*- test-case-name: tests.unit.test_plugins -*-
"""
The HTTP/1.x reverse proxy as a protocol plugin: the seam between listeners and the engine.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.plugin import IPlugin
from zope.interface import implementer

from persistproxy.config import ConfigError, ListenerConfig
from persistproxy.http.client_connection import ClientConnection, ListenerContext
from persistproxy.http.errors import error_response
from persistproxy.interfaces import IProtocolPlugin, IProxyContext
from persistproxy.listener.limits import HOLD, Rejection

__all__ = ["HTTPFactory", "HTTPProtocolPlugin"]


class HTTPFactory(Factory):
    """
    Builds a L{ClientConnection} for each accepted connection, with its listener's context.
    """

    noisy = False
    #: The answer of a TLS listener to a plain-HTTP request (see TLSListenerFactory).
    plaintext_answer = error_response(
        400, "a plain HTTP request was sent to a TLS port; use https://"
    )

    def __init__(self, ctx: ListenerContext, proxy: Any) -> None:
        self.ctx = ctx
        self._proxy = proxy
        ctx.on_close = self._closed

    def buildProtocol(self, addr: Any) -> Protocol:
        ctx = self.ctx
        limits = ctx.limits
        if limits is not None:
            refused = limits.admit(getattr(addr, "host", ""))
            if refused == HOLD:
                connection = ClientConnection(ctx, held=True, peer=addr)
                limits.hold(connection)
                self._proxy.register_connection(ctx.name, connection)
                return connection
            if refused is not None:
                response = error_response(503, refused, extra_headers=b"Retry-After: 5\r\n")
                return Rejection(ctx.clock, response)
        connection = ClientConnection(ctx, peer=addr)
        self._proxy.register_connection(ctx.name, connection)
        return connection

    def _closed(self, connection: ClientConnection) -> None:
        limits = self.ctx.limits
        if limits is not None:
            if connection.held:
                limits.forget_held(connection)
            else:
                limits.release(connection.peer)
        self._proxy.unregister_connection(self.ctx.name, connection)


@implementer(IPlugin, IProtocolPlugin)
class HTTPProtocolPlugin:
    """
    C{protocol = "http"}: HTTP/1.1 and 1.0 with keep-alive on both hops.
    """

    name = "http"

    def validate(self, listener: ListenerConfig) -> None:
        if not listener.upstream:
            raise ConfigError("upstream: required key is missing")
        for key in listener.extra:
            raise ConfigError(f"{key}: unknown key")

    def build_factory(self, listener: ListenerConfig, context: IProxyContext) -> HTTPFactory:
        ctx = ListenerContext(
            config=listener,
            clock=context.reactor,
            group=context.upstream(listener.upstream),  # type: ignore[arg-type]
            log=context.log,
            stats=context.stats(listener.name),  # type: ignore[arg-type]
            scheme=b"https" if listener.tls else b"http",
            is_draining=context.draining,
            access_log=context.access_log if listener.access_log else None,
            limits=context.limits(listener.name),  # type: ignore[arg-type]
        )
        return HTTPFactory(ctx, context)
