"""
The TLS server transport (tls/transport.py, over tls/calls.py): records in and out of
OpenSSL's memory BIOs, writes of one event leaving in one send, the graceful half-close
(data, close_notify, FIN), what is written before the handshake, refusals that never see a
handshake, plain text sent to a TLS port, producers paused when the client ends the TLS
session, nothing sent after an abort, OpenSSL's answers to post-handshake messages, and the
order data / close_notify / FIN over a real socket with Twisted's own TCP transport.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from typing import Any

import pytest
from OpenSSL import SSL
from pki import PKI
from tlsfakes import HalfCloseTransport, Link, client_context, listener, settings
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.listener.limits import Rejection
from persistproxy.net.accept import ProxyServer
from persistproxy.net.fastwrite import MSG_MORE
from persistproxy.tls.server import ServerTLS
from persistproxy.tls.transport import TLSListenerFactory, TLSServerProtocol

_DONE = Failure(ConnectionError("done"))


class Refuser(Protocol):
    """Answers at once, before any TLS byte arrived, and closes: as a connection refusal does."""

    half_close = True
    lost: Failure | None = None

    def connectionMade(self) -> None:
        self.transport.write(b"HTTP/1.1 503 busy\r\n\r\n")  # type: ignore[union-attr]
        if self.half_close:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.lost = reason


_LOST = Failure(ConnectionError("lost"))


class Later(Protocol):
    """Keeps what it reads; answers only when told (as an upstream response would)."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = _LOST) -> None:
        self.lost = reason


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass



# -- closing ----------------------------------------------------------------------------------


def test_half_close_sends_what_is_pending_then_close_notify_then_fin(
    pki: PKI, clock: Clock
) -> None:
    link = Link(listener(pki, clock), clock, client_context(SSL.TLS1_3_VERSION))
    link.client.send(b"ping")
    link.server.dataReceived(link.client.bio_read(65536))
    # The response is still waiting for the end of the reactor turn when the close comes.
    link.server.write(b"bye")
    link.server.loseWriteConnection()
    assert link.transport.write_closed
    link.client.bio_write(link.transport.value())
    link._read()
    assert link.plain == b"pongbye"
    assert link.closed_by_server


def test_writes_of_one_turn_leave_in_one_send(pki: PKI, clock: Clock) -> None:
    link = Link(listener(pki, clock), clock, client_context(SSL.TLS1_3_VERSION))
    link.transport.clear()
    writes: list[bytes] = []
    original = link.transport.write
    link.transport.write = lambda data: (writes.append(data), original(data))  # type: ignore[method-assign,func-returns-value]
    link.server.write(b"head")
    link.server.write(b"body")
    assert writes == []
    clock.advance(0)
    assert len(writes) == 1
    link.client.bio_write(link.transport.value())
    link._read()
    assert link.plain == b"headbody"


def test_client_eof_without_close_notify_reaches_the_wrapped_protocol(
    pki: PKI, clock: Clock
) -> None:
    link = Link(listener(pki, clock), clock, client_context(SSL.TLS1_2_VERSION))
    link.send(b"ping")
    link.server.readConnectionLost()
    assert link.transport.disconnecting
    link.close()
    assert link.wrapped.lost is not None



def test_a_large_write_arrives_whole(pki: PKI, clock: Clock) -> None:
    """pyOpenSSL enables partial writes: one SSL_write may take a single 16 KiB record."""
    link = Link(listener(pki, clock), clock, client_context(SSL.TLS1_2_VERSION))
    link.transport.clear()
    body = bytes(range(256)) * 1000  # 256,000 bytes, sixteen records
    link.server.write(body)
    clock.advance(0)
    link.client.bio_write(link.transport.value())
    link._read()
    assert link.plain == body


