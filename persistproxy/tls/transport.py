# -*- test-case-name: tests.unit.test_tls_transport -*-
"""
The TLS hop of a client connection: a protocol for the TCP transport that is itself the
transport of the wrapped (HTTP) protocol.

Twisted's C{TLSMemoryBIOProtocol} is general: it serves clients and servers, renegotiation,
producers behind a membrane, and it moves bytes between OpenSSL's memory BIOs after every
call. A TLS listener whose clients mostly connect, resume a session, send one request and
leave pays that generality on every connection: profiled under C{openssl s_time -reuse}, the
wrapper cost more Python time than the rest of the proxy. This one does what a server needs
and no more:

 - Records the wrapped protocol writes while one I/O event is handled (a response head, its
   body, a close_notify) leave in one C{send}, at the end of that event (see
   L{persistproxy.net.reactor.ProxyReactor.call_after_event}); what it writes while we are
   delivering a request leaves when the delivery ends, with the handshake's last flight.
 - Sending is direct to the socket when nothing is queued before it (L{persistproxy.net.fastwrite}).
 - Producers are the TCP transport's business: encryption is synchronous, so the TCP buffer
   is the only place bytes wait and its flow control is the right one.
 - A half-close (C{loseWriteConnection}) sends the close_notify and then the FIN, which a
   graceful HTTP close needs and Twisted's TLS transport does not have. The other way round,
   the client's close_notify or FIN reaches a half-closeable protocol as C{readConnectionLost},
   as over plain TCP, so the responses it owes are still sent.
 - Each completed handshake is reported to the factory (metrics, and C{log_extra} of the
   wrapped protocol for its access lines).
 - TLS 1.3 session tickets, which OpenSSL writes when the client's Finished arrives, leave
   with the next thing sent: when the client next sends something (its request, its
   close_notify) or we write, not alone. A client reads them only when it reads after the
   handshake, which an HTTP client does for its response, so nothing is lost; what changes
   is that a client which completes the handshake and leaves at once without reading
   (C{openssl s_client < /dev/null}) never gets them, as from nginx, instead of sometimes, by
   a race between our send and its close.
   C{testssl} decides from such a connection whether to test resumption with TLS 1.3 or
   TLS 1.2, and then fails its own TLS 1.3 test by the same race (its client closes right
   after the handshake, before a ticket can be read); with the tickets held, it always tests
   TLS 1.2, as it does against nginx.

Renegotiation is off in the contexts (C{OP_NO_RENEGOTIATION}), so application data never
has to wait for a handshake after the first.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.interfaces import TLSAware
from persistproxy.logs import EventLog
from persistproxy.metrics import ListenerStats
from persistproxy.net.after_event import after_event_caller
from persistproxy.net.fastwrite import (
    MSG_MORE,
    backlogged,
    can_write_directly,
    fin_can_follow,
    lose_write_directly,
    write_directly,
)
from persistproxy.tls.calls import make_calls
from persistproxy.tls.facts import alpn_selected, connection_facts, version_name
from persistproxy.tls.server import ServerTLS, session_reused, ssl_error_text

__all__ = ["TLSListenerFactory", "TLSServerProtocol"]

# How the client said it is done sending (TLSServerProtocol._peer_done bits).
_PEER_CLOSE_NOTIFY = 1
_PEER_FIN = 2

# What to do once the writes made before the handshake completed are out.
_THEN_NOTHING = 0
_THEN_HALF_CLOSE = 1
_THEN_CLOSE = 2


# -- the transport ----------------------------------------------------------------------------


@implementer(IProtocol, IHalfCloseableProtocol, ITransport, ISSLTransport, IConsumer, IPushProducer)
class TLSServerProtocol:
    """
    The server side of one TLS connection (see the module docstring).

    @ivar wrappedProtocol: the protocol the decrypted stream is for.
    """

    # Many of these are open at once, most of them idle: no instance dict.
    __slots__ = (
        "__weakref__",
        "_aborted",
        "_after_handshake",
        "_delivering",
        "_direct",
        "_dirty",
        "_fresh",
        "_handshake_done",
        "_notified",
        "_peer_done",
        "_pending",
        "_producer",
        "_reason",
        "_scheduled",
        "_tls",
        "connected",
        "disconnecting",
        "factory",
        "transport",
        "wrappedProtocol",
    )

    def __init__(self, factory: TLSListenerFactory, wrapped: Any) -> None:
        self.factory = factory
        self.wrappedProtocol = wrapped
        self.transport: Any = None
        self.connected = False
        self.disconnecting = False
        self._tls: SSL.Connection | None = None
        self._direct = False
        self._handshake_done = False
        #: No byte has arrived yet.
        self._fresh = True
        #: Inside dataReceived: what is written leaves when the delivery ends.
        self._delivering = False
        #: OpenSSL's outgoing BIO may hold records not sent yet.
        self._dirty = False
        #: A send at the end of the current event is arranged.
        self._scheduled = False
        #: Our close_notify is written (or TLS is finished): nothing more may be written.
        self._notified = False
        self._aborted = False
        #: Writes made before the handshake completed, and what to do once they are out.
        self._pending: list[bytes] | None = None
        self._after_handshake = _THEN_NOTHING
        self._producer: Any = None
        #: The client said it sends nothing more: a close_notify or a FIN, 1 and 2 (bits).
        self._peer_done = 0
        #: A TLS failure, given to the wrapped protocol instead of the TCP reason.
        self._reason: Failure | None = None

    def __getattr__(self, name: str) -> Any:
        # Anything else a transport offers (setTcpNoDelay, getTcpKeepAlive, ...) is the TCP
        # transport's. Only reached for names this class does not define.
        if name.startswith("__"):
            raise AttributeError(name)
        transport = object.__getattribute__(self, "transport")
        if transport is None:
            raise AttributeError(name)
        return getattr(transport, name)

    def logPrefix(self) -> str:
        return "TLS"

    # -- IProtocol, towards the TCP transport -------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.connected = True
        self._direct = can_write_directly(transport)
        self._tls = self.factory.tls.new_connection()
        # No handshake step yet: a server has nothing to say before the ClientHello.
        self.wrappedProtocol.makeConnection(self)

    def connectionMade(self) -> None:
        """Part of IProtocol; makeConnection does the work."""

    def dataReceived(self, data: bytes) -> None:
        tls = self._tls
        if tls is None:
            return
        if self._fresh:
            self._fresh = False
            # A TLS client's first byte is 22 (a handshake record); a letter is a plain-text
            # protocol's request (GET ...) sent to the TLS port by mistake.
            answer = self.factory.plaintext_answer
            if answer is not None and 65 <= data[0] <= 90:
                self.factory.plaintext_received(self, data)
                self._answer_plaintext(answer)
                return
        calls = self.factory.calls
        calls.feed(tls, data)
        hold_tickets = False
        self._delivering = True
        try:
            if not self._handshake_done:
                self._dirty = True  # the handshake's next flight, or an alert
                try:
                    tls.do_handshake()
                except SSL.WantReadError:
                    return
                except SSL.Error:
                    self._fail(Failure())
                    return
                self._handshake_done = True
                self.factory.handshake_completed(self)
                if self._pending is not None:
                    self._write_pending()
                    if self._notified:
                        return
                else:
                    # What OpenSSL writes on a TLS 1.3 client's Finished is its session
                    # tickets (and, if the Finished came with a KeyUpdate, the answer, which
                    # need only precede our next data): held for the next send (module
                    # docstring). A TLS 1.2 server's last flight (its Finished) must go now:
                    # the client waits for it.
                    hold_tickets = tls.get_protocol_version() == SSL.TLS1_3_VERSION
            wrapped = self.wrappedProtocol
            # Reading may make OpenSSL answer (a no_renegotiation alert, a TLS 1.3 KeyUpdate).
            self._dirty = True
            while not self._aborted:
                try:
                    plain = calls.read(tls)
                    if plain is None:
                        if hold_tickets:
                            self._dirty = False
                        break
                except SSL.ZeroReturnError:
                    self._peer_finished(_PEER_CLOSE_NOTIFY)
                    break
                except SSL.Error:
                    self._fail(Failure())
                    break
                hold_tickets = False
                wrapped.dataReceived(plain)
                if self._tls is None:
                    return
        finally:
            self._delivering = False
            if self._dirty:
                self._flush()

    def readConnectionLost(self) -> None:
        # The client's FIN (any close_notify before it has been read already).
        if self._dirty:
            self._flush()
        self._peer_finished(_PEER_FIN)

    def writeConnectionLost(self) -> None:
        # Our FIN is out: the wrapped protocol may now start lingering.
        wrapped = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if wrapped is not None:
            wrapped.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.connected and self._tls is None:
            return
        self.connected = False
        tls = self._tls
        if tls is not None and self._handshake_done and self._reason is None:
            # Most clients close without a close_notify; OpenSSL would then drop the session
            # from the cache when the connection is freed, as if it were broken.
            tls.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        self._notified = True
        self._dirty = False
        self._tls = None  # also breaks the cycle through OpenSSL's callbacks
        self._pending = None
        wrapped = self.wrappedProtocol
        failure, self._reason = self._reason, None
        wrapped.connectionLost(failure or reason)

    # -- ITransport, towards the wrapped protocol ---------------------------------------------

    def write(self, data: bytes) -> None:
        if self._notified or (self.disconnecting and self._producer is None):
            return
        if not self._handshake_done:
            if self._pending is None:
                self._pending = [data]
            else:
                self._pending.append(data)
            return
        self._encrypt(data)

    def _encrypt(self, data: bytes) -> None:
        tls = self._tls
        if tls is None:
            return
        try:
            self.factory.calls.encrypt(tls, data)
        except SSL.Error:
            self._fail(Failure())
            return
        self._dirty = True
        if not self._delivering and not self._scheduled:
            self._scheduled = True
            self.factory.after_event(self._send_scheduled)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """
        Half-close: what is written, then our close_notify, then our FIN; reading goes on
        until the client closes (the wrapped protocol gets C{writeConnectionLost}).
        """
        if self.disconnecting or not self.connected or self._notified:
            return
        if not self._handshake_done:
            if self._pending:
                # An answer written before the handshake (a refusal): out after it.
                self._after_handshake = _THEN_HALF_CLOSE
            else:
                self.loseConnection()
            return
        self._close_notify(fin_follows=self._direct and fin_can_follow(self.transport))
        if self._direct:
            lose_write_directly(self.transport)
        else:
            self.transport.loseWriteConnection()

    def loseConnection(self) -> None:
        if self.disconnecting or not self.connected:
            return
        self.disconnecting = True
        if (
            not self._handshake_done
            and self._pending
            and not self._notified
            and self._after_handshake == _THEN_NOTHING
        ):
            self._after_handshake = _THEN_CLOSE
            return
        # (A close asked for again while an answer still waits for the handshake: the
        # client had its chance, the connection goes now.)
        if self._producer is not None:
            return  # unregisterProducer finishes the close
        self._close_tcp()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._aborted = True
        self._notified = True
        self._dirty = False  # nothing more leaves, not even what is encrypted already
        self.transport.abortConnection()

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def getPeerCertificate(self) -> Any:
        """ISSLTransport: the client's certificate (listeners do not ask for one: None)."""
        tls = self._tls
        return tls.get_peer_certificate() if tls is not None else None

    @property
    def negotiatedProtocol(self) -> bytes | None:
        """
        The ALPN protocol the handshake chose (C{b"h2"}, C{b"http/1.1"}), or L{None}: what a
        protocol that speaks several decides on, once the first bytes arrive.
        """
        tls = self._tls
        if tls is None or not self._handshake_done:
            return None
        name = tls.get_app_data()
        return name if isinstance(name, bytes) else None

    def getHandle(self) -> SSL.Connection | None:
        """The OpenSSL connection (what L{tls_info} and pyOpenSSL callers expect)."""
        return self._tls

    def backlogged(self) -> bool:
        """Whether the TCP transport under us has bytes queued (see fastwrite.backlogged)."""
        return backlogged(self.transport, self._direct)

    # -- producers: the TCP transport's -------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._producer is None:
            return
        self._producer = None
        self.transport.unregisterProducer()
        if self.disconnecting and self.connected and not self._aborted:
            self._close_tcp()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    # -- internals ----------------------------------------------------------------------------

    def _send_scheduled(self) -> None:
        self._scheduled = False
        if self._dirty:
            self._flush()

    def _flush(self, flags: int = 0) -> None:
        """Send what OpenSSL wrote into its outgoing memory BIO, in one C{send}."""
        self._dirty = False
        tls = self._tls
        if tls is None:
            return
        data = self.factory.calls.take(tls)
        if not data:
            return
        if self._direct:
            write_directly(self.transport, data, flags)
        else:
            self.transport.write(data)

    def _write_pending(self) -> None:
        pending, self._pending = self._pending or [], None
        for data in pending:
            self._encrypt(data)
        then, self._after_handshake = self._after_handshake, _THEN_NOTHING
        if then == _THEN_HALF_CLOSE:
            self.loseWriteConnection()
        elif then == _THEN_CLOSE:
            self._close_tcp()

    def _close_notify(self, fin_follows: bool = False) -> None:
        """
        Our close_notify, after everything written before it, out now.

        @param fin_follows: the caller sends the FIN right after: the last records and the
            FIN can then leave in one segment (one wakeup of the client instead of two).
        """
        tls = self._tls
        if self._notified or tls is None:
            return
        self._notified = True
        with contextlib.suppress(SSL.Error):
            tls.shutdown()
        self._flush(MSG_MORE if fin_follows else 0)

    def _close_tcp(self) -> None:
        self.disconnecting = True
        if self._handshake_done:
            self._close_notify()
        else:
            self._notified = True
        self.transport.loseConnection()

    def _peer_finished(self, how: int) -> None:
        """
        The client will send nothing more. An HTTP protocol still answers what it already
        received (as over plain TCP; TLS 1.3 allows this half-close, and a client may send its
        close_notify right after its last request), then closes; anything else closes now.
        """
        if self._peer_done & how:
            return
        self._peer_done |= how
        wrapped = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if wrapped is not None and self._handshake_done and not self.disconnecting:
            wrapped.readConnectionLost()
            return
        self._drop_producer()
        self.disconnecting = True
        self._close_notify()
        self.transport.loseConnection()

    def _drop_producer(self) -> None:
        """
        Closing whatever the producer says: a paused producer would otherwise be resumed by
        the TCP transport instead of the connection being closed, and its writes go nowhere.
        """
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()

    def _answer_plaintext(self, answer: bytes) -> None:
        """Plain text to a TLS port: the wrapped protocol's answer in plain text, then close
        (as nginx's "400 The plain HTTP request was sent to HTTPS port")."""
        self.transport.write(answer)
        self._fail(Failure(SSL.Error([("", "", "plain text (not TLS) from the client")])))

    def _fail(self, failure: Failure) -> None:
        """A TLS error: send OpenSSL's alert, then close; the wrapped protocol hears why."""
        if self._reason is None:
            self._reason = failure
        if not self._handshake_done:
            self.factory.handshake_failed(self, failure)
        self._notified = True
        self.disconnecting = True
        self._flush()
        self._drop_producer()
        self.transport.loseConnection()


