# -*- test-case-name: tests.unit.test_tls_upstream -*-
"""
TLS to upstream servers: verified with service-identity, resumed across connections.

An C{[[upstream]]} with C{tls = true} dials each server through L{TLSClientEndpoint}, which
the L{persistproxy.upstream.group.UpstreamGroup} gets from L{endpoint_wrapper}. Three things differ
from Twisted's C{wrapClientTLS}:

 - The connection is handed to the pool only once the handshake, certificate and host name
   checks included, has succeeded. A failure is then a connect failure with a reason saying
   why (untrusted chain, wrong name, timeout), which the pool logs and answers with 502,
   instead of an upstream connection that dies under the first request.
 - The handshake has a deadline (the upstream's C{connect_timeout}).
 - New connections resume the last session of the same server (C{Connection.set_session}):
   Twisted's client creates every connection without one, so each pays a full handshake.
   Connections of one server share one creator and so one C{SSL.Context}.

Learning that the handshake ended, and why it failed, takes a subclass of Twisted's
C{TLSMemoryBIOProtocol} that hooks its private C{_checkHandshakeStatus}. If the start-up
self-check (L{persistproxy.net.selfcheck}) finds those internals changed, connections are
made with Twisted's protocol as it is and a protocol wrapper that hears the same through
public interfaces (C{IHandshakeListener}, C{connectionLost}) instead, at the cost of one
more call per read and write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionClosed, ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import (
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
)
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.config import UpstreamConfig
from persistproxy.logs import EventLog
from persistproxy.net.selfcheck import usable
from persistproxy.tls.server import OP_IGNORE_UNEXPECTED_EOF, session_reused, ssl_error_text
from persistproxy.tls.trust import load_trust_root

try:  # the verification result has no pyOpenSSL accessor; its cffi binding has it
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover
    _ffi = _lib = None

if TYPE_CHECKING:  # Twisted exports the interface from no public module
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "TLSClientEndpoint",
    "UpstreamTLS",
    "UpstreamTLSError",
    "endpoint_wrapper",
    "verify_error",
]

_DONE = Failure(ConnectionDone())

#: What we speak upstream, offered by ALPN (a server choosing nothing is fine too).
_ALPN = [b"http/1.1"]


class UpstreamTLSError(Exception):
    """
    A TLS connection to an upstream server could not be set up; the message says why.
    """


def endpoint_wrapper(
    reactor: Any, config: UpstreamConfig, log: EventLog
) -> Callable[[IStreamClientEndpoint, str], IStreamClientEndpoint] | None:
    """
    The C{EndpointWrapper} of an upstream group: L{None} unless C{tls = true}.
    """
    if not config.tls:
        return None
    return UpstreamTLS(reactor, config, log).wrap


class UpstreamTLS:
    """
    The TLS settings of one C{[[upstream]]} group, built once at start-up.
    """

    def __init__(self, reactor: IReactorTime, config: UpstreamConfig, log: EventLog) -> None:
        self._reactor = reactor
        self._config = config
        self._log = log
        self._trust: IOpenSSLTrustRoot | None = None
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}
        if config.tls_verify:
            self._trust = load_trust_root(config.tls_ca) if config.tls_ca else platformTrust()
        else:
            log.warning(
                "upstream.tls_unverified",
                upstream=config.name,
                detail="tls_verify = false: any certificate is accepted for these servers",
            )

    def wrap(self, endpoint: IStreamClientEndpoint, host: str) -> IStreamClientEndpoint:
        """
        The endpoint of one server: C{host} is verified unless C{tls_server_name} is set.
        """
        name = self._config.tls_server_name or host
        return TLSClientEndpoint(
            self._reactor,
            endpoint,
            ResumingCreator(self._options(name), name, send_name=not self._config.tls_verify),
            name,
            self._config.connect_timeout,
            self._log,
            self._config.tls_ca or "the system's trusted CAs",
        )

    def _options(self, name: str) -> IOpenSSLClientConnectionCreator:
        # One creator (so one SSL.Context) per server name: the servers of a group share it.
        creator = self._creators.get(name)
        if creator is None:
            if self._trust is not None:
                creator = optionsForClientTLS(
                    name,
                    trustRoot=self._trust,
                    acceptableProtocols=_ALPN,
                    extraCertificateOptions={"enableSessionTickets": True},
                )
            else:
                creator = CertificateOptions(  # type: ignore[assignment]
                    verify=False, enableSessionTickets=True, acceptableProtocols=_ALPN
                )
            self._creators[name] = creator  # type: ignore[assignment]
        return creator  # type: ignore[return-value]


@implementer(IOpenSSLClientConnectionCreator)
class ResumingCreator:
    """
    Makes each new connection to one server offer the session of the last one.

    @ivar session: the last session learned from this server, if any.
    """

    def __init__(
        self, inner: IOpenSSLClientConnectionCreator, name: str, send_name: bool = False
    ) -> None:
        self._inner = inner
        self.session: SSL.Session | None = None
        #: Unverified options do not send SNI themselves; verified ones do.
        self._sni = (
            name.encode("idna")
            if send_name and not (isIPAddress(name) or isIPv6Address(name))
            else None
        )

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection: SSL.Connection = self._inner.clientConnectionForTLS(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        # An origin closing an idle connection without close_notify would otherwise make
        # OpenSSL mark the session not resumable. HTTP framing still detects truncation.
        connection.set_options(OP_IGNORE_UNEXPECTED_EOF)
        if self.session is not None:
            connection.set_session(self.session)
        return connection

    def remember(self, connection: SSL.Connection) -> None:
        session = connection.get_session()
        if session is not None:
            self.session = session


class _ClientTLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS client transport, reporting the end of the handshake to its attempt and
    picking up the session again after the first reads: TLS 1.3 tickets arrive after the
    handshake.
    """

    factory: _ClientTLSFactory
    _reported = False
    _reads = 0

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()  # type: ignore[no-untyped-call]
        if self._handshakeDone and not self._reported and not self._aborted:
            self._reported = True
            self.factory.attempt.handshake_completed(self, self.wrappedProtocol)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self._reported and self._reads < 2 and self._tlsConnection is not None:
            self._reads += 1
            self.factory.attempt.creator.remember(self._tlsConnection)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if not self._reported:
            self._reported = True
            self.factory.attempt.handshake_failed(self, self._reason or reason)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class _ClientTLSFactory(TLSMemoryBIOFactory):
    protocol = _ClientTLSProtocol

    def __init__(self, attempt: _Attempt, wrapped: IProtocolFactory) -> None:
        super().__init__(attempt.creator, True, wrapped, attempt.clock)
        self.attempt = attempt


