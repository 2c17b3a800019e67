"""
Load balancing and health (Operations II), against the real proxy and real origins: a server
that refuses connections is failed over and taken out of the rotation passively (nginx's
C{max_fails} / C{fail_timeout}) while every request keeps succeeding, and it comes back once
it listens again and C{fail_timeout} has passed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
from conftest import ProxyFactory
from e2ehelpers import Origin, get, wait_until


@pytest.fixture
def dead_port() -> int:
    """A port nothing listens on yet (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def late_origins() -> Iterator[list[Origin]]:
    """Origins a test starts itself (on a port it chose), stopped at the end."""
    started: list[Origin] = []
    yield started
    for origin in started:
        origin.terminate(5)
        origin.kill()


def test_a_dead_server_is_ejected_while_requests_succeed_and_comes_back(
    origin_factory: Callable[..., Origin],
    proxy_factory: ProxyFactory,
    dead_port: int,
    late_origins: list[Origin],
) -> None:
    live = origin_factory()
    proxy = proxy_factory(
        servers=[f"127.0.0.1:{live.port}", f"127.0.0.1:{dead_port}"],
        upstream={"max_fails": 1, "fail_timeout": 2},
    )
    statuses = [get(proxy.port).status for _ in range(20)]
    statuses.append(get(proxy.port, "/echo", "POST", body=b"payload").status)
    print("statuses with one server dead:", statuses)
    assert statuses == [200] * 21
    down = proxy.events("upstream.server_down")
    assert [e["server"] for e in down] == [f"127.0.0.1:{dead_port}"]
    # One failed connect took it out: the other requests never went there.
    assert len(proxy.events("upstream.next_server")) == 1
    assert live.stats()["requests"] == 21

    revived = Origin(port=dead_port)
    late_origins.append(revived)
    failures: list[int] = []

    def revived_served() -> bool:
        status = get(proxy.port).status
        if status != 200:
            failures.append(status)
        return bool(revived.stats()["requests"])

    assert wait_until(revived_served, 15, step=0.2), "the revived server never got a request"
    assert failures == []
    assert proxy.wait_event("upstream.server_up", 5) is not None
    # Back in the rotation: requests alternate between the two again.
    before = revived.stats()["requests"]
    for _ in range(10):
        assert get(proxy.port).status == 200
    served = revived.stats()["requests"] - before
    print("of 10 requests after recovery, the revived server served", served)
    assert served == 5
