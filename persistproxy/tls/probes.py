# -*- test-case-name: tests.unit.test_selfcheck -*-
"""
The start-up self-check's probes of the pyOpenSSL and Twisted TLS internals used under
C{persistproxy.tls} (see L{persistproxy.net.selfcheck}, which lists and runs them): in-memory
handshakes with a throwaway self-signed certificate, through the fast path and the public one.
"""

from __future__ import annotations

import contextlib
import functools
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.net.selfcheck import ProbeFailed, expect, need

__all__ = ["probe_binding", "probe_calls", "probe_upstream"]


@functools.cache
def _identity() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A throwaway key and self-signed certificate for the in-memory handshakes."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "persistproxy self-check")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _contexts(tls12: bool = False) -> tuple[SSL.Context, SSL.Context]:
    key, certificate = _identity()
    server = SSL.Context(SSL.TLS_METHOD)
    server.use_privatekey(key)
    server.use_certificate(certificate)
    server.set_session_id(b"persistproxy-self-check")
    client = SSL.Context(SSL.TLS_METHOD)
    if tls12:
        server.set_max_proto_version(SSL.TLS1_2_VERSION)
    return server, client


def _connections(
    server: SSL.Context, client: SSL.Context
) -> tuple[SSL.Connection, SSL.Connection]:
    accepting = SSL.Connection(server, None)
    accepting.set_accept_state()
    connecting = SSL.Connection(client, None)
    connecting.set_connect_state()
    return accepting, connecting


def _handshake(server: SSL.Connection, client: SSL.Connection, server_calls: Any) -> None:
    """Complete a handshake in memory: the server through C{server_calls}, the client public."""
    from persistproxy.tls.calls import PublicCalls

    public = PublicCalls()
    for _ in range(8):
        done = 0
        with contextlib.suppress(SSL.WantReadError):
            client.do_handshake()
            done += 1
        data = public.take(client)
        if data:
            server_calls.feed(server, data)
        with contextlib.suppress(SSL.WantReadError):
            server.do_handshake()
            done += 1
        data = server_calls.take(server)
        if data:
            public.feed(client, data)
        if done == 2:
            return
    raise ProbeFailed("an in-memory handshake did not complete")


def probe_calls() -> None:
    from persistproxy.tls import calls as calls_module

    calls: Any = calls_module
    expect(calls._lib is not None, "OpenSSL._util cannot be imported")
    need(
        calls._lib,
        "OpenSSL._util.lib",
        *calls._NEEDED,
        "SSL_ERROR_WANT_READ",
        "SSL_ERROR_ZERO_RETURN",
    )
    need(calls._ffi, "OpenSSL._util.ffi", "new", "from_buffer", "buffer")
    need(SSL.Connection, "OpenSSL.SSL.Connection", "_raise_ssl_error")
    fast, public = calls.BindingCalls(), calls.PublicCalls()
    contexts = _contexts()
    server, client = _connections(*contexts)
    need(server, "an OpenSSL.SSL.Connection", "_ssl", "_into_ssl", "_from_ssl")
    _handshake(server, client, fast)
    expect(fast.read(server) is None, "an empty read did not say so")
    public.encrypt(client, b"ping")
    fast.feed(server, public.take(client))
    expect(fast.read(server) == b"ping", "a record did not decrypt through the binding")
    fast.encrypt(server, b"pong")
    public.feed(client, fast.take(server))
    expect(public.read(client) == b"pong", "a record did not encrypt through the binding")
    client.shutdown()
    fast.feed(server, public.take(client))
    try:
        fast.read(server)
    except SSL.ZeroReturnError:
        pass
    else:
        raise ProbeFailed("the peer's close_notify was not reported")
    other, _ = _connections(*contexts)
    fast.feed(other, b"\x16\x03\x01\x00\x04junk")  # a handshake record that is no ClientHello
    try:
        fast.read(other)
    except SSL.ZeroReturnError:
        raise ProbeFailed("a broken handshake read as a close_notify") from None
    except SSL.Error:
        pass
    else:
        raise ProbeFailed("a broken handshake raised no OpenSSL.SSL.Error")


