"""
The upstream pool with a Clock: LIFO reuse, O(1) idle reaping, the idle cap, the cap on open
connections with its bounded wait queue, and the safety margin before an origin's timeout.
"""

from __future__ import annotations

from typing import Any

from fakes import Harness

from persistproxy.http.upstream_connection import UpstreamConnection


class Waiter:
    def __init__(self) -> None:
        self.cancelled = False
        self.got: list[tuple[UpstreamConnection, bool]] = []
        self.failed: list[tuple[str, int]] = []

    def connection_ready(self, connection: UpstreamConnection, reused: bool) -> None:
        self.got.append((connection, reused))

    def connection_failed(self, reason: str, status: int) -> None:
        self.failed.append((reason, status))


def _take(pool: Any, fresh: bool = False) -> tuple[UpstreamConnection, bool]:
    w = Waiter()
    pool.acquire(w, fresh)
    assert len(w.got) == 1, w.failed
    return w.got[0]


def test_most_recently_used_connection_is_handed_out_first() -> None:
    h = Harness()
    a, reused_a = _take(h.pool)
    b, _ = _take(h.pool)
    assert not reused_a
    h.pool.release(a, True)
    h.clock.advance(1)
    h.pool.release(b, True)
    again, reused = _take(h.pool)
    assert again is b and reused


def test_idle_connections_are_reaped_after_idle_timeout_and_not_before() -> None:
    h = Harness(upstream={"idle_timeout": 60})
    a, _ = _take(h.pool)
    b, _ = _take(h.pool)
    h.pool.release(a, True)
    h.clock.advance(30)
    h.pool.release(b, True)
    h.clock.advance(29.9)
    assert not a.transport.disconnecting  # type: ignore[union-attr]
    h.clock.advance(0.2)
    assert a.transport.disconnecting  # type: ignore[union-attr]
    assert not b.transport.disconnecting  # type: ignore[union-attr]
    assert h.pool.idle == 1
    h.clock.advance(30)
    assert b.transport.disconnecting  # type: ignore[union-attr]
    assert h.pool.idle == 0


def test_pool_size_caps_idle_connections_only() -> None:
    h = Harness(upstream={"pool_size": 2})
    taken = [_take(h.pool)[0] for _ in range(4)]
    assert h.pool.active == 4, "no cap on connections in use"
    for c in taken:
        h.pool.release(c, True)
    assert h.pool.idle == 2
    assert sum(bool(c.transport.disconnecting) for c in taken) == 2  # type: ignore[union-attr]


def test_connection_closed_by_origin_while_idle_is_not_handed_out() -> None:
    h = Harness()
    a, _ = _take(h.pool)
    h.pool.release(a, True)
    from twisted.python.failure import Failure

    a.connectionLost(Failure(ConnectionError()))
    assert h.pool.idle == 0
    b, reused = _take(h.pool)
    assert b is not a and not reused


def test_max_connections_queues_then_refuses_with_503() -> None:
    h = Harness(upstream={"max_connections": 1, "queue_size": 1, "queue_timeout": 5})
    a, _ = _take(h.pool)
    queued, full = Waiter(), Waiter()
    h.pool.acquire(queued)
    h.pool.acquire(full)
    assert not queued.got and not queued.failed
    assert full.failed and full.failed[0][1] == 503
    h.pool.release(a, True)
    assert queued.got == [(a, True)], "a returned connection goes to the next waiter"


def test_queued_request_gives_up_after_queue_timeout() -> None:
    h = Harness(upstream={"max_connections": 1, "queue_timeout": 5})
    _take(h.pool)
    waiter = Waiter()
    h.pool.acquire(waiter)
    h.clock.advance(4.9)
    assert not waiter.failed
    h.clock.advance(0.2)
    assert waiter.failed and waiter.failed[0][1] == 503
    assert h.pool.waiting == 0


def test_connection_near_its_idle_timeout_is_not_reused() -> None:
    h = Harness(upstream={"idle_timeout": 10, "keepalive_margin": 1})
    a, _ = _take(h.pool)
    h.pool.release(a, True)
    h.clock.advance(9.5)
    b, reused = _take(h.pool)
    assert b is not a and not reused
    assert a.transport.disconnecting  # type: ignore[union-attr]


def test_upstream_max_requests_retires_the_connection() -> None:
    h = Harness(upstream={"max_requests": 2})
    client, _transport = h.client()
    for _ in range(3):
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert len(h.origin.connections) == 2
    assert h.origin.connections[0].requests == 2
    assert h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]


# -- lent by key (a PROXY protocol header per client) -------------------------------------------


