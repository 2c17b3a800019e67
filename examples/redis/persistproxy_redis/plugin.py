# -*- test-case-name: test_redis_plugin -*-
"""
C{protocol = "redis"}: a RESP2 proxy in front of one Redis server (or identical replicas)
whose clients share a few pooled server connections (L{persistproxy_redis.session}).

Written only against L{persistproxy.interfaces}: the listener admits, holds, counts,
registers for the drain and terminates TLS around the factory; the upstream group dials
(with C{connect_timeout}, TLS when it says C{tls = true}), pools (C{pool_size},
C{idle_timeout}, C{max_connections} and its queue) and balances.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from persistproxy.interfaces import (
    ConfigError,
    IProtocolPlugin,
    ListenerConfig,
    ProxyContext,
    Upstream,
)
from persistproxy_redis.session import Listener, RedisFactory, Settings, idle_queue
from persistproxy_redis.upstream import RedisConnector, RedisUpstream

__all__ = ["RedisProtocolPlugin"]

#: Listener keys of the core that only HTTP (or a byte relay) reads: set on a redis listener
#: they would be silently ignored.
_NOT_OURS = (
    "keepalive_timeout",
    "max_requests",
    "max_head_size",
    "max_header_count",
    "max_body_size",
    "min_chunk_size",
    "add_via",
    "add_forwarded",
    "header_timeout",
    "body_timeout",
    "send_timeout",
    "max_lifetime",
    "max_idle_per_client",
    "send_408_on_idle",
    "tunnel_idle_timeout",
)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ListenerConfig)}


def _number(key: str, value: Any, what: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key}: must be at least {minimum:g}, got {value!r}")
    return float(value)


def _integer(key: str, value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key}: must be at least {minimum}, got {value!r}")
    return value


def settings(listener: ListenerConfig) -> Settings:
    """The redis keys of C{listener.extra}, checked; L{ConfigError} names the first bad one."""
    extra = dict(listener.extra)
    base = Settings()
    idle = _number(
        "client_idle_timeout",
        extra.pop("client_idle_timeout", base.client_idle_timeout),
        "a number of seconds",
        0,
    )
    size = _integer(
        "max_command_size",
        extra.pop("max_command_size", base.max_command_size),
        "a number of bytes",
        1024,
    )
    pipeline = _integer(
        "max_pipeline",
        extra.pop("max_pipeline", base.max_pipeline),
        "a number of commands",
        1,
    )
    for key in extra:
        raise ConfigError(f"{key}: unknown key")
    return Settings(client_idle_timeout=idle, max_command_size=size, max_pipeline=pipeline)


@implementer(IPlugin, IProtocolPlugin)
class RedisProtocolPlugin:
    """C{protocol = "redis"}: see the module docstring."""

    name = "redis"
    description = (
        "Redis (RESP2) proxy: pooled server connections lent per command burst,"
        " pinned while a client has connection state"
    )
    #: What a Redis client that skipped TLS reads: an error it can show.
    plaintext_answer = b"-ERR persistproxy: this port expects TLS\r\n"

    def validate(self, listener: ListenerConfig) -> None:
        if not listener.upstream:
            raise ConfigError("upstream: required key is missing")
        settings(listener)
        for key in _NOT_OURS:
            if getattr(listener, key) != _DEFAULTS[key]:
                raise ConfigError(f"{key}: not used by protocol redis")

    def build_factory(self, listener: ListenerConfig, context: ProxyContext) -> RedisFactory:
        group: Upstream[RedisUpstream] = context.upstream(
            listener.upstream, RedisConnector(context.clock)
        )
        config = settings(listener)
        return RedisFactory(
            Listener(
                name=listener.name,
                clock=context.clock,
                group=group,
                context=context,
                access_log=listener.access_log,
                settings=config,
                idle=idle_queue(context.clock, config.client_idle_timeout),
            )
        )

    def refusal(self, reason: str) -> bytes:
        """What Redis itself says past C{maxclients}, with the listener's reason."""
        return b"-ERR persistproxy: " + reason.encode("utf-8", "replace") + b"\r\n"
