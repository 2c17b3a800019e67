"""
The balancing methods of an upstream group (upstream/group.py), deterministically: nginx's
smooth weighted round-robin, backups, least_conn, ip_hash (rendezvous hashing) and
random_two (with a seeded random), plus the configuration of weights and backups.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fakes import OK_RESPONSE, Harness
from twisted.internet.task import Clock

from persistproxy.check import effective_toml
from persistproxy.config import UpstreamConfig, load_config
from persistproxy.errors import ConfigError
from persistproxy.logs import make_event_log
from persistproxy.tap import protocol_plugins
from persistproxy.upstream.group import Server, UpstreamGroup

VALIDATORS = {name: p.validate for name, p in protocol_plugins().items()}


def _group(
    weights: tuple[int, ...] = (1, 1, 1),
    backups: tuple[bool, ...] = (),
    rng: random.Random | None = None,
    **kw: Any,
) -> UpstreamGroup[Any]:
    config = UpstreamConfig(
        name="app",
        servers=tuple(("10.0.0.1", 8000 + i) for i in range(len(weights))),
        weights=weights,
        backups=backups,
        **kw,
    )
    servers = [
        Server(h, p, None, 1, 10, None, weights[i], bool(backups and backups[i]))  # type: ignore[arg-type]
        for i, (h, p) in enumerate(config.servers)
    ]
    return UpstreamGroup(
        Clock(),
        config,
        servers,
        make_event_log(io.StringIO()),
        lambda server: lambda: None,
        rng=rng,
    )


def _names(group: UpstreamGroup[Any], n: int, client: str | None = None) -> str:
    """The servers picked, as letters: a for the first, b for the second..."""
    return "".join(chr(ord("a") + group.pools.index(group.pick(client))) for _ in range(n))


def test_round_robin_is_nginx_smooth_weighted() -> None:
    group = _group((5, 1, 1))
    assert _names(group, 14) == "aabacaa" * 2


def test_round_robin_equal_weights_goes_round() -> None:
    assert _names(_group((1, 1, 1)), 6) == "abcabc"


def test_a_backup_is_used_only_while_no_other_server_is_up() -> None:
    group = _group((1, 1, 1), backups=(False, False, True))
    assert _names(group, 4) == "abab"
    group.servers[0].health.failed(0)
    assert _names(group, 2) == "bb"
    group.servers[1].health.failed(0)
    assert _names(group, 2) == "cc"


def test_least_conn_takes_the_fewest_connections_for_the_weight() -> None:
    group = _group((1, 1, 2), balance="least_conn")
    group.pools[0].active, group.pools[1].active, group.pools[2].active = 3, 1, 3
    assert _names(group, 2) == "bb"
    group.pools[1].active = 2  # 2/1 > 3/2: the heavy server has room
    assert _names(group, 1) == "c"
    group.pools[0].active = group.pools[1].active = 0
    group.pools[2].active = 0
    # Ties go weighted round-robin among the tied.
    counts = Counter(_names(group, 40))
    assert counts == {"c": 20, "a": 10, "b": 10}


def test_least_conn_counts_the_pools_of_every_protocol() -> None:
    group = _group((1, 1), balance="least_conn")
    other = _group((1, 1), balance="least_conn")
    # Another protocol's group over the same servers.
    for server, pool in zip(group.servers, other.pools, strict=True):
        server.pools.append(pool)
    other.pools[0].active = 5
    group.pools[1].active = 1
    assert _names(group, 3) == "bbb"


def test_ip_hash_keeps_a_client_on_its_server_and_spreads_clients() -> None:
    group = _group((1, 1, 1), balance="ip_hash")
    clients = [f"192.0.2.{i}" for i in range(300)]
    first = {c: _names(group, 1, c) for c in clients}
    assert all(_names(group, 3, c) == first[c] * 3 for c in clients[:20])
    spread = Counter(first.values())
    print("ip_hash, 300 clients over 3 servers:", dict(spread))
    assert set(spread) == {"a", "b", "c"} and min(spread.values()) > 60


def test_ip_hash_moves_only_the_clients_of_a_server_that_went_down() -> None:
    group = _group((1, 1, 1), balance="ip_hash")
    clients = [f"198.51.100.{i}" for i in range(200)]
    before = {c: _names(group, 1, c) for c in clients}
    group.servers[1].health.failed(0)
    after = {c: _names(group, 1, c) for c in clients}
    moved = [c for c in clients if before[c] != after[c]]
    assert moved and all(before[c] == "b" for c in moved)
    assert "b" not in after.values()


def test_ip_hash_without_a_client_goes_round_robin() -> None:
    assert _names(_group((1, 1), balance="ip_hash"), 4) == "abab"


def test_ip_hash_follows_the_weights() -> None:
    group = _group((1, 3), balance="ip_hash")
    spread = Counter(_names(group, 1, f"203.0.113.{i}:{j}") for i in range(100) for j in range(4))
    print("ip_hash, weights 1:3 over 400 clients:", dict(spread))
    assert 60 < spread["a"] < 140


def test_random_two_takes_the_less_loaded_of_two_random_servers() -> None:
    group = _group((1, 1, 1), rng=random.Random(7), balance="random_two")
    group.pools[0].active, group.pools[1].active, group.pools[2].active = 0, 5, 10
    counts = Counter(_names(group, 300))
    print("random_two, loads 0/5/10:", dict(counts))
    # The most loaded one never wins a pair; the idle one wins every pair it is in (2/3).
    assert "c" not in counts
    assert counts["a"] > counts["b"] > 0


def test_random_two_with_equal_load_spreads() -> None:
    group = _group((1, 1, 1), rng=random.Random(3), balance="random_two")
    counts = Counter(_names(group, 300))
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 60


def test_the_http_exchange_passes_the_client_address() -> None:
    h = Harness(
        upstream={
            "servers": tuple(("127.0.0.1", 8081 + i) for i in range(4)),
            "balance": "ip_hash",
        }
    )
    seen = set()
    for _ in range(4):
        client, _ = h.client()  # always from 10.1.2.3
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        h.origin.respond(OK_RESPONSE)
        seen.add(h.origin.ports[-1])
    assert len(seen) == 1


# -- configuration --------------------------------------------------------------------------

BASE = """
[[listener]]
name = "web"
bind = "tcp:8080:interface=127.0.0.1"
upstream = "app"