def probe_binding() -> None:
    from persistproxy.tls import server as server_module
    from persistproxy.tls import upstream as upstream_module
    from persistproxy.tls.calls import PublicCalls

    tls_server: Any = server_module
    upstream: Any = upstream_module
    for module in (tls_server, upstream):
        expect(module._lib is not None, "OpenSSL._util cannot be imported")
    need(
        upstream._lib,
        "OpenSSL._util.lib",
        "SSL_session_reused",
        "SSL_get_verify_result",
        "X509_verify_cert_error_string",
    )
    need(upstream._ffi, "OpenSSL._util.ffi", "string")
    public = PublicCalls()
    server_context, client_context = _contexts(tls12=True)
    server, client = _connections(server_context, client_context)
    _handshake(server, client, public)
    expect(not tls_server._session_reused(server), "a full handshake reads as resumed")
    again, client_again = _connections(server_context, client_context)
    session = client.get_session()
    expect(session is not None, "a completed handshake left no session")
    client_again.set_session(session)  # type: ignore[arg-type]
    _handshake(again, client_again, public)
    expect(
        tls_server._session_reused(again) and tls_server._session_reused(client_again),
        "a resumed handshake does not read as resumed",
    )
    strict = SSL.Context(SSL.TLS_METHOD)
    strict.set_verify(SSL.VERIFY_PEER, None)
    server, client = _connections(server_context, strict)
    try:
        _handshake(server, client, public)
    except SSL.Error:
        pass
    else:
        raise ProbeFailed("a certificate nobody trusts was accepted")
    expect(upstream.verify_error(client) != "", "the verify error of an untrusted chain is empty")


@implementer(IOpenSSLClientConnectionCreator)
class _Creator:
    def __init__(self, context: SSL.Context) -> None:
        self._context = context
        self.remembered: list[SSL.Connection] = []

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        return connection

    def remember(self, connection: SSL.Connection) -> None:
        self.remembered.append(connection)


class _Attempt:
    """What L{persistproxy.tls.upstream}'s TLS protocol reports to."""

    def __init__(self, creator: _Creator, clock: Any) -> None:
        self.creator = creator
        self.clock = clock
        self.completed: list[tuple[object, object]] = []
        self.failed: list[Failure] = []

    def handshake_completed(self, protocol: object, wrapped: object) -> None:
        self.completed.append((protocol, wrapped))

    def handshake_failed(self, protocol: object, reason: Failure) -> None:
        self.failed.append(reason)


class _Pipe:
    """The TCP transport under a probe's TLS protocol: keeps what is written."""

    disconnecting = False

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def take(self) -> bytes:
        data, self.written = b"".join(self.written), []
        return data

    def loseConnection(self) -> None:
        self.disconnecting = True

    abortConnection = loseConnection

    def getPeer(self) -> None:
        return None

    getHost = getPeer


def probe_upstream() -> None:
    from twisted.internet.task import Clock
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from persistproxy.tls.calls import PublicCalls
    from persistproxy.tls.upstream import _ClientTLSFactory

    need(
        TLSMemoryBIOProtocol,
        "twisted.protocols.tls.TLSMemoryBIOProtocol",
        "_checkHandshakeStatus",
        "_handshakeDone",
        "_aborted",
        "_reason",
    )
    server_context, client_context = _contexts()
    clock = Clock()
    attempt = _Attempt(_Creator(client_context), clock)
    app: Any = Factory.forProtocol(Protocol)
    app.noisy = False
    factory = _ClientTLSFactory(attempt, app)  # type: ignore[arg-type]
    protocol: Any = factory.buildProtocol(None)  # type: ignore[arg-type]
    pipe = _Pipe()
    protocol.makeConnection(pipe)
    need(protocol, "a TLSMemoryBIOProtocol", "_tlsConnection")
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    public = PublicCalls()
    for _ in range(8):
        clock.advance(0)
        data = pipe.take()
        if data:
            public.feed(server, data)
        with contextlib.suppress(SSL.WantReadError):
            server.do_handshake()
        data = public.take(server)
        if data:
            protocol.dataReceived(data)
        if attempt.completed or attempt.failed:
            break
    expect(
        attempt.completed == [(protocol, protocol.wrappedProtocol)] and not attempt.failed,
        "the end of the handshake was not reported (_checkHandshakeStatus, _handshakeDone)",
    )
    expect(bool(attempt.creator.remembered), "the session was not picked up (_tlsConnection)")
    failing: Any = factory.buildProtocol(None)  # type: ignore[arg-type]
    failing.makeConnection(_Pipe())
    failing.dataReceived(b"\x15\x03\x03\x00\x02\x02\x28")  # a fatal handshake_failure alert
    failing.connectionLost(Failure(ConnectionDone()))
    expect(
        len(attempt.failed) == 1 and isinstance(attempt.failed[0].value, SSL.Error),
        "a failed handshake was not reported with OpenSSL's reason (_reason)",
    )
