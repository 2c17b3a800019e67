"""
In-memory plumbing for driving the proxy's protocols without sockets: a client connection on
a StringTransport, an upstream group whose pools hand out upstream connections on
StringTransports, and a Clock for every timer.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from persistproxy.config import ListenerConfig, UpstreamConfig
from persistproxy.http.client_connection import ClientConnection
from persistproxy.http.context import ListenerContext
from persistproxy.http.plugin import HTTPFactory, HTTPProtocolPlugin
from persistproxy.http.upstream_connection import UpstreamConnection
from persistproxy.listener.admission import ConnectionRegistry, ListenerFactory
from persistproxy.listener.limits import ConnectionLimits
from persistproxy.logs import AccessLog, make_event_log
from persistproxy.metrics import ListenerStats
from persistproxy.upstream.group import Server, UpstreamGroup


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records a half-close, like a TCP transport."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class FakeOrigin:
    """
    Hands out upstream connections over StringTransports and remembers them.
    """

    def __init__(self, clock: Clock, config: UpstreamConfig) -> None:
        self.clock = clock
        self.config = config
        self.connections: list[UpstreamConnection] = []
        self.refuse = False
        #: Ports whose connects are refused (a server that is down), whatever C{refuse} says.
        self.refuse_ports: set[int] = set()
        #: The port of each connection in C{connections}.
        self.ports: list[int] = []
        self.pending: list[Deferred[UpstreamConnection]] | None = None

    def connector(self, host: str, port: int) -> Any:
        def connect() -> Deferred[UpstreamConnection]:
            if self.refuse or port in self.refuse_ports:
                return fail(ConnectionRefusedError("connection refused"))
            connection = UpstreamConnection(
                self.clock,
                self.config.response_timeout,
                self.config.max_requests,
                self.config.max_header_count,
                self.config.read_timeout,
                self.config.write_timeout,
            )
            connection.makeConnection(StringTransport())
            self.connections.append(connection)
            self.ports.append(port)
            if self.pending is not None:
                d: Deferred[UpstreamConnection] = Deferred()
                self.pending.append(d)
                d.addCallback(lambda _: connection)
                return d
            return succeed(connection)

        return connect

    def sent(self, index: int = -1) -> bytes:
        transport = self.connections[index].transport
        assert isinstance(transport, StringTransport)
        return transport.value()

    def clear(self, index: int = -1) -> None:
        transport = self.connections[index].transport
        assert isinstance(transport, StringTransport)
        transport.clear()

    def respond(self, data: bytes, index: int = -1) -> None:
        self.connections[index].dataReceived(data)

    def close(self, index: int = -1) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        connection = self.connections[index]
        connection.connectionLost(Failure(ConnectionDone()))


class Harness:
    """
    One listener's context with a fake origin, and helpers to open client connections.
    """

    def __init__(
        self, listener: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None
    ) -> None:
        self.clock = Clock()
        self.log_stream = io.StringIO()
        self.log = make_event_log(self.log_stream, "debug")
        up = {"name": "app", "servers": (("127.0.0.1", 8081),), **(upstream or {})}
        self.upstream_config = UpstreamConfig(**up)
        self.origin = FakeOrigin(self.clock, self.upstream_config)
        config = self.upstream_config
        servers = [
            Server(host, port, None, config.max_fails, config.fail_timeout, self.log)  # type: ignore[arg-type]
            for host, port in config.servers
        ]
        self.group = UpstreamGroup(
            self.clock,
            self.upstream_config,
            servers,
            self.log,
            lambda server: self.origin.connector(server.host, server.port),
        )
        lc = {"name": "web", "bind": "tcp:0", "upstream": "app", **(listener or {})}
        self.listener_config = ListenerConfig(**lc)
        self.stats = ListenerStats()
        self.ctx = ListenerContext(
            config=self.listener_config,
            clock=self.clock,
            group=self.group,
            log=self.log,
            stats=self.stats,
            access_log=(
                AccessLog(self.clock, self.log_stream, buffer_size=0)
                if self.listener_config.access_log
                else None
            ),
        )

    def client(self) -> tuple[ClientConnection, HalfCloseTransport]:
        connection = ClientConnection(self.ctx)
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        connection.makeConnection(transport)
        return connection, transport

    def events(self, name: str) -> list[dict[str, Any]]:
        import json

        out = []
        for line in self.log_stream.getvalue().splitlines():
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
        return out

    @property
    def pool(self) -> Any:
        return self.group.pools[0]


class FakePort:
    """A listening port that records whether it reads (accepts) or not."""

    reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def limited_listener(**kw: int) -> tuple[Harness, ListenerFactory, ConnectionLimits]:
    """
    An HTTP listener with connection limits (C{max_connections}, C{max_connections_per_client},
    C{max_idle_per_client}): its harness, the admitting factory and the limits.
    """
    h = Harness(listener={k: v for k, v in kw.items()})
    limits = ConnectionLimits(
        "web",
        kw.get("max_connections", 0),
        kw.get("max_connections_per_client", 0),
        kw.get("max_idle_per_client", 0),
        h.log,
        ListenerStats(),
    )
    h.ctx.limits = limits
    plugin = HTTPProtocolPlugin()
    factory = ListenerFactory(
        HTTPFactory(h.ctx), h.clock, limits, h.stats, ConnectionRegistry(), plugin.refusal
    )
    return h, factory, limits


def connect_from(factory: Any, host: str) -> tuple[Any, StringTransport]:
    """A connection from C{host} accepted by C{factory}, on a StringTransport."""
    address = IPv4Address("TCP", host, 40000)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def parse_response(data: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """Status, headers (lower-cased names) and everything after the head."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, rest


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def force_fallback(monkeypatch: Any, name: str, finding: str = "forced by a test") -> None:
    """
    Make the self-check's probe C{name} fail, as it would with a Twisted or pyOpenSSL whose
    internals changed, so the fast path it guards falls back to the public one. The caller
    clears C{selfcheck.problem}'s cache once C{monkeypatch} is undone.
    """
    from dataclasses import replace

    from persistproxy.net import selfcheck

    def check() -> None:
        raise selfcheck.ProbeFailed(finding)

    internal = replace(selfcheck.INTERNALS[name], check=check)
    monkeypatch.setitem(selfcheck.INTERNALS, name, internal)
    selfcheck.problem.cache_clear()
