"""
The timeout queues a listener's connections share (timers.py), with a Clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from persistproxy.timers import TimeoutQueue


def test_items_expire_in_order_after_their_timeout_and_not_before() -> None:
    clock = Clock()
    expired: list[str] = []
    q: TimeoutQueue[str] = TimeoutQueue(clock, 10, expired.append)
    q.add("a")
    clock.advance(3)
    q.add("b")
    clock.advance(6.9)
    assert expired == []
    clock.advance(0.2)
    assert expired == ["a"]
    clock.advance(2.9)
    assert expired == ["a", "b"]
    assert len(clock.getDelayedCalls()) == 0


def test_readding_restarts_and_discard_stops() -> None:
    clock = Clock()
    expired: list[str] = []
    q: TimeoutQueue[str] = TimeoutQueue(clock, 10, expired.append)
    q.add("a")
    q.add("b")
    clock.advance(9)
    q.add("a")  # activity: a's timeout starts over
    q.discard("b")
    clock.advance(9.9)  # t = 18.9
    assert expired == []
    clock.advance(0.2)
    assert expired == ["a"]


def test_one_reactor_call_however_many_items() -> None:
    clock = Clock()
    q: TimeoutQueue[int] = TimeoutQueue(clock, 5, lambda _: None)
    for i in range(1000):
        q.add(i)
    assert len(clock.getDelayedCalls()) == 1


def test_membership() -> None:
    clock = Clock()
    q: TimeoutQueue[str] = TimeoutQueue(clock, 10, lambda _: None)
    q.add("a")
    q.add("b")
    q.add("a")  # re-added: still one entry
    assert len(q) == 2 and "a" in q and "c" not in q
    q.discard("a")
    q.discard("c")  # not there: nothing happens
    assert len(q) == 1 and "a" not in q and "b" in q


def test_the_call_follows_the_first_item_when_the_first_ones_go() -> None:
    clock = Clock()
    expired: list[str] = []
    q: TimeoutQueue[str] = TimeoutQueue(clock, 10, expired.append)
    q.add("a")
    clock.advance(4)
    q.add("b")
    q.discard("a")
    clock.advance(6)  # a's moment: nothing due, the call re-aims at b
    assert expired == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(3.9)
    assert expired == []
    clock.advance(0.1)
    assert expired == ["b"] and clock.getDelayedCalls() == []