@implementer(IProtocolFactory)
class TLSListenerFactory:
    """
    Wraps a listener's protocol factory in TLS made by a L{ServerTLS}.
    """

    noisy = False

    def __init__(
        self,
        tls: ServerTLS,
        wrapped: IProtocolFactory,
        stats: ListenerStats | None,
        log: EventLog | None,
        clock: Any,
        log_facts: bool = True,
        plaintext_answer: bytes = b"",
    ) -> None:
        """
        @param log_facts: whether the wrapped protocols write access lines, which then carry
            the facts of the handshake (L{connection_facts}); only gathered if so.
        @param plaintext_answer: what the protocol answers a client that speaks plain text
            to the TLS port (HTTP: a 400); empty: just close.
        """
        self.tls = tls
        self._log_facts = log_facts
        #: OpenSSL's per-record calls (see tls_calls.py).
        self.calls = make_calls()
        self.wrappedFactory = wrapped
        self.plaintext_answer = plaintext_answer
        self._stats = stats
        self._log = log
        #: The status of the plain-text answer, if it is an HTTP response (for its count).
        self._plaintext_status = _http_status(plaintext_answer)
        #: Runs a function once the current I/O event is handled.
        self.after_event = after_event_caller(clock)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = getattr(wrapped, "logPrefix", None)
        return f"{prefix() if prefix else type(wrapped).__name__} (TLS)"

    def buildProtocol(self, addr: Any) -> TLSServerProtocol | None:
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return TLSServerProtocol(self, wrapped)

    def handshake_completed(self, protocol: TLSServerProtocol) -> None:
        connection = protocol.getHandle()
        if connection is None:  # pragma: no cover - only ever called with one
            return
        stats = self._stats
        if stats is not None:
            resumed = session_reused(connection)
            stats.tls_handshakes += 1
            if resumed:
                stats.tls_resumed += 1
            key = (version_name(connection), alpn_selected(connection) or "", resumed)
            stats.tls_kinds[key] = stats.tls_kinds.get(key, 0) + 1
        if self._log_facts:
            wrapped = protocol.wrappedProtocol
            if isinstance(wrapped, TLSAware):
                wrapped.tls_established(connection_facts(connection))

    def plaintext_received(self, protocol: TLSServerProtocol, data: bytes) -> None:
        """
        A client spoke plain text (HTTP, by its first letter) to the TLS port: it is counted
        (C{tls_plaintext}, a bad request, and the answer's status class) and logged with
        what its first line says, as a refused request is.
        """
        stats = self._stats
        if stats is not None:
            stats.tls_plaintext += 1
            stats.bad_requests += 1
            if self._plaintext_status:
                stats.count_response(self._plaintext_status)
        if self._log is not None:
            peer = protocol.getPeer()
            line = _PLAIN_REQUEST_LINE.match(data)
            self._log.warning(
                "tls.plaintext",
                listener=self.tls.listener,
                client=getattr(peer, "host", str(peer)),
                status=self._plaintext_status,
                method=line.group(1).decode("ascii") if line else None,
                # The path without its query string, which may carry credentials.
                path=line.group(2).partition(b"?")[0].decode("latin-1") if line else None,
                reason="plain text sent to a TLS port",
            )

    def handshake_failed(self, protocol: TLSServerProtocol, reason: Failure) -> None:
        if self._log is not None:
            peer = protocol.getPeer()
            self._log.debug(
                "tls.handshake_failed",
                listener=self.tls.listener,
                client=getattr(peer, "host", str(peer)),
                reason=_reason_text(reason),
            )


#: The method and target of a plain-text HTTP request line, bounded.
_PLAIN_REQUEST_LINE = re.compile(rb"([A-Z][A-Z0-9_-]{0,31}) ([!-~]{1,2048})")


def _http_status(answer: bytes | None) -> int | None:
    """The status code of C{answer} if it is an HTTP/1.x status line, else None."""
    if answer and answer.startswith(b"HTTP/1.") and answer[9:12].isdigit():
        return int(answer[9:12])
    return None


def _reason_text(reason: Any) -> str:
    value = getattr(reason, "value", reason)
    if isinstance(value, SSL.Error):
        return ssl_error_text(value)
    if isinstance(value, Exception):
        return str(value).splitlines()[0] if str(value) else type(value).__name__
    return str(value)
