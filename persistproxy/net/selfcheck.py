# -*- test-case-name: tests.unit.test_selfcheck -*-
"""
The start-up self-check of the private Twisted and pyOpenSSL internals persistproxy relies on.

Every fast path that reaches into a library's private attributes is listed in L{INTERNALS},
with a probe: the attributes exist, and where it is cheap, the path does what it should on a
throwaway object (a TCP transport over a socket pair, a TLS handshake in memory). A probe
that fails switches its fast path off: the code then takes the public Twisted or pyOpenSSL
path, which is slower but does not depend on a library's insides. Without this, a new
Twisted or pyOpenSSL that renamed something would fail in the middle of a connection (or,
for upstream TLS, silently: every connect would time out).

Each probe runs at most once per process: L{problem} caches its finding, and the fast paths
consult it where they already decide once per connection or per listener whether to take
the fast path, so a passing probe costs a cached lookup there and nothing per request.
L{self_check}, called once by C{makeService} once the log exists, runs every probe that
applies to the running reactor and logs one C{internals.fallback} warning per failed probe.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import socket
from collections.abc import Callable
from dataclasses import dataclass
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

from persistproxy.logs import EventLog

__all__ = ["INTERNALS", "Internal", "ProbeFailed", "problem", "self_check", "usable"]


class ProbeFailed(Exception):
    """What a probe found wrong, phrased for the log line."""


@dataclass(frozen=True)
class Internal:
    """
    One group of private attributes a fast path relies on.

    @ivar name: how the fast path asks for it (L{usable}).
    @ivar module: the persistproxy module with the fast path.
    @ivar attributes: the private attributes, for the log line and the README.
    @ivar fallback: what is used instead when the probe fails.
    @ivar check: the probe; raises when the internal is missing or misbehaves.
    @ivar applies: whether the internal is in use under the given reactor.
    """

    name: str
    module: str
    attributes: str
    fallback: str
    check: Callable[[], None]
    applies: Callable[[Any], bool] = lambda reactor: True


# -- probe helpers ----------------------------------------------------------------------------


def _need(owner: Any, label: str, *names: str) -> None:
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        raise ProbeFailed(f"{label} has no {', '.join(missing)}")


def _expect(condition: bool, finding: str) -> None:
    if not condition:
        raise ProbeFailed(finding)


class _NoCall:
    def active(self) -> bool:
        return False

    def cancel(self) -> None:
        pass


class _Idle:
    """
    The reactor of a probe's transports: never run, so what they register is ignored.
    """

    def addReader(self, _: object) -> None:
        pass

    addWriter = removeReader = removeWriter = addReader

    def callLater(self, *_: object, **__: object) -> _NoCall:
        return _NoCall()

    def seconds(self) -> float:
        return 0.0


def _nothing_waiting(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    return False


# -- net/fastwrite.py -------------------------------------------------------------------------

_TCP_ATTRIBUTES = (
    "_tempDataLen",
    "dataBuffer",
    "_writeDisconnecting",
    "_writeDisconnected",
    "_closeWriteConnection",
    "_aborting",
    "TLS",
)


def _probe_fastwrite() -> None:
    from twisted.internet import tcp

    from persistproxy.net import fastwrite

    ours, peer = socket.socketpair()
    with ours, peer:
        peer.setblocking(False)
        idle: Any = _Idle()
        transport: Any = tcp.Connection(ours, Protocol(), idle)
        _need(transport, "a twisted.internet.tcp.Connection", *_TCP_ATTRIBUTES)
        transport.connected = 1
        _expect(not transport.TLS, "a new tcp.Connection says TLS is on")
        _expect(not fastwrite.backlogged(transport, True), "a new connection looks backlogged")
        fastwrite.write_directly(transport, b"a")
        _expect(peer.recv(16) == b"a", "a direct send did not arrive")
        transport.write(b"b")
        _expect(
            fastwrite.backlogged(transport, True),
            "bytes queued by write() are not seen in _tempDataLen or dataBuffer",
        )
        fastwrite.write_directly(transport, b"c")
        _expect(_nothing_waiting(peer), "a direct send overtook bytes queued by write()")
        transport.doWrite()
        _expect(peer.recv(16) == b"bc", "queued and direct bytes did not arrive in order")
        _expect(not fastwrite.backlogged(transport, True), "a flushed buffer looks backlogged")
        _expect(fastwrite.fin_can_follow(transport), "an idle connection cannot send a FIN")
        fastwrite.lose_write_directly(transport)
        _expect(peer.recv(16) == b"", "lose_write_directly did not send the FIN")
        transport.write(b"late")
        _expect(
            not fastwrite.backlogged(transport, True),
            "write() after the FIN was queued (_writeDisconnected not honoured)",
        )
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.setblocking(False)
        transport = tcp.Connection(ours, Protocol(), idle)
        transport.connected = 1
        transport.abortConnection()
        fastwrite.write_directly(transport, b"x")
        _expect(_nothing_waiting(peer), "a direct send went out after abortConnection")
        _expect(not fastwrite.fin_can_follow(transport), "a FIN could follow abortConnection")


# -- net/accept.py ----------------------------------------------------------------------------


class _Accepted(Protocol):
    def connectionMade(self) -> None:
        self.factory.made.append(self)  # type: ignore[attr-defined]


def _probe_accept() -> None:
    from twisted.internet import tcp

    from persistproxy.net.accept import ProxyPort, ProxyServer

    _need(socket.socket, "socket.socket", "_accept")
    _need(
        tcp.Port,
        "twisted.internet.tcp.Port",
        "_buildAddr",
        "_fromListeningDescriptor",
        "_realPortNumber",
        "sessionno",
        "addressFamily",
        "socketType",
    )
    _need(tcp.Connection, "twisted.internet.tcp.Connection", "_shouldShutdown", "_getLogPrefix")
    factory: Any = Factory.forProtocol(_Accepted)
    factory.made = []
    factory.noisy = False
    # ProxyServer.__init__ is a copy of tcp.Server.__init__: it must set what Twisted's does.
    idle: Any = _Idle()
    port = tcp.Port(0, factory, interface="127.0.0.1", reactor=idle)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        theirs = tcp.Server(a, Protocol(), ("127.0.0.1", 1), port, 7, idle)
        ours = ProxyServer(c, Protocol(), ("127.0.0.1", 1), port, 7, idle)
        missing = set(vars(theirs)) - set(vars(ours)) - {"logstr", "repstr"}
        _expect(not missing, f"tcp.Server.__init__ sets {sorted(missing)}, ProxyServer does not")
        _expect(
            (ours.logstr, ours.repstr) == (theirs.logstr, theirs.repstr),
            "ProxyServer's log strings differ from tcp.Server's",
        )
    # ProxyPort.doRead accepts through socket._accept and builds the address as Twisted does.
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        listening.setblocking(False)
        with socket.create_connection(listening.getsockname(), timeout=1.0) as client:
            accepting: Any = ProxyPort(0, factory, interface="127.0.0.1", reactor=idle)
            accepting.socket = listening
            accepting.numberAccepts = 1
            accepting.doRead()
            _expect(len(factory.made) == 1, "ProxyPort.doRead accepted nothing")
            transport = factory.made[0].transport
            try:
                _expect(isinstance(transport, ProxyServer), "the accepted transport is not ours")
                _expect(
                    transport.getPeer().port == client.getsockname()[1],
                    "the accepted connection's peer address is wrong",
                )
            finally:
                transport.socket.close()


# -- net/reactor.py ---------------------------------------------------------------------------


def _probe_reactor() -> None:
    from twisted.internet import tcp
    from twisted.internet.epollreactor import EPollReactor

    _need(
        EPollReactor,
        "twisted.internet.epollreactor.EPollReactor",
        "doPoll",
        "doIteration",
        "_doReadOrWrite",
        "listenTCP",
        "adoptStreamPort",
    )
    _need(tcp.Port, "twisted.internet.tcp.Port", "_fromListeningDescriptor")
    # Instance attributes, read without building a reactor (that would open descriptors).
    assigned = EPollReactor.__init__.__code__.co_names
    for name in ("_poller", "_selectables"):
        _expect(name in assigned, f"EPollReactor.__init__ no longer sets {name}")
    parameters = list(inspect.signature(EPollReactor._doReadOrWrite).parameters)
    _expect(
        parameters == ["self", "selectable", "fd", "event"],
        f"EPollReactor._doReadOrWrite takes {parameters}",
    )


def _is_epoll(reactor: Any) -> bool:
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    return isinstance(reactor, EPollReactor)


def _is_ours(reactor: Any) -> bool:
    try:
        from persistproxy.net.reactor import ProxyReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    return isinstance(reactor, ProxyReactor)


# -- tls/ -------------------------------------------------------------------------------------


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


def _probe_tls_calls() -> None:
    from persistproxy.tls import calls as calls_module

    calls: Any = calls_module
    _expect(calls._lib is not None, "OpenSSL._util cannot be imported")
    _need(
        calls._lib,
        "OpenSSL._util.lib",
        *calls._NEEDED,
        "SSL_ERROR_WANT_READ",
        "SSL_ERROR_ZERO_RETURN",
    )
    _need(calls._ffi, "OpenSSL._util.ffi", "new", "from_buffer", "buffer")
    _need(SSL.Connection, "OpenSSL.SSL.Connection", "_raise_ssl_error")
    fast, public = calls.BindingCalls(), calls.PublicCalls()
    server, client = _connections(*_contexts())
    _need(server, "an OpenSSL.SSL.Connection", "_ssl", "_into_ssl", "_from_ssl")
    _handshake(server, client, fast)
    _expect(fast.read(server) is None, "an empty read did not say so")
    public.encrypt(client, b"ping")
    fast.feed(server, public.take(client))
    _expect(fast.read(server) == b"ping", "a record did not decrypt through the binding")
    fast.encrypt(server, b"pong")
    public.feed(client, fast.take(server))
    _expect(public.read(client) == b"pong", "a record did not encrypt through the binding")
    client.shutdown()
    fast.feed(server, public.take(client))
    try:
        fast.read(server)
    except SSL.ZeroReturnError:
        pass
    else:
        raise ProbeFailed("the peer's close_notify was not reported")
    other, _ = _connections(*_contexts())
    fast.feed(other, b"\x16\x03\x01\x00\x04junk")  # a handshake record that is no ClientHello
    try:
        fast.read(other)
    except SSL.ZeroReturnError:
        raise ProbeFailed("a broken handshake read as a close_notify") from None
    except SSL.Error:
        pass
    else:
        raise ProbeFailed("a broken handshake raised no OpenSSL.SSL.Error")


def _probe_tls_binding() -> None:
    from persistproxy.tls import server as server_module
    from persistproxy.tls import upstream as upstream_module
    from persistproxy.tls.calls import PublicCalls

    tls_server: Any = server_module
    upstream: Any = upstream_module
    for module in (tls_server, upstream):
        _expect(module._lib is not None, "OpenSSL._util cannot be imported")
    _need(
        upstream._lib,
        "OpenSSL._util.lib",
        "SSL_session_reused",
        "SSL_get_verify_result",
        "X509_verify_cert_error_string",
    )
    _need(upstream._ffi, "OpenSSL._util.ffi", "string")
    public = PublicCalls()
    server_context, client_context = _contexts(tls12=True)
    server, client = _connections(server_context, client_context)
    _handshake(server, client, public)
    _expect(not tls_server._session_reused(server), "a full handshake reads as resumed")
    again, client_again = _connections(server_context, client_context)
    session = client.get_session()
    _expect(session is not None, "a completed handshake left no session")
    client_again.set_session(session)  # type: ignore[arg-type]
    _handshake(again, client_again, public)
    _expect(
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
    _expect(upstream.verify_error(client) != "", "the verify error of an untrusted chain is empty")


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


def _probe_tls_upstream() -> None:
    from twisted.internet.task import Clock
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from persistproxy.tls.calls import PublicCalls
    from persistproxy.tls.upstream import _ClientTLSFactory

    _need(
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
    _need(protocol, "a TLSMemoryBIOProtocol", "_tlsConnection")
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
    _expect(
        attempt.completed == [(protocol, protocol.wrappedProtocol)] and not attempt.failed,
        "the end of the handshake was not reported (_checkHandshakeStatus, _handshakeDone)",
    )
    _expect(bool(attempt.creator.remembered), "the session was not picked up (_tlsConnection)")
    failing: Any = factory.buildProtocol(None)  # type: ignore[arg-type]
    failing.makeConnection(_Pipe())
    failing.dataReceived(b"\x15\x03\x03\x00\x02\x02\x28")  # a fatal handshake_failure alert
    failing.connectionLost(Failure(ConnectionDone()))
    _expect(
        len(attempt.failed) == 1 and isinstance(attempt.failed[0].value, SSL.Error),
        "a failed handshake was not reported with OpenSSL's reason (_reason)",
    )


# -- service.py -------------------------------------------------------------------------------


def _probe_exit_signal() -> None:
    from twisted.internet import base, interfaces

    capturing = getattr(interfaces, "_ISupportsExitSignalCapturing", None)
    _expect(
        capturing is not None,
        "twisted.internet.interfaces has no _ISupportsExitSignalCapturing",
    )
    _need(base.ReactorBase, "twisted.internet.base.ReactorBase", "_exitSignal")
    _expect(
        capturing.implementedBy(base.ReactorBase),  # type: ignore[union-attr]
        "ReactorBase does not provide _ISupportsExitSignalCapturing",
    )


# -- the list ---------------------------------------------------------------------------------

#: Every private internal, by the name its fast path asks L{usable} for.
INTERNALS: dict[str, Internal] = {
    internal.name: internal
    for internal in (
        Internal(
            "fastwrite",
            "persistproxy.net.fastwrite",
            "tcp.Connection._tempDataLen, dataBuffer, _writeDisconnecting, _writeDisconnected, "
            "_aborting, TLS, _closeWriteConnection()",
            "Twisted's transport.write() and loseWriteConnection()",
            _probe_fastwrite,
        ),
        Internal(
            "accept",
            "persistproxy.net.accept",
            "socket._accept(), tcp.Port._buildAddr(), _realPortNumber, sessionno, "
            "tcp.Server.__init__ (copied), tcp.Connection._shouldShutdown",
            "Twisted's tcp.Port and tcp.Server",
            _probe_accept,
            _is_ours,
        ),
        Internal(
            "reactor",
            "persistproxy.net.reactor",
            "EPollReactor.doPoll (copied), _poller, _selectables, _doReadOrWrite(), "
            "tcp.Port._fromListeningDescriptor()",
            "Twisted's EPollReactor (persistproxy's reactor is not installed)",
            _probe_reactor,
            lambda reactor: _is_epoll(reactor) and not _is_ours(reactor),
        ),
        Internal(
            "tls.calls",
            "persistproxy.tls.calls",
            "OpenSSL._util.ffi/lib, Connection._ssl, _into_ssl, _from_ssl, _raise_ssl_error()",
            "pyOpenSSL's bio_write(), recv(), sendall() and bio_read()",
            _probe_tls_calls,
        ),
        Internal(
            "tls.binding",
            "persistproxy.tls.server, persistproxy.tls.upstream",
            "OpenSSL._util.lib.SSL_session_reused, SSL_get_verify_result, "
            "X509_verify_cert_error_string on Connection._ssl",
            "tls_resumed is reported false; an untrusted upstream chain is reported "
            "without OpenSSL's reason",
            _probe_tls_binding,
        ),
        Internal(
            "tls.upstream",
            "persistproxy.tls.upstream",
            "TLSMemoryBIOProtocol._checkHandshakeStatus(), _handshakeDone, _aborted, "
            "_tlsConnection, _reason",
            "Twisted's TLSMemoryBIOProtocol with an IHandshakeListener protocol wrapper",
            _probe_tls_upstream,
        ),
        Internal(
            "exit_signal",
            "persistproxy.service",
            "reactor._exitSignal (twistd's _ISupportsExitSignalCapturing)",
            "a drain ended by SIGTERM exits with the signal's status instead of 0",
            _probe_exit_signal,
        ),
    )
}


@functools.cache
def problem(name: str) -> str | None:
    """
    Run the probe of L{INTERNALS}C{[name]} the first time it is asked for.

    @return: L{None} when it passed, else what it found, in one line.
    """
    try:
        INTERNALS[name].check()
    except ProbeFailed as e:
        return str(e)
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def usable(name: str) -> bool:
    """Whether the fast path C{name} may use its internals (its probe passed)."""
    return problem(name) is None


def self_check(log: EventLog, reactor: Any) -> dict[str, str]:
    """
    Probe every internal that applies under C{reactor} and log one C{internals.fallback}
    warning for each that failed. Called once, at start-up.

    @return: what each failed probe found, by name.
    """
    failed: dict[str, str] = {}
    for internal in INTERNALS.values():
        if not internal.applies(reactor):
            continue
        finding = problem(internal.name)
        if finding is None:
            continue
        failed[internal.name] = finding
        log.warning(
            "internals.fallback",
            internal=internal.name,
            module=internal.module,
            attribute=internal.attributes,
            fallback=internal.fallback,
            finding=finding,
        )
    return failed
