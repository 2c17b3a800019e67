"""
A third-party protocol plugin for the tests, written only against persistproxy.interfaces:
C{protocol = "echo-line"} echoes each line it receives, prefixed with the listener's
C{greeting}. It implements no limits, drain bookkeeping or TLS: the listener gives it those.

The end-to-end tests put this directory on the proxy's PYTHONPATH, which is how a third
party's package adds a protocol (a module in a C{persistproxy/plugins/} directory on
C{sys.path}, with no C{__init__.py}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.plugin import IPlugin
from zope.interface import implementer

from persistproxy.interfaces import ConfigError, IProtocolPlugin, ListenerConfig, ProxyContext


class EchoLine(Protocol):
    """Echoes whole lines; busy while a line is incomplete."""

    def __init__(self, greeting: bytes, draining: Any) -> None:
        self._greeting = greeting
        self._draining = draining
        self._partial = b""

    def dataReceived(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self.transport.write(self._greeting + line + b"\n")  # type: ignore[union-attr]
        if lines and not self._partial and self._draining():
            self.transport.loseConnection()  # type: ignore[union-attr]

    # DrainAware
    def close_if_idle(self) -> bool:
        if self._partial:
            return False  # finish the line first (dataReceived closes after it)
        self.transport.loseConnection()  # type: ignore[union-attr]
        return True

    def drain_cut(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


@implementer(IPlugin, IProtocolPlugin)
class EchoLinePlugin:
    name = "echo-line"
    description = "echoes each line (a test plugin)"
    plaintext_answer = b"speak TLS\n"

    def validate(self, listener: ListenerConfig) -> None:
        for key, value in listener.extra.items():
            if key != "greeting" or not isinstance(value, str):
                raise ConfigError(f"{key}: unknown key or not a string")

    def build_factory(self, listener: ListenerConfig, context: ProxyContext) -> Factory:
        greeting = str(listener.extra.get("greeting", "")).encode()
        factory = Factory()
        factory.buildProtocol = lambda addr: EchoLine(greeting, context.draining)  # type: ignore[method-assign]
        return factory

    def refusal(self, reason: str) -> bytes:
        return b"refused: " + reason.encode() + b"\n"


echo_line = EchoLinePlugin()
