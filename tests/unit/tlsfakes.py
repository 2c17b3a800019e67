"""
TLS in memory, shared by the TLS unit tests: the listener's settings from PEM files, a wrapped
protocol that records what it reads, a pyOpenSSL client pumped by hand against a listener
(L{Link}), and the upstream side dialling a TLS server in a memory reactor (L{Upstream}).
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from pki import PKI
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter

from persistproxy.config import UpstreamConfig
from persistproxy.logs import make_event_log
from persistproxy.metrics import ListenerStats
from persistproxy.tls.server import ListenerTLSSettings, ServerTLS
from persistproxy.tls.transport import TLSListenerFactory
from persistproxy.tls.upstream import endpoint_wrapper


def settings(*pairs: tuple[str, str], **kw: Any) -> ListenerTLSSettings:
    return ListenerTLSSettings(certificates=tuple(pairs), **kw)


def names_of(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


_DONE = Failure(ConnectionError("done"))


class HalfCloseTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Recorder(Protocol):
    """The wrapped (HTTP) protocol: answers each read with C{b"pong"}."""

    log_extra: dict[str, Any] | None = None

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.write(b"pong")  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.lost = reason

    def tls_established(self, facts: dict[str, Any]) -> None:
        self.log_extra = facts


class Link:
    """One client connection: a pyOpenSSL client pumped by hand against the server side."""

    def __init__(
        self,
        factory: TLSListenerFactory,
        clock: Clock,
        client_context: SSL.Context,
        server_name: bytes | None = b"site.test",
        session: SSL.Session | None = None,
        alpn: list[bytes] | None = None,
    ) -> None:
        self.clock = clock
        self.server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = HalfCloseTransport()
        self.server.makeConnection(self.transport)
        self.wrapped: Recorder = self.server.wrappedProtocol
        self.client = SSL.Connection(client_context, None)
        self.client.set_connect_state()
        if server_name:
            self.client.set_tlsext_host_name(server_name)
        if session is not None:
            self.client.set_session(session)
        if alpn:
            self.client.set_alpn_protos(alpn)
        self.plain = b""
        self.closed_by_server = False
        self.pump()

    def pump(self) -> None:
        for _ in range(20):
            moved = False
            with contextlib.suppress(SSL.WantReadError):
                self.client.do_handshake()
            try:
                out = self.client.bio_read(65536)
            except SSL.WantReadError:
                out = b""
            if out:
                moved = True
                self.server.dataReceived(out)
            self.clock.advance(0)
            back = self.transport.value()
            if back:
                moved = True
                self.transport.clear()
                self.client.bio_write(back)
                self._read()
            if not moved:
                return
        raise AssertionError("the handshake does not settle")

    def _read(self) -> None:
        while True:
            try:
                self.plain += self.client.recv(65536)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self.closed_by_server = True
                return
            except SSL.Error:
                return

    def send(self, data: bytes) -> None:
        self.client.send(data)
        self.pump()

    def close(self) -> None:
        """The client goes away without a close_notify, as most HTTP clients do."""
        self.server.connectionLost(Failure(ConnectionError("closed")))


def client_context(version: int, tickets: bool = True) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    if not tickets:
        context.set_options(SSL.OP_NO_TICKET)
    return context


def listener(
    pki: PKI, clock: Clock, stats: ListenerStats | None = None, **kw: Any
) -> TLSListenerFactory:
    tls = ServerTLS(settings(pki.site, pki.other, **kw), "web")
    return TLSListenerFactory(tls, Factory.forProtocol(Recorder), stats, None, clock)


class Sink(Protocol):
    """The upstream side's protocol: keeps what it receives."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class Upstream:
    """A TLS server in a memory reactor, and the upstream side dialling it."""

    def __init__(self, pki: PKI, server_pair: tuple[str, str], **config: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.stats = ListenerStats()
        server_tls = ServerTLS(settings(server_pair), "origin")
        self.reactor.listenTCP(
            4321,
            TLSListenerFactory(
                server_tls, Factory.forProtocol(Recorder), self.stats, None, self.reactor
            ),
        )
        self.log = io.StringIO()
        defaults: dict[str, Any] = {"tls_ca": str(pki.ca_pem), "tls_server_name": "site.test"}
        self.config = UpstreamConfig(
            name="app", servers=(("127.0.0.1", 4321),), tls=True, **{**defaults, **config}
        )
        wrap = endpoint_wrapper(self.reactor, self.config, make_event_log(self.log, "debug"))
        assert wrap is not None
        self.endpoint = wrap(TCP4ClientEndpoint(self.reactor, "127.0.0.1", 4321), "127.0.0.1")

    def connect(self) -> tuple[Any, list[Any]]:
        results: list[Any] = []
        d = self.endpoint.connect(Factory.forProtocol(Sink))
        d.addBoth(results.append)
        pump = ConnectionCompleter(self.reactor).succeedOnce()
        assert pump is not None
        pump.flush()
        return pump, results

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.log.getvalue().splitlines()]
        return [e for e in lines if e["event"] == name]
