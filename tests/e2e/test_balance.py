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
from e2ehelpers import Origin, get, make_config, wait_metric, wait_until, with_metrics


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


def _get_from(port: int, source: str) -> int:
    """One GET on a fresh connection from the loopback address C{source}; its status."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_weighted_round_robin_distribution(
    origin_factory: Callable[..., Origin], proxy_factory: ProxyFactory
) -> None:
    origins = [origin_factory() for _ in range(3)]
    proxy = proxy_factory(
        servers=[
            {"address": f"127.0.0.1:{origins[0].port}", "weight": 3},  # type: ignore[list-item]
            f"127.0.0.1:{origins[1].port}",
            {"address": f"127.0.0.1:{origins[2].port}", "weight": 2},  # type: ignore[list-item]
        ],
    )
    for _ in range(60):
        assert get(proxy.port).status == 200
    served = [o.stats()["requests"] for o in origins]
    print("weights 3:1:2, 60 requests served:", served)
    assert served == [30, 10, 20]


def test_backup_serves_only_while_the_others_are_down(
    origin_factory: Callable[..., Origin], proxy_factory: ProxyFactory, dead_port: int
) -> None:
    backup = origin_factory()
    main = origin_factory()
    proxy = proxy_factory(
        servers=[
            f"127.0.0.1:{main.port}",
            {"address": f"127.0.0.1:{backup.port}", "backup": True},  # type: ignore[list-item]
        ],
    )
    for _ in range(10):
        assert get(proxy.port).status == 200
    assert (main.stats()["requests"], backup.stats()["requests"]) == (10, 0)
    main.terminate(5)
    for _ in range(10):
        assert get(proxy.port).status == 200
    assert backup.stats()["requests"] == 10


def test_ip_hash_keeps_each_client_on_one_server(
    origin_factory: Callable[..., Origin], proxy_factory: ProxyFactory
) -> None:
    origins = [origin_factory() for _ in range(3)]
    proxy = proxy_factory(
        servers=[f"127.0.0.1:{o.port}" for o in origins], upstream={"balance": "ip_hash"}
    )
    placement: dict[str, int] = {}
    for n in range(2, 32):
        source = f"127.0.0.{n}"
        before = [o.stats()["requests"] for o in origins]
        for _ in range(3):
            assert _get_from(proxy.port, source) == 200
        after = [o.stats()["requests"] for o in origins]
        grew = [i for i in range(3) if after[i] != before[i]]
        assert len(grew) == 1 and after[grew[0]] - before[grew[0]] == 3, (source, before, after)
        placement[source] = grew[0]
    spread = [list(placement.values()).count(i) for i in range(3)]
    print("ip_hash: 30 client addresses (3 requests each) per server:", spread)
    assert all(spread), "every server gets some clients"


def test_active_check_ejects_a_server_that_stopped_and_brings_it_back(
    origin_factory: Callable[..., Origin],
    proxy_factory: ProxyFactory,
    late_origins: list[Origin],
) -> None:
    steady = origin_factory()
    flaky = Origin()
    late_origins.append(flaky)
    port = flaky.port
    servers = [f"127.0.0.1:{steady.port}", f"127.0.0.1:{port}"]
    check = {"path": "/status/200", "interval": 0.2, "timeout": 1, "rise": 2, "fall": 2}
    proxy = proxy_factory(
        config_text=with_metrics(
            make_config(servers, upstream={"health_check": check, "max_fails": 0})
        )
    )
    up = f'persistproxy_upstream_up{{server="127.0.0.1:{port}",upstream="app"}}'
    wait_metric(proxy, up, 1)
    flaky.terminate(5)
    # No request is needed to notice: the checker's probes fail.
    event = proxy.wait_event("upstream.check_down", 10)
    assert event is not None and event["server"] == f"127.0.0.1:{port}"
    wait_metric(proxy, up, 0)
    before = steady.stats()["requests"]
    statuses = [get(proxy.port).status for _ in range(10)]
    assert statuses == [200] * 10
    assert steady.stats()["requests"] - before >= 10
    assert proxy.events("upstream.next_server") == [], "no request was sent to it"

    revived = Origin(port=port)
    late_origins.append(revived)
    assert proxy.wait_event("upstream.check_up", 10) is not None
    wait_metric(proxy, up, 1)
    for _ in range(10):
        assert get(proxy.port).status == 200
    probes = revived.stats()["paths"].get("/status/200", 0)
    served = revived.stats()["requests"] - probes
    print("after check_up, of 10 requests the revived server served", served)
    assert served == 5


def test_active_check_wants_the_expected_status_and_all_down_are_tried_anyway(
    origin_factory: Callable[..., Origin], proxy_factory: ProxyFactory
) -> None:
    origins = [origin_factory(), origin_factory()]
    servers = [f"127.0.0.1:{o.port}" for o in origins]
    check = {"path": "/status/200", "interval": 0.2, "fall": 1, "expect": 204}
    proxy = proxy_factory(
        config_text=with_metrics(make_config(servers, upstream={"health_check": check}))
    )
    for server in servers:
        wait_metric(proxy, f'persistproxy_upstream_up{{server="{server}",upstream="app"}}', 0)
    # Every server is down by its check: they are tried anyway, in turn, as nginx does.
    assert [get(proxy.port).status for _ in range(4)] == [200] * 4
