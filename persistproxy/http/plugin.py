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
from persistproxy.http.negotiate import NegotiatingConnection
from persistproxy.http.upstream_connection import HTTPConnector
from persistproxy.interfaces import ConfigError, IProtocolPlugin, ProxyContext

__all__ = ["HTTPFactory", "HTTPProtocolPlugin", "NegotiatingFactory"]


class HTTPFactory(Factory):
    """
    Builds a L{ClientConnection} for each admitted connection, with its listener's context.
    """

    noisy = False

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx

    def buildProtocol(self, addr: Any) -> ClientConnection:
        return ClientConnection(self.ctx, peer=addr)


class NegotiatingFactory(HTTPFactory):
    """
    For a listener that offers HTTP/2: each connection decides on its first bytes (see
    L{persistproxy.http.negotiate}).
    """

    def buildProtocol(self, addr: Any) -> NegotiatingConnection:  # type: ignore[override]
        return NegotiatingConnection(self.ctx, peer=addr, cleartext=self.ctx.h2c)


#: Listener keys of this plugin beyond the core's, with their defaults.
_H2_KEYS = {"h2c": False, "h2_max_concurrent_streams": 128}


@implementer(IPlugin, IProtocolPlugin)
class HTTPProtocolPlugin:
    """
    C{protocol = "http"}: HTTP/1.1 and 1.0 with keep-alive on both hops, and HTTP/2 on the
    client's hop where the listener offers it (its streams go upstream over HTTP/1.1).
    """

    name = "http"
    description = "HTTP/1.1, 1.0 and 2 reverse proxy, keep-alive on both hops"
    #: nginx's "400 The plain HTTP request was sent to HTTPS port", in our words.
    plaintext_answer = error_response(
        400, "a plain HTTP request was sent to a TLS port; use https://"
    )

    def validate(self, listener: ListenerConfig) -> None:
        if not listener.upstream:
            raise ConfigError("upstream: required key is missing")
        for key in listener.extra:
            if key not in _H2_KEYS:
                raise ConfigError(f"{key}: unknown key")
        h2c = listener.extra.get("h2c", False)
        if not isinstance(h2c, bool):
            raise ConfigError(f"h2c: expected true or false, got {h2c!r}")
        if h2c and listener.tls is not None:
            raise ConfigError(
                'h2c: cleartext HTTP/2 only; over TLS offer it with [listener.tls] alpn = ["h2"]'
            )
        streams = listener.extra.get("h2_max_concurrent_streams", 128)
        if isinstance(streams, bool) or not isinstance(streams, int):
            raise ConfigError(f"h2_max_concurrent_streams: expected an integer, got {streams!r}")
        if not 1 <= streams <= 65536:
            raise ConfigError(f"h2_max_concurrent_streams: must be 1 to 65536, got {streams}")

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
            h2_alpn=listener.tls is not None and "h2" in listener.tls.get("alpn", ()),
            h2c=bool(listener.extra.get("h2c", False)),
            h2_max_concurrent_streams=int(listener.extra.get("h2_max_concurrent_streams", 128)),
        )
        # Kept-alive connections waiting for their next request, read at scrape time (none
        # are kept with keepalive_timeout = 0).
        idle = ctx.idle_queue
        ctx.stats.idle = idle.__len__ if idle is not None else (lambda: 0)
        if ctx.h2_alpn or ctx.h2c:
            return NegotiatingFactory(ctx)
        return HTTPFactory(ctx)

    def refusal(self, reason: str) -> bytes:
        return error_response(503, reason, extra_headers=b"Retry-After: 5\r\n")
