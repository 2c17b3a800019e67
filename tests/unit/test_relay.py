"""
The byte relay (persistproxy.relay) between two in-memory transports: bytes both ways,
flow control both ways, half-close both ways, resets, the idle timeout on a Clock, drain cuts,
byte counts and the close reason.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from persistproxy.relay import (
    CLIENT_FIN,
    DRAIN,
    IDLE_TIMEOUT,
    RESET,
    UPSTREAM_FIN,
    Relay,
    RelaySide,
    idle_queue,
)

LIMIT = 64 * 1024


class Transport(StringTransport):
    """
    A transport with Twisted's flow control: past C{LIMIT} unsent bytes it pauses its
    registered producer, and L{drain} (the peer read everything) resumes it. It records a
    half-close, and its closes are what the relay asked for (nothing is lost by itself).
    """

    write_closed = False
    aborted = False

    def __init__(self) -> None:
        super().__init__(lenient=True)

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > LIMIT:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def backlogged(self) -> bool:
        """Bytes wait to be sent (what the TLS transport answers; a TCP one is looked into)."""
        return bool(self.value())

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class Pair:
    """A started relay between two L{Transport}s, with a Clock and a 10 s idle timeout."""

    def __init__(self, idle: float = 10.0, start: bool = True) -> None:
        self.clock = Clock()
        self.client_t = Transport()
        self.upstream_t = Transport()
        self.client = RelaySide(self.client_t, "client")
        self.upstream = RelaySide(self.upstream_t, "upstream")
        self.ended: list[Relay] = []
        self.relay = Relay(
            self.client, self.upstream, idle_queue(self.clock, idle), self.ended.append
        )
        if start:
            self.relay.start()

    def lose(self, side: RelaySide, error: type[Exception] = ConnectionDone) -> None:
        side.lost(Failure(error()))


def test_bytes_pass_both_ways_and_are_counted() -> None:
    p = Pair()
    p.client.received(b"hello")
    p.upstream.received(b"welcome!")
    assert p.upstream_t.value() == b"hello"
    assert p.client_t.value() == b"welcome!"
    assert (p.relay.bytes_up, p.relay.bytes_down) == (5, 8)


def test_each_transport_is_the_streaming_producer_of_the_other() -> None:
    p = Pair()
    assert p.upstream_t.producer is p.client_t and p.upstream_t.streaming
    assert p.client_t.producer is p.upstream_t and p.client_t.streaming


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_slow_reader_pauses_the_other_side_until_it_drained(direction: str) -> None:
    p = Pair()
    source, sink_t = (p.client, p.upstream_t) if direction == "up" else (p.upstream, p.client_t)
    source_t: Any = source.transport
    chunk = b"x" * 16384
    sent = 0
    while source_t.producerState == "producing":
        source.received(chunk)  # what a transport reads while it is not paused
        sent += len(chunk)
        assert sent < 10 * LIMIT, "the source was never paused"
    assert len(sink_t.value()) <= LIMIT + len(chunk), "buffered: at most one read past the limit"
    assert len(sink_t.drain()) == sent
    assert source_t.producerState == "producing", "resumed once the peer drained"


def test_client_fin_half_closes_the_upstream_and_the_answer_still_flows() -> None:
    p = Pair()
    p.client.received(b"request")
    p.client.read_finished()
    assert p.upstream_t.write_closed, "the FIN is passed on as a shutdown of writing"
    assert p.upstream_t.producer is None, "the finished client no longer feeds the upstream"
    assert not p.client_t.disconnecting and not p.client_t.write_closed
    p.upstream.received(b"the whole answer")
    assert p.client_t.value() == b"the whole answer"
    p.upstream.read_finished()
    assert p.client_t.disconnecting and p.upstream_t.disconnecting, "both directions done"
    assert not p.client_t.aborted and not p.upstream_t.aborted
    p.lose(p.upstream)
    p.lose(p.client)
    assert p.ended == [p.relay]
    assert p.relay.reason == CLIENT_FIN
    assert (p.relay.bytes_up, p.relay.bytes_down) == (7, 16)


def test_upstream_fin_half_closes_the_client_which_may_still_send() -> None:
    p = Pair()
    p.upstream.received(b"banner")
    p.upstream.read_finished()
    assert p.client_t.write_closed and not p.client_t.disconnecting
    p.client.received(b"more from the client")
    assert p.upstream_t.value() == b"more from the client"
    p.client.read_finished()
    p.lose(p.client)
    p.lose(p.upstream)
    assert p.relay.reason == UPSTREAM_FIN
    assert p.ended == [p.relay]


def test_a_reset_is_passed_on_as_an_abort() -> None:
    p = Pair()
    p.client.received(b"x")
    p.lose(p.upstream, ConnectionLost)
    assert p.client_t.aborted
    assert not p.ended
    p.lose(p.client, ConnectionAborted)
    assert p.relay.reason == RESET


def test_a_reset_after_one_fin_is_still_a_reset() -> None:
    p = Pair()
    p.client.read_finished()
    p.lose(p.upstream, ConnectionLost)  # the answer never came whole
    p.lose(p.client)
    assert p.relay.reason == RESET


def test_a_clean_close_without_half_close_closes_the_other_gracefully() -> None:
    """What an upstream over Twisted's TLS does at the server's close_notify."""
    p = Pair()
    p.upstream.received(b"last words")
    p.lose(p.upstream)
    assert p.client_t.disconnecting and not p.client_t.aborted
    assert p.client_t.value() == b"last words", "written before the close"
    p.lose(p.client)
    assert p.relay.reason == UPSTREAM_FIN


def test_idle_in_both_directions_closes_the_relay() -> None:
    p = Pair(idle=10)
    p.clock.advance(6)
    p.client.received(b"a")
    p.clock.advance(6)
    p.upstream.received(b"b")  # either direction counts
    p.client_t.drain()
    p.upstream_t.drain()
    p.clock.advance(9)
    assert not p.client_t.disconnecting
    p.clock.advance(1)
    assert p.client_t.disconnecting and p.upstream_t.disconnecting
    assert not p.client_t.aborted, "nothing waited to be written: a graceful close"
    p.lose(p.client)
    p.lose(p.upstream)
    assert p.relay.reason == IDLE_TIMEOUT


def test_idle_timeout_aborts_a_side_with_bytes_stuck_for_a_reader_that_stopped() -> None:
    p = Pair(idle=10)
    p.upstream.received(b"unread")  # the client never reads it
    p.clock.advance(10)
    assert p.client_t.aborted
    assert p.upstream_t.disconnecting and not p.upstream_t.aborted


def test_no_idle_timeout_when_it_is_zero() -> None:
    p = Pair(idle=0)
    p.clock.advance(10**6)
    assert not p.client_t.disconnecting


def test_the_ended_relay_leaves_the_idle_queue() -> None:
    p = Pair(idle=10)
    queue = p.relay.idle
    assert queue is not None and p.relay in queue
    p.lose(p.client)
    p.lose(p.upstream)
    assert p.relay not in queue


def test_a_drain_cut_aborts_both_and_says_drain() -> None:
    p = Pair()
    p.client.received(b"busy")
    p.relay.cut(DRAIN, abort=True)
    assert p.client_t.aborted and p.upstream_t.aborted
    p.client.received(b"late")  # the rest of a read: dropped, not counted, not timed
    assert p.upstream_t.value() == b"busy"
    assert p.relay.bytes_up == 4
    assert p.relay.idle is not None and p.relay not in p.relay.idle
    p.lose(p.client, ConnectionAborted)
    p.lose(p.upstream, ConnectionAborted)
    assert p.relay.reason == DRAIN
    assert p.ended == [p.relay]


def test_bytes_read_before_the_relay_starts_are_held_with_the_transport_paused() -> None:
    p = Pair(start=False)
    p.upstream.received(b"banner")
    assert p.upstream_t.producerState == "paused"
    p.relay.start()
    assert p.client_t.value() == b"banner"
    assert p.relay.bytes_down == 6
    assert p.upstream_t.producerState == "producing"


def test_a_fin_before_the_start_is_passed_on_at_the_start() -> None:
    p = Pair(start=False)
    p.client.received(b"all of it")
    p.client.read_finished()
    p.relay.start()
    assert p.upstream_t.value() == b"all of it"
    assert p.upstream_t.write_closed


def test_bytes_after_a_fin_are_a_bug() -> None:
    p = Pair()
    p.client.read_finished()
    with pytest.raises(RuntimeError):
        p.client.received(b"?")


def test_on_end_is_called_once() -> None:
    p = Pair()
    p.lose(p.client)
    p.lose(p.upstream)
    p.lose(p.upstream)
    p.relay.cut(DRAIN)
    assert p.ended == [p.relay]
