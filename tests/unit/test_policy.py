"""
The policy objects (policy.py), without a socket: when a client connection is kept alive,
when a failed request may be sent again, and the lazily re-armed L{Deadline}, with a Clock.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from persistproxy.policy import IDEMPOTENT_METHODS, Deadline, KeepAlivePolicy, RetryPolicy

# -- KeepAlivePolicy ---------------------------------------------------------------------------


def test_keep_alive_only_when_the_client_wants_it_and_within_max_requests() -> None:
    policy = KeepAlivePolicy(timeout=75, max_requests=3)
    assert policy.keep_alive(client_wants=True, served=1)
    assert policy.keep_alive(client_wants=True, served=2)
    assert not policy.keep_alive(client_wants=True, served=3), "the 3rd response closes"
    assert not policy.keep_alive(client_wants=False, served=1)


def test_max_requests_zero_means_no_limit_and_timeout_zero_means_no_keep_alive() -> None:
    assert KeepAlivePolicy(timeout=5, max_requests=0).keep_alive(True, 10**9)
    assert not KeepAlivePolicy(timeout=0, max_requests=0).keep_alive(True, 1)


@pytest.mark.parametrize(
    ("timeout", "header"),
    [(75, b"Keep-Alive: timeout=75\r\n"), (1.5, b"Keep-Alive: timeout=1\r\n")],
)
def test_the_keep_alive_header_announces_whole_seconds(timeout: float, header: bytes) -> None:
    """Rounded down: a client that retires the connection early never races our close."""
    assert KeepAlivePolicy(timeout=timeout).header() == header


# -- RetryPolicy -------------------------------------------------------------------------------


def test_only_idempotent_methods_without_a_body_and_without_a_response_are_retried() -> None:
    policy = RetryPolicy(retries=1, max_stale=3)
    for method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"):
        assert method in IDEMPOTENT_METHODS
        assert policy.may_retry(method, False, False, False, 0, 0), method
    for method in (b"POST", b"PATCH", b"CONNECT", b"get"):
        assert not policy.may_retry(method, False, False, False, 0, 0), method
    assert not policy.may_retry(b"PUT", True, False, False, 0, 0), "a body is never resent"
    assert not policy.may_retry(b"GET", False, True, False, 0, 0), "a response had started"
    assert not policy.may_retry(b"GET", False, True, True, 0, 0)


def test_replayable_is_what_the_retry_rules_could_ever_send_again() -> None:
    """What the pool is told when it lends a connection (the keep-alive race)."""
    for method in IDEMPOTENT_METHODS:
        assert RetryPolicy.replayable(method, has_body=False)
        assert not RetryPolicy.replayable(method, has_body=True)
    for method in (b"POST", b"PATCH", b"CONNECT", b"PROPFIND"):
        assert not RetryPolicy.replayable(method, has_body=False)


def test_a_fresh_connection_spends_the_retry_budget_a_pooled_one_the_stale_budget() -> None:
    policy = RetryPolicy(retries=1, max_stale=3)
    assert policy.may_retry(b"GET", False, False, reused=False, retries_done=0, stale_done=5)
    assert not policy.may_retry(b"GET", False, False, reused=False, retries_done=1, stale_done=0)
    # The keep-alive race on pooled connections does not spend the retry budget...
    assert policy.may_retry(b"GET", False, False, reused=True, retries_done=1, stale_done=2)
    # ... but is bounded too.
    assert not policy.may_retry(b"GET", False, False, reused=True, retries_done=0, stale_done=3)
    assert not RetryPolicy(retries=0).may_retry(b"GET", False, False, False, 0, 0)


# -- Deadline ----------------------------------------------------------------------------------


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


def test_deadline_stop_drops_the_scheduled_call() -> None:
    clock = Clock()
    fired: list[int] = []
    d = Deadline(clock, lambda: fired.append(1))
    d.arm(5)
    d.cancel()
    assert len(clock.getDelayedCalls()) == 1, "cancel leaves the call, which does nothing"
    d.stop()
    assert clock.getDelayedCalls() == [] and not d.armed
    d.stop()  # twice is harmless
    d.arm(1)
    clock.advance(1)
    assert fired == [1]