[[upstream]]
name = "app"
"""


def _load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "p.toml"
    path.write_text(BASE + text)
    return load_config(path, VALIDATORS)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_servers_may_be_tables_with_weight_and_backup(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        'balance = "least_conn"\nservers = ["127.0.0.1:1", { address = "[::1]:2", weight = 3 },'
        ' { address = "h:3", backup = true }]\n',
    )
    up = config.upstreams["app"]
    assert up.servers == (("127.0.0.1", 1), ("::1", 2), ("h", 3))
    assert (up.balance, up.weights, up.backups) == ("least_conn", (1, 3, 1), (False, False, True))
    # The effective configuration loads to the same.
    path = tmp_path / "effective.toml"
    path.write_text(effective_toml(config))
    assert load_config(path, VALIDATORS).upstreams["app"] == up


def test_plain_servers_keep_defaults(tmp_path: Path) -> None:
    up = _load(tmp_path, 'servers = ["127.0.0.1:1"]\n').upstreams["app"]
    assert (up.balance, up.weights, up.backups) == ("round_robin", (), ())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('balance = "fair"\nservers = ["a:1"]', "upstream.app.balance: expected one of"),
        ('servers = [{ address = "a:1", weight = 0 }]', "servers[0].weight: must be >= 1"),
        ('servers = ["a:1", { address = "a" }]', "upstream.app.servers[1].address: expected"),
        ('servers = ["a:1", { address = "a:2", wieght = 2 }]', "servers[1].wieght: unknown key"),
        ("servers = [{ weight = 2 }]", "servers[0].address: required key is missing"),
        ('servers = [{ address = "a:1", backup = true }]', "every server is a backup"),
        ("servers = [1]", "upstream.app.servers[0]: expected"),
        ("servers = []", "upstream.app.servers: expected a non-empty list"),
    ],
)
def test_bad_servers_and_balance(tmp_path: Path, text: str, problem: str) -> None:
    assert problem in _error(tmp_path, text + "\n")


def test_health_check_table_defaults_and_errors(tmp_path: Path) -> None:
    up = _load(tmp_path, 'servers = ["a:1"]\nhealth_check = {}\n').upstreams["app"]
    check = up.health_check
    assert (check.path, check.interval, check.timeout, check.rise, check.fall, check.expect) == (
        "/healthz",
        5,
        2,
        2,
        3,
        200,
    )
    assert _load(tmp_path, 'servers = ["a:1"]\n').upstreams["app"].health_check is None
    for text, problem in [
        ("{ rise = 0 }", "upstream.app.health_check.rise: must be >= 1, got 0"),
        ("{ interval = 0 }", "upstream.app.health_check.interval: must be > 0"),
        ('{ path = "healthz" }', "upstream.app.health_check.path: expected an absolute path"),
        ("{ expect = 700 }", "upstream.app.health_check.expect: expected an HTTP status"),
        ("{ tries = 1 }", "upstream.app.health_check.tries: unknown key"),
        ("true", "upstream.app.health_check: expected a table"),
    ]:
        assert problem in _error(tmp_path, f'servers = ["a:1"]\nhealth_check = {text}\n')
    config = _load(
        tmp_path, 'servers = ["a:1"]\nhealth_check = { path = "/up", interval = 1, expect = 204 }\n'
    )
    path = tmp_path / "effective.toml"
    path.write_text(effective_toml(config))
    assert load_config(path, VALIDATORS).upstreams["app"] == config.upstreams["app"]