@pytest.mark.parametrize("calls", ["binding", "public"])
def test_both_ways_of_calling_openssl_carry_records_both_ways(
    pki: PKI, clock: Clock, calls: str
) -> None:
    from persistproxy.tls.calls import BindingCalls, PublicCalls

    factory = listener(pki, clock)
    assert isinstance(factory.calls, BindingCalls)
    if calls == "public":
        factory.calls = PublicCalls()
    for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
        link = Link(factory, clock, client_context(version))
        link.client.sendall(b"ping" * 5000)  # several records in one read
        link.pump()
        assert link.wrapped.received == b"ping" * 5000
        link.transport.clear()
        link.plain = b""
        body = bytes(range(256)) * 700  # more than one read of the outgoing buffer
        link.server.write(body)
        clock.advance(0)
        link.client.bio_write(link.transport.value())
        link._read()
        assert link.plain == body
        link.client.shutdown()  # the client's close_notify: answered, then closed
        link.server.dataReceived(link.client.bio_read(65536))
        assert link.transport.disconnecting


@pytest.mark.parametrize(("half_close", "version"), [(True, 0x304), (False, 0x303)])
def test_what_is_written_before_the_handshake_follows_it_then_the_close_asked_for(
    pki: PKI, clock: Clock, half_close: bool, version: int
) -> None:
    """A refusal (503) written at connection time reaches the client after the handshake."""
    factory = TLSListenerFactory(
        ServerTLS(settings(pki.site), "web"), Factory.forProtocol(Refuser), None, None, clock
    )
    Refuser.half_close = half_close
    try:
        link = Link(factory, clock, client_context(version))
    finally:
        Refuser.half_close = True
    assert link.plain == b"HTTP/1.1 503 busy\r\n\r\n"
    assert link.closed_by_server
    assert link.transport.write_closed if half_close else link.transport.disconnecting