def _take_for(pool: Any, key: str, fresh: bool = False) -> tuple[UpstreamConnection, bool]:
    w = Waiter()
    pool.keyed(key).acquire(w, fresh)
    assert len(w.got) == 1, w.failed
    return w.got[0]


def test_a_keyed_connection_is_lent_again_only_for_its_key() -> None:
    h = Harness()
    a, _ = _take_for(h.pool, "alice")
    h.pool.keyed("alice").release(a, True)
    b, reused = _take_for(h.pool, "bob")
    assert b is not a and not reused, "never lent to another client"
    again, reused = _take_for(h.pool, "alice")
    assert again is a and reused
    plain, reused = _take(h.pool)
    assert plain is not a and not reused, "nor to a pick without a key"
    h.pool.release(plain, True)
    assert _take_for(h.pool, "carol")[0] is not plain, "and unkeyed ones not to a key"
    assert h.pool.keyed("alice").address == h.pool.address


def test_a_freed_slot_opens_a_connection_for_the_next_waiter_of_another_key() -> None:
    h = Harness(upstream={"max_connections": 1})
    a, _ = _take_for(h.pool, "alice")
    bob = Waiter()
    h.pool.keyed("bob").acquire(bob)
    assert bob.got == [] and h.pool.waiting == 1
    h.pool.keyed("alice").release(a, True)
    assert h.pool.idle == 1, "alice's connection stays hers"
    [(b, reused)] = bob.got
    assert b is not a and not reused and h.pool.active == 1


def test_a_waiter_of_the_same_key_gets_the_connection_at_once() -> None:
    h = Harness(upstream={"max_connections": 1})
    a, _ = _take_for(h.pool, "alice")
    alice = Waiter()
    h.pool.keyed("alice").acquire(alice)
    h.pool.keyed("alice").release(a, True)
    assert alice.got == [(a, True)] and h.pool.idle == 0


def test_past_pool_size_the_least_recently_idle_key_is_closed() -> None:
    h = Harness(upstream={"pool_size": 2})
    taken = {key: _take_for(h.pool, key)[0] for key in ("a", "b", "c")}
    for key in ("a", "b", "c"):
        h.pool.keyed(key).release(taken[key], True)
        h.clock.advance(1)
    assert h.pool.idle == 2
    assert taken["a"].transport.disconnecting  # type: ignore[union-attr]
    assert not taken["c"].transport.disconnecting  # type: ignore[union-attr]
    assert _take_for(h.pool, "a")[1] is False, "a's was closed"
    assert _take_for(h.pool, "b")[0] is taken["b"]


def test_keyed_idle_connections_are_reaped_after_idle_timeout() -> None:
    h = Harness(upstream={"idle_timeout": 60})
    a, _ = _take_for(h.pool, "a")
    plain, _ = _take(h.pool)
    h.pool.keyed("a").release(a, True)
    h.clock.advance(10)
    h.pool.release(plain, True)
    h.clock.advance(49.9)
    assert not a.transport.disconnecting  # type: ignore[union-attr]
    h.clock.advance(0.2)
    assert a.transport.disconnecting and h.pool.idle == 1  # type: ignore[union-attr]
    h.clock.advance(10)
    assert plain.transport.disconnecting and h.pool.idle == 0  # type: ignore[union-attr]
    assert _take_for(h.pool, "a")[1] is False


def test_a_keyed_connection_closed_by_the_origin_while_idle_leaves_at_once() -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    h = Harness()
    a, _ = _take_for(h.pool, "a")
    h.pool.keyed("a").release(a, True)
    a.connectionLost(Failure(ConnectionDone()))
    assert h.pool.idle == 0
    assert _take_for(h.pool, "a")[0] is not a


def test_the_descriptor_budget_sheds_the_oldest_idle_keyed_or_not() -> None:
    h = Harness()
    a, _ = _take_for(h.pool, "a")
    plain, _ = _take(h.pool)
    h.pool.keyed("a").release(a, True)
    h.clock.advance(1)
    h.pool.release(plain, True)
    assert h.pool.oldest_idle_since() == 0
    h.pool.shed_oldest_idle()
    assert a.transport.disconnecting and h.pool.idle == 1  # type: ignore[union-attr]
    assert h.pool.oldest_idle_since() == 1
    h.pool.shed_oldest_idle()
    assert plain.transport.disconnecting and h.pool.idle == 0  # type: ignore[union-attr]


def test_closing_the_pool_closes_keyed_idle_connections() -> None:
    h = Harness()
    a, _ = _take_for(h.pool, "a")
    h.pool.keyed("a").release(a, True)
    h.pool.close()
    assert a.transport.disconnecting and h.pool.idle == 0  # type: ignore[union-attr]
