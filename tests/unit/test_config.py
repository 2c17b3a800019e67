"""
Configuration: defaults, and one line naming the file, the key and the problem for each
kind of mistake, before anything binds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    assert (up.keepalive_margin, up.idle_learn_window, up.assumed_idle_limit) == (1, 60, 1)


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


def test_idle_limit_keys_are_validated(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD + "idle_learn_window = -1\n")
    assert "upstream.app.idle_learn_window: must be >= 0, got -1" in message
    message = _error(tmp_path, GOOD + 'assumed_idle_limit = "1s"\n')
    assert "upstream.app.assumed_idle_limit: expected a number of seconds" in message
    config = _load(tmp_path, GOOD + "idle_learn_window = 0\nassumed_idle_limit = 2.5\n")
    up = config.upstreams["app"]  # type: ignore[attr-defined]
    assert (up.idle_learn_window, up.assumed_idle_limit) == (0, 2.5)


def test_passive_health_keys_are_validated(tmp_path: Path) -> None:
    up = _load(tmp_path, GOOD).upstreams["app"]  # type: ignore[attr-defined]
    assert (up.max_fails, up.fail_timeout) == (1, 10)
    message = _error(tmp_path, GOOD + "max_fails = -1\n")
    assert "upstream.app.max_fails: must be >= 0, got -1" in message
    message = _error(tmp_path, GOOD + 'fail_timeout = "10s"\n')
    assert "upstream.app.fail_timeout: expected a number of seconds" in message
    config = _load(tmp_path, GOOD + "max_fails = 3\nfail_timeout = 30\n")
    up = config.upstreams["app"]  # type: ignore[attr-defined]
    assert (up.max_fails, up.fail_timeout) == (3, 30)


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


def test_log_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config: Any = _load(tmp_path, GOOD)
    assert (config.access_log_file, config.log_buffer_size) == ("", 1048576)
    config = _load(tmp_path, '[log]\naccess_log = "stdout"\nbuffer_size = 65536\n' + GOOD)
    assert (config.access_log_file, config.log_buffer_size) == ("", 65536)
    # A relative file is relative to the configuration file's directory, wherever twistd
    # starts (made absolute before any chdir).
    (tmp_path / "logs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = _load(tmp_path, '[log]\naccess_log = "logs/access.log"\n' + GOOD)
    assert config.access_log_file == str(tmp_path / "logs" / "access.log")


def test_bad_log_outputs(tmp_path: Path) -> None:
    def log(text: str) -> str:
        return _error(tmp_path, "[log]\n" + text + "\n" + GOOD)

    missing = tmp_path / "missing"
    assert f"log.access_log: directory {missing} does not exist" in log(
        f'access_log = "{missing}/access.log"'
    )
    assert f"log.access_log: {tmp_path} is a directory" in log(f'access_log = "{tmp_path}"')
    assert 'log.access_log: expected "stdout" or a file name' in log('access_log = ""')
    assert "log.access_log: expected a string, got True" in log("access_log = true")
    assert "log.buffer_size: must be >= 65536, got 4096" in log("buffer_size = 4096")
    assert "log.buffer: unknown key" in log("buffer = 4096")
    assert "File name too long" in log(f'access_log = "{"x" * 300}/access.log"')


# -- endpoint strings: Twisted's public parser, without binding ----------------------------


def _bind_error(tmp_path: Path, bind: str) -> str:
    return _error(tmp_path, GOOD.replace("tcp:8080:interface=127.0.0.1", bind))


def test_an_unknown_endpoint_option_is_named_not_a_python_error(tmp_path: Path) -> None:
    message = _bind_error(tmp_path, "tcp:8080:interfce=127.0.0.1")
    assert message.endswith(
        "listener.web.bind: bad endpoint 'tcp:8080:interfce=127.0.0.1': unknown option 'interfce'"
    )
    assert "unknown option 'mode'" in _bind_error(tmp_path, "tcp6:8080:mode=1")
    assert "unknown option 'lockfil'" in _bind_error(tmp_path, "unix:/run/pp.sock:lockfil=0")
    text = GOOD + '\n[metrics]\nbind = "tcp:9100:foo=1"\n'
    assert "metrics.bind: bad endpoint 'tcp:9100:foo=1': unknown option 'foo'" in _error(
        tmp_path, text
    )
    # An unescaped colon in a value (IPv6) reads as more arguments: the error says how.
    message = _bind_error(tmp_path, "tcp6:8080:interface=::1")
    assert "'interface' is given twice (a colon inside a value is written \\:)" in message


def test_an_endpoint_port_must_be_a_number_from_0_to_65535(tmp_path: Path) -> None:
    for bind in ("tcp:65536", "tcp:eighty", "tcp6:99999", "ssl:70000", "tcp:port=-1"):
        port = bind.split(":")[1].removeprefix("port=")
        assert _bind_error(tmp_path, bind).endswith(
            f"bad endpoint {bind!r}: port {port!r} is not a number from 0 to 65535"
        ), bind
    assert "missing port" in _bind_error(tmp_path, "tcp")
    for bind in ("tcp:0", "tcp:65535:interface=127.0.0.1", "tcp6:8080:interface=\\:\\:1"):
        _load(tmp_path, GOOD.replace("tcp:8080:interface=127.0.0.1", bind.replace("\\", "\\\\")))


def test_other_endpoint_mistakes_are_one_line(tmp_path: Path) -> None:
    assert _bind_error(tmp_path, "tcp:80:backlog=many").endswith("'many' is not a number")
    assert _bind_error(tmp_path, "tcp:80:1:2:3").endswith("too many arguments")
    assert "Unknown endpoint type: 'tpc'" in _bind_error(tmp_path, "tpc:80")
    missing = tmp_path / "missing.pem"
    assert "No such file or directory" in _bind_error(tmp_path, f"ssl:443:privateKey={missing}")


def test_systemd_endpoints_are_checked_by_hand_without_their_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A systemd: endpoint looks up its inherited socket when it is built, which --check (or a
    check before the socket unit started) does not have: it is never built at check time.
    """
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    [parser] = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "systemd"]

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("a systemd endpoint was built at check time")

    monkeypatch.setattr(type(parser), "parseStreamServer", built)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_FDNAMES", raising=False)
    for bind in (
        "systemd:domain=INET:name=web",
        "systemd:domain=INET6:index=0",
        "systemd:domain=UNIX:index=1",
        "systemd:INET:0",
    ):
        _load(tmp_path, GOOD.replace("tcp:8080:interface=127.0.0.1", bind))
    bad = {
        "systemd:name=web": "missing domain (INET, INET6 or UNIX)",
        "systemd:domain=inet:name=web": "domain 'inet' is not INET, INET6 or UNIX",
        "systemd:domain=INET": "give exactly one of index (a number) or name",
        "systemd:domain=INET:index=0:name=web": "give exactly one of index (a number) or name",
        "systemd:domain=INET:index=first": "index 'first' is not a number",
        "systemd:domain=INET:name=web:mode=660": "unknown option 'mode'",
        "systemd:domain=INET:name=": "name is empty",
        "systemd:INET:0:web:extra": "too many arguments",
        "systemd:INET:domain=INET6:name=web": "'domain' is given twice",
    }
    for bind, problem in bad.items():
        message = _bind_error(tmp_path, bind)
        assert message.startswith(
            f"{tmp_path / 'p.toml'}: listener.web.bind: bad endpoint {bind!r}: "
        )
        assert problem in message, (bind, message)


