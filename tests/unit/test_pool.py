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


# -- the keep-alive race: the learned idle limit and requests that must not be replayed ------


def _post(pool: Any) -> tuple[UpstreamConnection, bool]:
    w = Waiter()
    pool.acquire(w, replayable=False)
    assert len(w.got) == 1, w.failed
    return w.got[0]


def _closed_by_origin_after(h: Harness, seconds: float) -> None:
    """A connection goes idle, and the origin closes it C{seconds} later."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    c, _ = _take(h.pool)
    h.pool.release(c, True)
    h.clock.advance(seconds)
    c.connectionLost(Failure(ConnectionDone()))


def test_pool_learns_the_idle_limit_from_the_origin_closing_an_idle_connection() -> None:
    h = Harness()
    assert h.pool.learned_idle is None
    _closed_by_origin_after(h, 1.0)
    assert h.pool.learned_idle == 1.0
    [event] = h.events("upstream.idle_limit_learned")
    assert event["seconds"] == 1.0 and event["before"] is None
    # A connection the pool itself closes teaches nothing.
    a, _ = _take(h.pool)
    h.pool.release(a, False)
    h.clock.advance(0.3)
    a.connectionLost()
    assert h.pool.learned_idle == 1.0


def test_a_close_right_after_a_response_does_not_stop_reuse() -> None:
    """An origin that ends connections at its request limit without Connection: close."""
    h = Harness()
    _closed_by_origin_after(h, 0.002)
    assert h.pool.learned_idle is None
    b, _ = _take(h.pool)
    h.pool.release(b, True)
    h.clock.advance(5)
    again, reused = _take(h.pool)
    assert again is b and reused


def test_connection_past_the_learned_limit_is_not_lent_and_left_for_the_origin() -> None:
    h = Harness(upstream={"keepalive_margin": 0.2})
    _closed_by_origin_after(h, 1.0)
    b, _ = _take(h.pool)
    h.pool.release(b, True)
    h.clock.advance(0.85)  # within keepalive_margin of the learned 1.0 s
    fresh, reused = _take(h.pool)
    assert fresh is not b and not reused
    assert not b.transport.disconnecting, "left in the pool: the origin's close teaches us"  # type: ignore[union-attr]
    assert h.pool.idle == 1
    h.pool.release(fresh, True)
    h.clock.advance(0.5)
    again, reused = _take(h.pool)
    assert again is fresh and reused, "younger ones are still lent"


def test_post_takes_a_connection_only_within_half_the_learned_limit() -> None:
    h = Harness(upstream={"keepalive_margin": 0.2})
    _closed_by_origin_after(h, 1.0)
    b, _ = _take(h.pool)
    h.pool.release(b, True)
    h.clock.advance(0.45)
    got, reused = _post(h.pool)
    assert got is b and reused
    h.pool.release(b, True)
    h.clock.advance(0.6)  # past half of 1.0 s: a POST must not risk the race
    post, reused = _post(h.pool)
    assert post is not b and not reused
    assert not b.transport.disconnecting and h.pool.idle == 1  # type: ignore[union-attr]
    get, reused = _take(h.pool)
    assert get is b and reused, "a GET may still take it: it would be retried"


def test_post_before_anything_is_learned_assumes_assumed_idle_limit() -> None:
    h = Harness(upstream={"assumed_idle_limit": 2.0})
    a, _ = _take(h.pool)
    h.pool.release(a, True)
    h.clock.advance(0.9)
    got, reused = _post(h.pool)
    assert got is a and reused
    h.pool.release(a, True)
    h.clock.advance(1.1)  # more than half of the assumed 2 s
    post, reused = _post(h.pool)
    assert post is not a and not reused
    get, reused = _take(h.pool)
    assert get is a and reused


def test_post_trusts_what_the_origin_has_shown_it_tolerates() -> None:
    """An idle connection kept open 10 s by the origin lets a POST take one idle for 4 s."""
    h = Harness()
    a, _ = _take(h.pool)
    b, _ = _take(h.pool)
    h.pool.release(a, True)
    h.clock.advance(6)
    h.pool.release(b, True)
    h.clock.advance(4)
    got, reused = _post(h.pool)
    assert got is b and reused


def test_post_trusts_the_idle_timeout_a_connection_survived_until_reaped() -> None:
    h = Harness(upstream={"idle_timeout": 10})
    a, _ = _take(h.pool)
    h.pool.release(a, True)
    h.clock.advance(10.1)
    assert a.transport.disconnecting and h.pool.idle == 0  # type: ignore[union-attr]
    b, _ = _take(h.pool)
    h.pool.release(b, True)
    h.clock.advance(4.5)
    got, reused = _post(h.pool)
    assert got is b and reused


def test_post_takes_only_the_first_half_of_an_announced_keepalive_timeout() -> None:
    h = Harness()
    client, _transport = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    h.origin.respond(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=4\r\nContent-Length: 0\r\n\r\n")
    [a] = h.origin.connections
    assert a.in_pool
    h.clock.advance(2.5)
    post, reused = _post(h.pool)
    assert post is not a and not reused
    get, reused = _take(h.pool)
    assert get is a and reused


def test_queued_post_keeps_its_rule_when_woken() -> None:
    h = Harness(upstream={"max_connections": 1})
    a, _ = _take(h.pool)
    h.pool.release(a, True)
    h.clock.advance(0.8)  # too old for a POST (half of the assumed 1 s)
    b, reused = _post(h.pool)
    assert b is not a and not reused
    waiter = Waiter()
    h.pool.acquire(waiter, replayable=False)
    assert h.pool.waiting == 1
    b.connectionLost()
    h.pool.forget()
    assert len(waiter.got) == 1 and waiter.got[0][0] is not a, waiter.got


def test_post_through_the_proxy_is_sent_on_a_new_connection_after_a_long_idle() -> None:
    h = Harness()
    client, _transport = h.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.clock.advance(0.7)
    client.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert len(h.origin.connections) == 2
    assert h.origin.sent(1).startswith(b"POST / HTTP/1.1\r\n")
    h.origin.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    client.dataReceived(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"GET /again" in h.origin.sent(1), "the most recently used connection"
    assert b"GET /again" not in h.origin.sent(0)
    assert not h.origin.connections[0].transport.disconnecting  # type: ignore[union-attr]


def test_a_full_pool_keeps_the_young_connection_and_closes_the_oldest() -> None:
    """Connections left past the learned limit must not crowd young ones out of the pool."""
    h = Harness(upstream={"pool_size": 1})
    _closed_by_origin_after(h, 1.0)
    a, _ = _take(h.pool)
    b, _ = _take(h.pool)
    h.pool.release(a, True)
    h.clock.advance(0.9)  # a is past the learned limit: left for the origin to close
    h.pool.release(b, True)
    assert a.transport.disconnecting and not b.transport.disconnecting  # type: ignore[union-attr]
    assert h.pool.idle == 1
    got, reused = _take(h.pool)
    assert got is b and reused


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