def test_a_close_before_any_byte_is_just_a_close(pki: PKI, clock: Clock) -> None:
    server = listener(pki, clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = HalfCloseTransport()
    server.makeConnection(transport)
    server.loseConnection()
    assert transport.disconnecting and transport.value() == b""


def test_a_bad_client_hello_is_answered_with_an_alert_and_a_close(
    pki: PKI, clock: Clock
) -> None:
    server = listener(pki, clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = HalfCloseTransport()
    server.makeConnection(transport)
    server.dataReceived(b"\x16\x03\x01\x00\x05hello")  # a handshake record, nonsense inside
    assert transport.disconnecting
    assert transport.value()[:1] == b"\x15", "a TLS alert record"
    server.connectionLost(Failure(ConnectionError("closed")))
    assert server.wrappedProtocol.lost is not None
    assert isinstance(server.wrappedProtocol.lost.value, SSL.Error)



def test_plain_text_to_the_tls_port_gets_the_wrapped_factorys_plain_answer(
    pki: PKI, clock: Clock
) -> None:
    answer = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"
    factory = listener(pki, clock)
    factory.plaintext_answer = answer
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = HalfCloseTransport()
    server.makeConnection(transport)
    server.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value() == answer and transport.disconnecting
    server.connectionLost(Failure(ConnectionError("closed")))
    assert isinstance(server.wrappedProtocol.lost.value, SSL.Error)
    assert server.wrappedProtocol.received == b"", "the request never reaches the protocol"

    # A factory without an answer (a protocol that is not HTTP): closed, as for nonsense
    # (OpenSSL recognises an HTTP request and sends no alert).
    bare = listener(pki, clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    bare_transport = HalfCloseTransport()
    bare.makeConnection(bare_transport)
    bare.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert bare_transport.value() == b"" and bare_transport.disconnecting

    # Only the first byte counts: a ClientHello split anywhere still completes.
    link = Link(factory, clock, client_context(SSL.TLS1_3_VERSION))
    link.send(b"ping")
    assert link.plain == b"pong"


# -- a TLS connection over a real (AF_UNIX) socket pair and Twisted's TCP transport ----------


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback, TCP_NODELAY as the listener gives it."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        peer = socket.create_connection(listening.getsockname())
        ours, _ = listening.accept()
    ours.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ours, peer


class _RecordingSocket:
    """A real socket whose sends are recorded with their flags (write_directly uses .send)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends: list[tuple[bytes, int]] = []

    def send(self, data: bytes, flags: int = 0) -> int:
        self.sends.append((bytes(data), flags))
        return self._sock.send(data, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SocketLink:
    """
    The server side is a real L{ProxyServer} (tcp.Connection) over one end of a socket pair,
    driven by a L{MemoryReactorClock}; the client is pyOpenSSL in memory, reading the other end.

    @ivar sent: every C{send} the server made on its socket, with its flags.
    """

    def __init__(self, pki: PKI, wrapped: type[Protocol] = Later, tcp: bool = False) -> None:
        self.reactor = MemoryReactorClock()
        tls = ServerTLS(settings(pki.site), "web")
        self.factory = TLSListenerFactory(
            tls, Factory.forProtocol(wrapped), None, None, self.reactor
        )
        ours, self.peer = _tcp_pair() if tcp else socket.socketpair()
        self.peer.setblocking(False)
        self.server: TLSServerProtocol = self.factory.buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 40000)
        )
        self.tcp = ProxyServer(ours, self.server, ("127.0.0.1", 40000), None, 0, self.reactor)
        self.sent = _RecordingSocket(ours)
        self.tcp.socket = self.sent  # type: ignore[assignment]
        self.server.makeConnection(self.tcp)
        self.wrapped: Any = self.server.wrappedProtocol
        self.client = SSL.Connection(client_context(SSL.TLS1_3_VERSION), None)
        self.client.set_connect_state()
        self.client.set_tlsext_host_name(b"site.test")
        self.plain = b""
        for _ in range(10):
            with contextlib.suppress(SSL.WantReadError):
                self.client.do_handshake()
            self.to_server()
            self.reactor.advance(0)
            self.from_server()
        assert self.server._handshake_done

    def do_write(self) -> None:
        """What the reactor does when the socket is writable (and the TCP transport wants it)."""
        tcp = self.tcp
        if tcp.connected and tcp in self.reactor.writers:
            why = tcp.doWrite()
            if why:
                self.reactor.removeWriter(tcp)
                self.reactor.removeReader(tcp)
                tcp.connectionLost(Failure(why))

    def to_server(self) -> None:
        try:
            data = self.client.bio_read(65536)
        except SSL.WantReadError:
            return
        self.server.dataReceived(data)

    def from_server(self) -> bytes:
        got = b""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
        if got:
            self.client.bio_write(got)
            while True:
                try:
                    self.plain += self.client.recv(65536)
                except (SSL.WantReadError, SSL.ZeroReturnError, SSL.Error):
                    break
        return got

    def read_until(self, done: Any, timeout: float = 5.0) -> None:
        """
        Read what the server sent, waiting for the socket to be readable, until C{done()};
        fails after C{timeout} seconds (loopback delivery takes microseconds).
        """
        deadline = time.monotonic() + timeout
        self.from_server()
        while not done():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"not there within {timeout}s; read so far: {self.plain!r}"
            select.select([self.peer], [], [], remaining)
            self.from_server()


# -- a refused (503) TLS client that never finishes its handshake is closed ---------------


def test_a_refused_client_that_never_finishes_the_handshake_is_closed(pki: PKI) -> None:
    """
    Rejection writes its 503 and half-closes at once; over TLS both wait for the handshake.
    Its linger timer then calls loseConnection, which also waits for the handshake: a client
    that sends nothing (or half a ClientHello) holds the descriptor forever, and rejected
    connections count against no limit.
    """
    clock = Clock()
    factory = TLSListenerFactory(
        ServerTLS(settings(pki.site), "web"),
        Factory.forProtocol(lambda: Rejection(clock, b"HTTP/1.1 503 busy\r\n\r\n")),
        None,
        None,
        clock,
    )
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = HalfCloseTransport()
    server.makeConnection(transport)
    clock.advance(3600)
    assert transport.disconnecting, "the refused connection is still open an hour later"


# -- the client's close_notify after its request: a half-close, still answered -----------


@implementer(IHalfCloseableProtocol)
class HalfCloseable(Later):
    """Answers what it received once the client is done sending, then closes (as HTTP does)."""

    def readConnectionLost(self) -> None:
        self.transport.write(b"answer to " + self.received)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


def test_a_request_followed_by_close_notify_still_gets_its_response(pki: PKI) -> None:
    """
    TLS 1.3 (RFC 8446 6.1) lets a client close its write side with close_notify and still
    read. A half-closeable protocol hears it as readConnectionLost, as over plain TCP, and
    its answer goes out before our close_notify; a protocol that cannot half-close is closed.
    """
    clock = Clock()
    factory = TLSListenerFactory(
        ServerTLS(settings(pki.site), "web"), Factory.forProtocol(HalfCloseable), None, None, clock
    )
    link = Link(factory, clock, client_context(SSL.TLS1_3_VERSION))
    link.client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    link.client.shutdown()
    link.server.dataReceived(link.client.bio_read(65536))
    clock.advance(0)
    link.client.bio_write(link.transport.value())
    link._read()
    assert link.plain.startswith(b"answer to GET /"), link.plain
    assert link.closed_by_server and link.transport.disconnecting

    plain = TLSListenerFactory(
        ServerTLS(settings(pki.site), "web"), Factory.forProtocol(Later), None, None, clock
    )
    link = Link(plain, clock, client_context(SSL.TLS1_3_VERSION))
    link.client.shutdown()
    link.server.dataReceived(link.client.bio_read(65536))
    assert link.transport.disconnecting


# -- a paused producer when the TLS side closes: the TCP connection still closes ---------


def test_close_notify_while_a_paused_producer_is_registered_closes_the_connection(
    pki: PKI,
) -> None:
    """
    A slow reader pauses the response's producer (the exchange). The client then sends
    close_notify: the transport answers and asks TCP to close. When TCP's buffer drains,
    Twisted resumes the paused producer instead of closing; everything it then writes is
    dropped by the TLS layer (_notified), so TCP never writes again and never closes. The
    wrapped protocol is not told either: a streaming upstream keeps it open forever.
    """
    link = SocketLink(pki)
    producer = Producer()
    link.server.registerProducer(producer, True)
    link.server.write(b"x" * 2_000_000)
    link.reactor.advance(0)  # flushed: partly sent, the rest in TCP's buffer
    assert producer.paused == 1
    link.client.shutdown()
    link.to_server()  # the client's close_notify
    for _ in range(200):  # the client reads everything
        link.from_server()
        link.do_write()
        link.reactor.advance(0)
    for _ in range(5):  # the producer goes on producing (an SSE stream, say)
        link.server.write(b"y" * 1000)
        link.reactor.advance(0)
        link.from_server()
    assert not link.tcp.connected or link.wrapped.lost is not None, (
        "neither reading nor writing, never closed, and the wrapped protocol not told"
    )


def test_tls_error_while_a_paused_producer_is_registered_closes_the_connection(
    pki: PKI,
) -> None:
    """The same through _fail: garbage from the client after the handshake."""
    link = SocketLink(pki)
    producer = Producer()
    link.server.registerProducer(producer, True)
    link.server.write(b"x" * 2_000_000)
    link.reactor.advance(0)
    assert producer.paused == 1
    link.server.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # a bad record
    assert link.server.disconnecting
    for _ in range(200):
        link.from_server()
        link.do_write()
        link.reactor.advance(0)
    assert not link.tcp.connected, "stuck open with a resumed producer whose writes vanish"


# -- abortConnection discards the records waiting for the end of the event ---------------


def test_nothing_is_sent_after_abort_connection(pki: PKI) -> None:
    """
    A write waits for the end of the event; abortConnection before then leaves _dirty set,
    so the scheduled flush still sends it, straight to the socket (write_directly does not
    know the TCP transport is aborting: abortConnection sets neither disconnecting nor
    disconnected).
    """
    link = SocketLink(pki)
    link.from_server()
    link.server.write(b"partial response")
    link.server.abortConnection()
    link.reactor.advance(0)
    assert link.from_server() == b"", "records were sent after abortConnection"


# -- records OpenSSL writes while reading leave without waiting for the next write -------


def test_what_openssl_answers_to_a_post_handshake_message_is_sent(pki: PKI) -> None:
    """
    After the handshake, reading never marks the outgoing BIO dirty. A TLS 1.2 client that
    asks to renegotiate gets OpenSSL's answer (a no_renegotiation alert) only with the next
    response; Twisted's TLS transport flushes after every read.
    """
    clock = Clock()
    factory = TLSListenerFactory(
        ServerTLS(settings(pki.site), "web"), Factory.forProtocol(Later), None, None, clock
    )
    link = Link(factory, clock, client_context(SSL.TLS1_2_VERSION))
    link.transport.clear()
    assert link.client.renegotiate()
    with contextlib.suppress(SSL.WantReadError):
        link.client.do_handshake()
    link.server.dataReceived(link.client.bio_read(65536))
    clock.advance(0)
    assert link.server._tls is not None
    assert link.transport.value() != b"", "OpenSSL's answer waits in the BIO"


# -- data, close_notify and FIN over a real socket ------------------------------------------


@implementer(IHalfCloseableProtocol)
class HalfCloseSeen(Later):
    write_lost = False

    def writeConnectionLost(self) -> None:
        self.write_lost = True


def test_half_close_over_a_real_socket_sends_data_then_close_notify_then_fin(pki: PKI) -> None:
    link = SocketLink(pki, HalfCloseSeen)
    link.from_server()
    link.server.write(b"head")
    link.server.write(b"body")
    link.server.loseWriteConnection()
    assert link.wrapped.write_lost  # FIN out at once: the wrapped protocol may linger
    link.from_server()
    assert link.plain == b"headbody"
    assert link.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN
    assert link.peer.recv(10) == b""  # the FIN
    link.server.write(b"late")  # nothing after close_notify
    link.reactor.advance(0)
    assert link.tcp.connected and link.tcp._tempDataLen == 0 and not link.tcp.dataBuffer


def test_with_a_producer_registered_the_last_records_are_not_held_for_a_fin(pki: PKI) -> None:
    """
    The last records go with MSG_MORE only when the FIN follows at once; with a producer
    registered Twisted sends the FIN later, so the records must leave uncorked now.
    """
    link = SocketLink(pki, HalfCloseSeen, tcp=True)  # MSG_MORE corks on TCP only
    link.from_server()
    link.server.registerProducer(Producer(), True)
    link.sent.sends.clear()
    link.server.write(b"last words")
    link.server.loseWriteConnection()
    assert not link.wrapped.write_lost  # the FIN waits for the producer
    # Sent with MSG_MORE, the segment would wait in the kernel (~200 ms) for more data.
    assert link.sent.sends and link.sent.sends[-1][1] == 0, link.sent.sends
    link.read_until(lambda: bool(link.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN))
    assert link.plain == b"last words"
    assert link.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN


def test_data_and_fin_leave_together_over_tcp(pki: PKI) -> None:
    link = SocketLink(pki, HalfCloseSeen, tcp=True)
    link.from_server()
    link.sent.sends.clear()
    link.server.write(b"bye")
    link.server.loseWriteConnection()
    assert link.wrapped.write_lost
    # The last records go with MSG_MORE: the kernel sends them and the FIN in one segment.
    assert [flags for _, flags in link.sent.sends] == [MSG_MORE], link.sent.sends
    link.read_until(lambda: bool(link.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN))
    assert link.plain == b"bye" and link.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN
    link.peer.settimeout(5)
    assert link.peer.recv(10) == b""
