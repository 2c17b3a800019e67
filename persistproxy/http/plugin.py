# -*- test-case-name: tests.unit.test_plugins -*-
"""
The HTTP/1.x reverse proxy as a protocol plugin: the seam between listeners and the engine.

It is written against L{persistproxy.interfaces} only, like any third-party plugin: the
listener admits, counts, registers for drain and terminates TLS around its factory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.plugin import IPlugin
from zope.interface import implementer

from persistproxy.config import ListenerConfig
from persistproxy.http.client_connection import ClientConnection
from persistproxy.http.context import ListenerContext
from persistproxy.http.errors import error_response
from persistproxy.http.upstream_connection import HTTPConnector
from persistproxy.interfaces import ConfigError, IProtocolPlugin, ProxyContext

__all__ = ["HTTPFactory", "HTTPProtocolPlugin"]


class HTTPFactory(Factory):
    """
    Builds a L{ClientConnection} for each admitted connection, with its listener's context.
    """

    noisy = False

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx

    def buildProtocol(self, addr: Any) -> ClientConnection:
        return ClientConnection(self.ctx, peer=addr)


@implementer(IPlugin, IProtocolPlugin)
class HTTPProtocolPlugin:
    """
    C{protocol = "http"}: HTTP/1.1 and 1.0 with keep-alive on both hops.
    """

    name = "http"
    description = "HTTP/1.1 and 1.0 reverse proxy, keep-alive on both hops"
    #: nginx's "400 The plain HTTP request was sent to HTTPS port", in our words.
    plaintext_answer = error_response(
        400, "a plain HTTP request was sent to a TLS port; use https://"
    )

    def validate(self, listener: ListenerConfig) -> None:
        if not listener.upstream:
            raise ConfigError("upstream: required key is missing")
        for key in listener.extra:
            raise ConfigError(f"{key}: unknown key")

    def build_factory(self, listener: ListenerConfig, context: ProxyContext) -> HTTPFactory:
        ctx = ListenerContext(
            config=listener,
            clock=context.clock,
            group=context.upstream(listener.upstream, HTTPConnector(context.clock)),
            log=context.log,
            stats=context.stats(listener.name),
            scheme=b"https" if listener.tls else b"http",
            is_draining=context.draining,
            access_log=context.access_log if listener.access_log else None,
            limits=context.limits(listener.name),
        )
        # Kept-alive connections waiting for their next request, read at scrape time (none
        # are kept with keepalive_timeout = 0).
        idle = ctx.idle_queue
        ctx.stats.idle = idle.__len__ if idle is not None else (lambda: 0)
        return HTTPFactory(ctx)

    def refusal(self, reason: str) -> bytes:
        return error_response(503, reason, extra_headers=b"Retry-After: 5\r\n")
