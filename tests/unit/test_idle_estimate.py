"""
The learned idle limit of a server, with a Clock: the lowest close age of the last one to two
windows, relaxing upward (x1.5 per quiet window) and forgotten at the ceiling.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from persistproxy.upstream.idle_estimate import RELAX, SHORTEST, IdleEstimate

WINDOW = 60.0


def _estimate(ceiling: float = 60.0, window: float = WINDOW) -> tuple[Clock, IdleEstimate]:
    clock = Clock()
    return clock, IdleEstimate(clock, window, ceiling)


def test_nothing_is_known_until_a_close_is_seen() -> None:
    clock, estimate = _estimate()
    assert estimate.limit() is None
    clock.advance(1000)
    assert estimate.limit() is None


def test_the_lowest_close_age_is_the_estimate() -> None:
    clock, estimate = _estimate()
    assert estimate.observe(1.2) is None, "observe says what the estimate was before"
    assert estimate.limit() == 1.2
    clock.advance(5)
    assert estimate.observe(1.4) == 1.2
    assert estimate.limit() == 1.2, "a later close does not raise it"
    clock.advance(5)
    estimate.observe(0.9)
    assert estimate.limit() == 0.9
    assert estimate.observations == 3


def test_an_early_close_counts_for_one_to_two_windows_while_the_server_keeps_closing() -> None:
    """A restart closes an idle connection after 0.2 s; the server's real limit is 1 s."""
    clock, estimate = _estimate()
    clock.advance(5)
    estimate.observe(0.2)
    for _ in range(11):  # the server keeps closing idle connections at 1 s, every 10 s
        clock.advance(10)
        estimate.observe(1.0)
    assert clock.seconds() == 115
    assert estimate.limit() == 0.2, "still within the window after the one it was seen in"
    clock.advance(5)  # 120: the window of the early close is two windows ago
    assert estimate.limit() == 1.0


def test_a_quiet_server_lets_the_estimate_relax_then_be_forgotten() -> None:
    clock, estimate = _estimate(ceiling=5.0)
    clock.advance(1)
    estimate.observe(1.0)
    clock.advance(118)  # 119: the close is in the previous window
    assert estimate.limit() == 1.0
    clock.advance(1)  # 120: no close in this window nor the previous one
    assert estimate.limit() == pytest.approx(1.0 * RELAX)
    clock.advance(61)  # 181: three whole windows since the close
    assert estimate.limit() == pytest.approx(1.0 * RELAX**3)
    clock.advance(60)  # 1.5 ** 4 = 5.06 reaches the ceiling: nothing learned any more
    assert estimate.limit() is None
    clock.advance(600)
    assert estimate.limit() is None


def test_a_close_during_relaxation_sets_the_estimate_again() -> None:
    clock, estimate = _estimate()
    estimate.observe(1.0)
    clock.advance(3 * WINDOW)
    relaxed = estimate.limit()
    assert relaxed is not None and relaxed > 1.0
    assert estimate.observe(0.8) == relaxed
    assert estimate.limit() == 0.8


def test_a_close_right_after_a_response_is_not_an_idle_limit() -> None:
    """A server that ends a connection after its last response (its request limit, without
    saying Connection: close) must not stop all reuse."""
    _, estimate = _estimate()
    estimate.observe(SHORTEST / 2)
    assert estimate.limit() is None
    estimate.observe(2.0)
    estimate.observe(0.001)
    assert estimate.limit() == 2.0
    assert estimate.observations == 1


def test_a_very_long_silence_forgets_without_overflowing() -> None:
    clock, estimate = _estimate()
    estimate.observe(1.0)
    clock.advance(1e12)
    assert estimate.limit() is None


def test_window_zero_learns_nothing() -> None:
    _, estimate = _estimate(window=0)
    assert estimate.observe(0.5) is None
    assert estimate.limit() is None