@implementer(IHandshakeListener)
class _HandshakeWatcher(ProtocolWrapper):
    """
    The public way to what L{_ClientTLSProtocol} reports (used when the self-check finds
    Twisted's TLS internals changed): Twisted's TLS protocol wraps this, which wraps the
    upstream connection. It hears the end of the handshake through C{IHandshakeListener},
    and a failure's reason in C{connectionLost}, to which Twisted's TLS protocol passes the
    reason the handshake failed.
    """

    factory: _WatchingFactory
    _reported = False
    _reads = 0

    def handshakeCompleted(self) -> None:
        tls: Any = self.transport
        # A host name that failed verification aborts the connection during the handshake:
        # connectionLost reports that, with the reason.
        if not self._reported and not tls.disconnecting:
            self._reported = True
            self.factory.attempt.handshake_completed(tls, self.wrappedProtocol)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self._reported and self._reads < 2 and self.transport is not None:
            self._reads += 1
            connection = self.transport.getHandle()  # type: ignore[attr-defined]
            if connection is not None:
                self.factory.attempt.creator.remember(connection)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if not self._reported:
            self._reported = True
            self.factory.attempt.handshake_failed(self.transport, reason)  # type: ignore[arg-type]
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class _WatchingFactory(WrappingFactory):
    protocol = _HandshakeWatcher
    noisy = False

    def __init__(self, attempt: _Attempt, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.attempt = attempt


def _tls_factory(attempt: _Attempt, wrapped: IProtocolFactory) -> TLSMemoryBIOFactory:
    """The TLS side of one attempt: L{_ClientTLSProtocol}, or the public way if need be."""
    if usable("tls.upstream"):
        return _ClientTLSFactory(attempt, wrapped)
    return TLSMemoryBIOFactory(
        attempt.creator, True, _WatchingFactory(attempt, wrapped), attempt.clock
    )


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    Connects through C{wrapped} and completes a TLS handshake before the connection counts
    as made (see the module docstring).
    """

    def __init__(
        self,
        clock: IReactorTime,
        wrapped: IStreamClientEndpoint,
        creator: ResumingCreator,
        name: str,
        timeout: float,
        log: EventLog,
        trust: str = "",
    ) -> None:
        self.clock = clock
        self.wrapped = wrapped
        self.creator = creator
        self.name = name
        self.timeout = timeout
        self.trust = trust
        self._log = log

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return _Attempt(self, protocolFactory).result

    def over(self, wrapped: IStreamClientEndpoint) -> TLSClientEndpoint:
        """
        The same TLS, over another endpoint (one that writes a PROXY protocol header first):
        its session memory is this one's, so connections made either way resume each other.
        """
        return TLSClientEndpoint(
            self.clock, wrapped, self.creator, self.name, self.timeout, self._log, self.trust
        )


class _Attempt:
    """
    One connection attempt: the TCP connection, then the handshake, under one deadline.
    """

    def __init__(self, endpoint: TLSClientEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.creator = endpoint.creator
        self.clock = endpoint.clock
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self._protocol: TLSMemoryBIOProtocol | None = None
        self._timer: IDelayedCall | None = None
        self._timed_out = False
        self._tcp: Deferred[Any] | None = None
        tcp = endpoint.wrapped.connect(_tls_factory(self, factory))
        self._tcp = tcp
        tcp.addCallbacks(self._connected, self._tcp_failed)

    def _connected(self, protocol: TLSMemoryBIOProtocol) -> None:
        self._tcp = None
        if self.result.called:
            return
        self._protocol = protocol
        if self.endpoint.timeout:
            self._timer = self.clock.callLater(self.endpoint.timeout, self._expired)

    def _tcp_failed(self, failure: Failure) -> None:
        self._tcp = None
        if not self.result.called:
            self.result.errback(failure)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        self._timed_out = True
        if self._protocol is not None:
            self._protocol.abortConnection()  # type: ignore[no-untyped-call]

    def _cancel(self, _: Deferred[IProtocol]) -> None:
        self._stop_timer()
        if self._tcp is not None:
            self._tcp.cancel()
        elif self._protocol is not None:
            self._protocol.abortConnection()  # type: ignore[no-untyped-call]

    def handshake_completed(self, protocol: TLSMemoryBIOProtocol, wrapped: IProtocol) -> None:
        self._stop_timer()
        connection: SSL.Connection = protocol.getHandle()  # type: ignore[no-untyped-call]
        self.creator.remember(connection)
        endpoint = self.endpoint
        endpoint._log.debug(
            "upstream.tls_connected",
            server_name=endpoint.name,
            tls_version=connection.get_protocol_version_name(),
            tls_resumed=session_reused(connection),
        )
        if not self.result.called:
            self.result.callback(wrapped)

    def handshake_failed(self, protocol: TLSMemoryBIOProtocol, reason: Failure) -> None:
        self._stop_timer()
        if self.result.called:
            return
        why = self._why(protocol, reason)
        self.result.errback(UpstreamTLSError(f"TLS handshake with {self.endpoint.name}: {why}"))

    def _why(self, protocol: TLSMemoryBIOProtocol, reason: Failure) -> str:
        endpoint = self.endpoint
        if self._timed_out:
            return f"not complete within {endpoint.timeout:g}s"
        value = reason.value
        if isinstance(value, VerificationError):
            return f"the certificate is not valid for the name {endpoint.name!r} ({value})"
        if isinstance(value, SSL.Error):
            text = ssl_error_text(value)
            if "certificate verify failed" in text:
                detail = _verify_result(protocol)
                return f"certificate verify failed: {detail or text} (trusted: {endpoint.trust})"
            return text
        if isinstance(value, CancelledError):
            return "cancelled"
        if isinstance(value, ConnectionClosed):
            return "the server closed the connection during the handshake"
        return reason.getErrorMessage() or type(value).__name__


def _verify_result(protocol: TLSMemoryBIOProtocol) -> str:
    """
    OpenSSL's reason for rejecting the chain, e.g. 'unable to get local issuer certificate';
    empty if the self-check found the binding changed (the caller then says what pyOpenSSL
    said).
    """
    connection = protocol.getHandle()  # type: ignore[no-untyped-call]
    if connection is None or not usable("tls.binding"):
        return ""
    return verify_error(connection)


def verify_error(connection: SSL.Connection) -> str:
    """C{SSL_get_verify_result} as text (pyOpenSSL has no method for it); empty if none."""
    code = _lib.SSL_get_verify_result(connection._ssl)
    if not code:
        return ""
    text: bytes = _ffi.string(_lib.X509_verify_cert_error_string(code))
    return text.decode("ascii", "replace")
