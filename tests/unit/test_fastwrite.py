"""
Sending straight to the socket when nothing is queued before it (net/fastwrite.py), over a
real loopback TCP connection with Twisted's own TCP transport and no reactor running: what
is not sent at once could only leave through the reactor, so whatever the peer reads was
sent directly.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.net.accept import ProxyServer
from persistproxy.net.fastwrite import (
    MSG_MORE,
    backlogged,
    can_write_directly,
    fin_can_follow,
    lose_write_directly,
    write_directly,
)


class Sock:
    """The transport's socket, recording each send; C{accept} limits what one send takes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends: list[tuple[bytes, int]] = []
        self.accept: int | None = None
        self.error: OSError | None = None

    def send(self, data: bytes, flags: int = 0) -> int:
        self.sends.append((bytes(data), flags))
        if self.error is not None:
            raise self.error
        if self.accept is not None:
            data = data[: self.accept]
        return self._sock.send(data, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Pair:
    def __init__(self) -> None:
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen()
            self.peer = socket.create_connection(listening.getsockname())
            ours, _ = listening.accept()
        self.peer.settimeout(5)
        self.reactor = MemoryReactorClock()
        self.protocol = Protocol()
        self.transport = ProxyServer(ours, self.protocol, ("127.0.0.1", 1), None, 0, self.reactor)
        self.sock = Sock(ours)
        self.transport.socket = self.sock  # type: ignore[assignment]
        self.protocol.makeConnection(self.transport)

    def read(self, n: int) -> bytes:
        """Exactly n bytes from the peer (fails after 5 s: what did not arrive was not sent)."""
        data = b""
        while len(data) < n:
            chunk = self.peer.recv(n - len(data))
            assert chunk, f"EOF after {data!r}"
            data += chunk
        return data

    def reactor_writes(self) -> None:
        """What the reactor does once the socket is writable."""
        assert self.transport in self.reactor.writers
        assert not self.transport.doWrite()

    def close(self) -> None:
        self.transport.connectionLost(Failure(ConnectionError("test over")))
        self.peer.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def test_only_a_plain_tcp_transport_is_written_to_directly(pair: Pair) -> None:
    assert can_write_directly(pair.transport)
    assert not can_write_directly(StringTransport())
    assert not can_write_directly(object())


def test_with_nothing_queued_the_data_is_sent_at_once(pair: Pair) -> None:
    write_directly(pair.transport, b"hello")
    assert pair.sock.sends == [(b"hello", 0)]
    assert pair.read(5) == b"hello"
    assert not backlogged(pair.transport, True)
    assert pair.transport not in pair.reactor.writers, "no epoll registration for it"


def test_behind_queued_bytes_the_data_waits_its_turn(pair: Pair) -> None:
    pair.transport.write(b"first ")  # Twisted's buffer: sent when the reactor says
    assert backlogged(pair.transport, True)
    write_directly(pair.transport, b"second")
    assert pair.sock.sends == [], "nothing jumps the queue"
    pair.reactor_writes()
    assert pair.read(12) == b"first second"


def test_what_one_send_does_not_take_goes_through_twisteds_buffer(pair: Pair) -> None:
    pair.sock.accept = 3
    write_directly(pair.transport, b"abcdefgh")
    assert pair.read(3) == b"abc"
    assert backlogged(pair.transport, True)
    pair.sock.accept = None
    write_directly(pair.transport, b"ij")  # behind the rest: queued too
    pair.reactor_writes()
    assert pair.read(7) == b"defghij"


@pytest.mark.parametrize(
    "error", [BlockingIOError(), InterruptedError(), ConnectionResetError("reset")]
)
def test_a_send_that_fails_leaves_the_data_to_twisted(pair: Pair, error: OSError) -> None:
    pair.sock.error = error
    write_directly(pair.transport, b"data")
    assert backlogged(pair.transport, True), "queued, for Twisted to send or to report"
    pair.sock.error = None
    pair.reactor_writes()
    assert pair.read(4) == b"data"


def test_flags_are_passed_to_the_send(pair: Pair) -> None:
    write_directly(pair.transport, b"last", MSG_MORE)
    assert pair.sock.sends == [(b"last", MSG_MORE)]


def test_a_transport_we_do_not_see_into_counts_as_backlogged() -> None:
    assert backlogged(StringTransport(), False)

    class Tls:
        def __init__(self, answer: bool) -> None:
            self.answer = answer

        def backlogged(self) -> bool:
            return self.answer

    assert backlogged(Tls(True), False) and not backlogged(Tls(False), False)


@implementer(IPushProducer)
class _Producer:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def test_the_fin_follows_at_once_when_nothing_is_queued(pair: Pair) -> None:
    assert fin_can_follow(pair.transport)
    write_directly(pair.transport, b"bye", MSG_MORE)
    lose_write_directly(pair.transport)
    assert pair.read(3) == b"bye"
    assert pair.peer.recv(10) == b"", "the FIN, without a reactor turn"
    assert pair.transport._writeDisconnected


def test_behind_queued_bytes_the_fin_waits_for_them(pair: Pair) -> None:
    pair.transport.write(b"queued")
    lose_write_directly(pair.transport)
    assert pair.transport._writeDisconnecting and not pair.transport._writeDisconnected
    pair.reactor_writes()
    assert pair.read(6) == b"queued"
    assert pair.peer.recv(10) == b""


def test_with_a_producer_registered_the_fin_is_twisteds_to_send(pair: Pair) -> None:
    pair.transport.registerProducer(_Producer(), True)
    assert not fin_can_follow(pair.transport)
    lose_write_directly(pair.transport)
    assert not pair.transport._writeDisconnected, "sent once the producer is unregistered"
    pair.transport.unregisterProducer()


def test_nothing_is_written_directly_once_the_transport_is_closing(pair: Pair) -> None:
    pair.transport.loseConnection()
    assert not fin_can_follow(pair.transport)
    write_directly(pair.transport, b"late")
    assert pair.sock.sends == [], "left to Twisted, which drops it"