def test_stall_timeouts_and_minimum_rates(tmp_path: Path) -> None:
    config: Any = _load(tmp_path, GOOD)
    up = config.upstreams["app"]
    assert (up.read_timeout, up.write_timeout) == (60, 60)
    listener = config.listeners[0]
    assert (listener.min_body_rate, listener.min_body_rate_window) == (0, 10)
    assert (listener.min_send_rate, listener.min_send_rate_window) == (0, 10)

    def listener_error(line: str) -> str:
        text = GOOD.replace('upstream = "app"\n', f'upstream = "app"\n{line}\n', 1)
        return _error(tmp_path, text)

    assert "listener.web.min_body_rate: must be >= 0, got -1" in listener_error(
        "min_body_rate = -1"
    )
    assert "listener.web.min_send_rate: expected an integer, got 1.5" in listener_error(
        "min_send_rate = 1.5"
    )
    assert "listener.web.min_body_rate_window: must be > 0, got 0" in listener_error(
        "min_body_rate_window = 0"
    )
    assert "listener.web.min_send_rate_window: must be >= 0, got -2" in listener_error(
        "min_send_rate_window = -2"
    )
    assert "upstream.app.read_timeout: must be >= 0, got -1" in _error(
        tmp_path, GOOD + "read_timeout = -1\n"
    )
    assert "upstream.app.write_timeout: expected a number of seconds" in _error(
        tmp_path, GOOD + 'write_timeout = "60"\n'
    )
    text = GOOD.replace(
        'upstream = "app"\n', 'upstream = "app"\nmin_body_rate = 1024\nmin_send_rate = 4096\n', 1
    )
    listener = _load(tmp_path, text).listeners[0]  # type: ignore[attr-defined]
    assert (listener.min_body_rate, listener.min_send_rate) == (1024, 4096)


