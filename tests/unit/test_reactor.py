"""
ProxyReactor.call_after_event: deferred work runs at the end of the current I/O event, or
before the next wait when queued by a timed call; after_event_caller picks it, or the next
turn with any other reactor.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock

from persistproxy.net.after_event import after_event_caller
from persistproxy.net.reactor import ProxyReactor


class _Reader:
    """A pipe's read end whose doRead queues work after the event."""

    def __init__(self, reactor: ProxyReactor, fd: int, log: list[str]) -> None:
        self.reactor, self.fd, self.log = reactor, fd, log

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        os.read(self.fd, 100)
        self.log.append("event")
        self.reactor.call_after_event(lambda: self.log.append("after"))
        self.log.append("event end")

    def logPrefix(self) -> str:
        return "reader"

    def connectionLost(self, reason: object) -> None:
        pass


def test_work_queued_by_an_event_runs_when_the_event_is_done() -> None:
    reactor = ProxyReactor()
    r, w = os.pipe()
    log: list[str] = []
    reader = _Reader(reactor, r, log)
    reactor.addReader(reader)
    try:
        os.write(w, b"x")
        reactor.doPoll(1.0)
        assert log == ["event", "event end", "after"]
    finally:
        reactor.removeReader(reader)
        os.close(r)
        os.close(w)


def test_work_queued_outside_an_event_runs_before_the_next_wait() -> None:
    reactor = ProxyReactor()
    log: list[str] = []
    reactor.call_after_event(lambda: log.append("from a timed call"))
    reactor.doPoll(0)
    assert log == ["from a timed call"]


def test_an_error_in_deferred_work_does_not_stop_the_rest() -> None:
    reactor = ProxyReactor()
    log: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom")

    reactor.call_after_event(boom)
    reactor.call_after_event(lambda: log.append("still runs"))
    reactor.doPoll(0)
    assert log == ["still runs"]


def test_after_event_caller_uses_the_proxy_reactors_queue_or_the_next_turn() -> None:
    """net/after_event.py: the same "after this event" with whatever reactor runs."""
    reactor = ProxyReactor()
    after = after_event_caller(reactor)
    assert after == reactor.call_after_event
    clock = Clock()
    log: list[str] = []
    after_event_caller(clock)(lambda: log.append("next turn"))
    assert log == [], "not in the middle of the current event"
    clock.advance(0)
    assert log == ["next turn"]
