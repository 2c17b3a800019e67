"""
Configuration: defaults, and one line naming the file, the key and the problem for each
kind of mistake, before anything binds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from persistproxy.config import ConfigError, load_config, parse_config
from persistproxy.tap import protocol_plugins

VALIDATORS = {name: p.validate for name, p in protocol_plugins().items()}

GOOD = """
[[listener]]
name = "web"
bind = "tcp:8080:interface=127.0.0.1"
upstream = "app"

[[upstream]]
name = "app"
servers = ["127.0.0.1:8081", "[::1]:8082"]
"""


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return load_config(path, VALIDATORS)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "p.toml") + ": ")
    return message


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    config = _load(tmp_path, GOOD)
    listener = config.listeners[0]  # type: ignore[attr-defined]
    assert (listener.keepalive_timeout, listener.max_requests) == (75, 1000)
    assert (listener.max_head_size, listener.header_timeout, listener.body_timeout) == (
        16384,
        10,
        60,
    )
    up = config.upstreams["app"]  # type: ignore[attr-defined]
    assert up.servers == (("127.0.0.1", 8081), ("::1", 8082))
    assert (up.pool_size, up.idle_timeout, up.max_requests) == (256, 60, 1000)
    assert (up.connect_timeout, up.response_timeout) == (5, 60)


def test_access_flush_is_half_a_second_by_default_and_never_negative(tmp_path: Path) -> None:
    assert _load(tmp_path, GOOD).access_log_flush == 0.5  # type: ignore[attr-defined]
    config = _load(tmp_path, GOOD + "[log]\naccess_flush = 0\n")
    assert config.access_log_flush == 0  # type: ignore[attr-defined]
    assert "log.access_flush: must be >= 0" in _error(tmp_path, GOOD + "[log]\naccess_flush = -1\n")


def test_every_documented_key_in_the_sample_file_is_accepted() -> None:
    sample = Path(__file__).parents[2] / "etc" / "persistproxy.toml"
    config = load_config(sample, VALIDATORS)
    assert config.listeners[0].name == "web"


def test_unknown_key(tmp_path: Path) -> None:
    message = _error(
        tmp_path, GOOD.replace('upstream = "app"\n', 'upstream = "app"\nkeepalive = 3\n', 1)
    )
    assert "listener.web.keepalive: unknown key" in message
    message = _error(tmp_path, GOOD + "pool = 3\n")
    assert "upstream.app.pool: unknown key" in message
    assert "nonsense: unknown key" in _error(tmp_path, "nonsense = 1\n" + GOOD)


def test_wrong_type(tmp_path: Path) -> None:
    text = GOOD.replace('upstream = "app"\n', 'upstream = "app"\nkeepalive_timeout = "75"\n', 1)
    assert "listener.web.keepalive_timeout: expected a number of seconds" in _error(tmp_path, text)
    text = GOOD.replace('upstream = "app"\n', 'upstream = "app"\nmax_requests = true\n', 1)
    assert "listener.web.max_requests: expected an integer" in _error(tmp_path, text)
    text = GOOD.replace('upstream = "app"\n', 'upstream = "app"\nheader_timeout = -1\n', 1)
    assert "listener.web.header_timeout: must be >= 0" in _error(tmp_path, text)


def test_undefined_upstream_and_bad_servers(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace('upstream = "app"', 'upstream = "api"', 1))
    assert "listener.web.upstream: no [[upstream]] is named 'api'" in message
    message = _error(tmp_path, GOOD.replace('"127.0.0.1:8081"', '"127.0.0.1"'))
    assert "upstream.app.servers: expected host:port" in message


def test_bad_endpoint_string(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("tcp:8080", "tcp:eighty"))
    assert "listener.web.bind: bad endpoint 'tcp:eighty" in message
    assert "listener.web.bind: bad endpoint" in _error(
        tmp_path, GOOD.replace("tcp:8080", "tpc:8080")
    )


def test_missing_and_duplicate(tmp_path: Path) -> None:
    assert "listener: at least one [[listener]] is required" in _error(tmp_path, "")
    message = _error(tmp_path, GOOD.replace('bind = "tcp:8080:interface=127.0.0.1"\n', ""))
    assert "listener.web.bind: required key is missing" in message
    text = GOOD + '\n[[upstream]]\nname = "app"\nservers = ["a:1"]\n'
    assert "duplicate name 'app'" in _error(tmp_path, text)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.toml: cannot read"):
        load_config(tmp_path / "nope.toml", VALIDATORS)
    assert "not valid TOML" in _error(tmp_path, "[[listener]\n")


def test_without_plugins_only_builtin_keys_are_accepted() -> None:
    doc = {"listener": [{"bind": "tcp:0", "weird": 1}]}
    with pytest.raises(ConfigError, match=r"listener\.listener0\.weird: unknown key"):
        parse_config(doc)


def test_header_count_and_chunk_size_limits(tmp_path: Path) -> None:
    config = _load(tmp_path, GOOD)
    listener = config.listeners[0]  # type: ignore[attr-defined]
    assert (listener.max_header_count, listener.min_chunk_size) == (100, 16)
    assert config.upstreams["app"].max_header_count == 100  # type: ignore[attr-defined]
    text = GOOD.replace('upstream = "app"\n', 'upstream = "app"\nmax_header_count = 0\n', 1)
    assert "listener.web.max_header_count: must be >= 1, got 0" in _error(tmp_path, text)
    text = GOOD.replace('upstream = "app"\n', 'upstream = "app"\nmin_chunk_size = -1\n', 1)
    assert "listener.web.min_chunk_size: must be >= 0, got -1" in _error(tmp_path, text)
    text = GOOD + "max_header_count = 1.5\n"
    assert "upstream.app.max_header_count: expected an integer" in _error(tmp_path, text)
