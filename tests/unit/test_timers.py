"""
Shared timeout queues and lazily re-armed deadlines, with a Clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from persistproxy.policy import Deadline
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


def test_deadline_rearms_lazily_and_fires_at_the_latest_due_time() -> None:
    clock = Clock()
    fired: list[float] = []
    d = Deadline(clock, lambda: fired.append(clock.seconds()))
    d.arm(10)
    clock.advance(5)
    d.arm(10)  # later: no new call, the first one re-checks
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    assert fired == []
    clock.advance(5)
    assert fired == [15]


def test_deadline_cancel_means_no_callback() -> None:
    clock = Clock()
    fired: list[int] = []
    d = Deadline(clock, lambda: fired.append(1))
    d.arm(1)
    d.cancel()
    clock.advance(2)
    assert fired == [] and not d.armed
    d.arm(1)
    d.arm(0.5)  # sooner: rescheduled
    clock.advance(0.6)
    assert fired == [1]