def test_a_minimal_file_gets_every_default_of_the_config_classes() -> None:
    """Defaults are written once, as the config dataclasses' field defaults: a file that sets
    nothing but the required keys gets exactly those."""
    import dataclasses

    from persistproxy.config import ListenerConfig, ProxyConfig, UpstreamConfig

    doc = {
        "listener": [{"name": "web", "bind": "tcp:0", "upstream": "app"}],
        "upstream": [{"name": "app", "servers": ["127.0.0.1:1"]}],
    }
    config = parse_config(doc, "<test>")
    for cls, value in (
        (ListenerConfig, config.listeners[0]),
        (UpstreamConfig, config.upstreams["app"]),
        (ProxyConfig, config),
    ):
        for f in dataclasses.fields(cls):
            skip = ("source", "base", "upstream")  # what the file itself sets
            if f.default is not dataclasses.MISSING and f.name not in skip:
                assert getattr(value, f.name) == f.default, (cls.__name__, f.name)


# -- the PROXY protocol ----------------------------------------------------------------------


def test_proxy_protocol_is_off_by_default_and_trusts_only_this_host_once_on(
    tmp_path: Path,
) -> None:
    config: Any = _load(tmp_path, GOOD)
    listener = config.listeners[0]
    assert listener.proxy_protocol is False
    assert config.upstreams["app"].send_proxy_protocol == ""
    text = GOOD.replace('upstream = "app"\n', 'upstream = "app"\nproxy_protocol = true\n', 1)
    on: Any = _load(tmp_path, text)
    assert on.listeners[0].proxy_protocol is True
    assert on.listeners[0].proxy_protocol_from == ("127.0.0.0/8", "::1/128")


def test_proxy_protocol_keys_are_read_and_checked(tmp_path: Path) -> None:
    listener = 'upstream = "app"\nproxy_protocol = true\n'
    text = GOOD.replace('upstream = "app"\n', listener, 1)
    nets = text.replace(
        "proxy_protocol = true\n",
        'proxy_protocol = true\nproxy_protocol_from = ["10.0.0.1/8", "2001:db8::1", "192.0.2.7"]\n',
    )
    config: Any = _load(tmp_path, nets + 'send_proxy_protocol = "v2"\n')
    assert config.listeners[0].proxy_protocol_from == (
        "10.0.0.0/8",
        "2001:db8::1/128",
        "192.0.2.7/32",
    )
    assert config.upstreams["app"].send_proxy_protocol == "v2"
    off: Any = _load(tmp_path, GOOD + "send_proxy_protocol = false\n")
    assert off.upstreams["app"].send_proxy_protocol == ""
    off = _load(tmp_path, GOOD + 'send_proxy_protocol = ""\n')  # as --check --verbose says it
    assert off.upstreams["app"].send_proxy_protocol == ""
    default = 'upstream = "app"\nproxy_protocol_from = ["127.0.0.0/8", "::1/128"]\n'
    assert _load(tmp_path, GOOD.replace('upstream = "app"\n', default, 1))


SEND = 'upstream.app.send_proxy_protocol: expected "v1" or "v2", '


@pytest.mark.parametrize(
    ("listener", "upstream", "error"),
    [
        ("proxy_protocol = 1", "", "listener.web.proxy_protocol: expected true or false, got 1"),
        (
            'proxy_protocol_from = ["10.0.0.0/8"]',
            "",
            "listener.web.proxy_protocol_from: set, but proxy_protocol is false",
        ),
        (
            'proxy_protocol = true\nproxy_protocol_from = ["10.0.0.0/33"]',
            "",
            "listener.web.proxy_protocol_from: '10.0.0.0/33' is not an IP network",
        ),
        (
            'proxy_protocol = true\nproxy_protocol_from = ["lb.example"]',
            "",
            "listener.web.proxy_protocol_from: 'lb.example' is not an IP network",
        ),
        (
            "proxy_protocol = true\nproxy_protocol_from = []",
            "",
            "listener.web.proxy_protocol_from: expected a non-empty list of strings, got []",
        ),
        (
            "proxy_protocol = true\nheader_timeout = 0",
            "",
            "listener.web.header_timeout: must be > 0 with proxy_protocol = true",
        ),
        ("", 'send_proxy_protocol = "v3"', SEND + "got 'v3'"),
        ("", "send_proxy_protocol = true", SEND + "got True"),
    ],
)
def test_proxy_protocol_mistakes_are_one_line(
    tmp_path: Path, listener: str, upstream: str, error: str
) -> None:
    text = GOOD.replace('upstream = "app"\n', f'upstream = "app"\n{listener}\n', 1)
    message = _error(tmp_path, text + upstream + "\n")
    assert error in message, message


def test_a_tcp_listener_may_set_header_timeout_only_with_proxy_protocol(tmp_path: Path) -> None:
    keys = 'upstream = "app"\nprotocol = "tcp"\nheader_timeout = 3\n'
    tcp = GOOD.replace('upstream = "app"\n', keys, 1)
    assert "header_timeout: an HTTP setting" in _error(tmp_path, tcp)
    on = tcp.replace("header_timeout = 3\n", "header_timeout = 3\nproxy_protocol = true\n")
    config: Any = _load(tmp_path, on)
    assert config.listeners[0].header_timeout == 3
