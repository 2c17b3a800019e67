"""
The twistd plugin's command line, as an operator meets it: --check and what it says,
--check --verbose (the effective configuration), --example-config, --demo --port, addresses
bound twice, relative file names, a daemon without a log file, and a start-up failure.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor  # noqa: F401  (installed here: postOptions keeps it)

from persistproxy.config import load_config
from persistproxy.errors import StartupError
from persistproxy.logs import make_event_log
from persistproxy.net.sockopts import with_default_backlog
from persistproxy.tap import Options, _Root, example_config

ETC = Path(__file__).resolve().parents[2] / "etc" / "persistproxy.toml"

CONFIG = """
[metrics]
bind = "tcp:9100:interface=127.0.0.1"

[[listener]]
name = "web"
bind = "tcp:8080:interface=127.0.0.1"
upstream = "app"
tcp_keepalive = { idle = 60 }

[[upstream]]
name = "app"
servers = ["127.0.0.1:8081", "[::1]:8082"]
"""


def _options(*args: str, parent: dict[str, Any] | None = None) -> Options:
    options = Options()
    if parent is not None:
        options.parent = parent  # type: ignore[attr-defined]
    options.parseOptions(list(args))
    return options


def _run(capfd: pytest.CaptureFixture[str], *args: str, **kw: Any) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit:
        _options(*args, **kw)
    out, err = capfd.readouterr()
    return int(exit.value.code or 0), out, err


def _write(tmp_path: Path, text: str, name: str = "pp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_says_what_would_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, CONFIG)
    status, out, err = _run(capfd, "--check", "--config", str(path))
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"persistproxy: {path}: configuration OK"
    assert lines[1].startswith("  listener web: http on tcp:8080:interface=127.0.0.1 (backlog 511)")
    assert "to upstream app" in lines[1]
    assert lines[2].startswith("  upstream app: 127.0.0.1:8081, [::1]:8082; pool_size 256")
    assert lines[3] == "  metrics: tcp:9100:interface=127.0.0.1: /metrics /healthz /readyz /status"
    assert lines[4].startswith("  log: level info, format auto, access lines to stdout")
    assert lines[5] == f"  relative file names resolve against {tmp_path}"


def test_check_verbose_prints_the_effective_configuration_which_loads_the_same(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, CONFIG)
    status, out, _ = _run(capfd, "--check", "--verbose", "--config", str(path))
    assert status == 0
    effective = out[out.index("# persistproxy: the effective configuration") :]
    document = tomllib.loads(effective)
    listener = document["listener"][0]
    assert listener["keepalive_timeout"] == 75.0 and listener["max_connections"] == 10000
    assert listener["bind"] == "tcp:8080:interface=127.0.0.1:backlog=511"
    assert listener["tcp_keepalive"] == {"idle": 60, "interval": 75, "count": 10}
    assert document["upstream"][0]["servers"] == ["127.0.0.1:8081", "[::1]:8082"]
    assert document["log"] == {
        "level": "info",
        "format": "auto",
        "access_log": "stdout",
        "buffer_size": 1048576,
    }
    original = load_config(path)
    again = load_config(_write(tmp_path, effective, "effective.toml"))
    expected = dataclasses.replace(
        original,
        listeners=tuple(
            dataclasses.replace(lc, bind=with_default_backlog(lc.bind)) for lc in original.listeners
        ),
        source=again.source,
    )
    assert again == expected


def test_check_verbose_writes_tls_and_plugin_keys(tmp_path: Path) -> None:
    from persistproxy.check import effective_toml

    config = load_config(_write(tmp_path, CONFIG))
    listener = dataclasses.replace(
        config.listeners[0],
        tls={"certificates": [{"cert": "/c.pem", "key": "/c.key"}], "alpn": ["http/1.1"]},
        extra={"greeting": 'say "hi"'},
    )
    text = effective_toml(dataclasses.replace(config, listeners=(listener,)))
    document = tomllib.loads(text)
    assert document["listener"][0]["greeting"] == 'say "hi"'
    assert document["listener"][0]["tls"]["certificates"] == [{"cert": "/c.pem", "key": "/c.key"}]


@pytest.mark.parametrize(
    ("first", "second", "clash"),
    [
        ("tcp:8080", "tcp:8080:interface=127.0.0.1", True),
        ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1:backlog=9", True),
        ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.2", False),
        ("tcp:8080:interface=127.0.0.1", "tcp:8081:interface=127.0.0.1", False),
        ("tcp:0", "tcp:0", False),
        ("tcp6:8080", "tcp:8080:interface=127.0.0.1", True),
        ("tcp6:8080:interface=\\:\\:1", "tcp:8080:interface=127.0.0.1", False),
        ("unix:/run/pp.sock", "unix:/run/pp.sock", True),
        ("unix:/run/pp.sock", "unix:/run/other.sock", False),
        ("systemd:domain=INET:name=web", "systemd:domain=INET:name=web", True),
        ("systemd:domain=INET:name=web", "systemd:domain=INET:name=api", False),
    ],
)
def test_two_listeners_on_one_address_are_a_config_error(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], first: str, second: str, clash: bool
) -> None:
    text = (
        f'[[listener]]\nname = "a"\nbind = {first!r}\nupstream = "app"\n'
        f'[[listener]]\nname = "b"\nbind = {second!r}\nupstream = "app"\n'
        '[[upstream]]\nname = "app"\nservers = ["127.0.0.1:1"]\n'
    ).replace("'", '"')
    text = text.replace("\\", "\\\\")
    path = _write(tmp_path, text)
    status, out, err = _run(capfd, "--check", "--config", str(path))
    if clash:
        assert status == 2 and out == ""
        assert (
            err == f"persistproxy: {path}: listener.b.bind: the same address as listener.a.bind\n"
        )
    else:
        assert status == 0, err


def test_the_metrics_listener_may_not_share_a_listeners_address(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, CONFIG.replace("tcp:9100:", "tcp:8080:"))
    status, _, err = _run(capfd, "--check", "--config", str(path))
    assert status == 2
    assert err == f"persistproxy: {path}: metrics.bind: the same address as listener.web.bind\n"


def test_relative_file_names_are_relative_to_the_configuration_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    etc = tmp_path / "etc"
    (etc / "logs").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = _write(etc, '[log]\naccess_log = "logs/access.log"\n' + CONFIG)
    assert load_config(path).access_log_file == str(etc / "logs" / "access.log")
    status, out, _ = _run(capfd, "--check", "--verbose", "--config", "../etc/pp.toml")
    assert status == 0
    assert f'access_log = "{etc}/logs/access.log"' in out
    assert f"relative file names resolve against {etc}" in out


def test_example_config_prints_the_sample_which_is_valid(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(capfd, "--example-config")
    assert status == 0 and out == ETC.read_text() == example_config()
    path = _write(tmp_path, out)
    assert _run(capfd, "--check", "--config", str(path))[0] == 0


def test_demo_takes_a_port(capfd: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capfd, "--demo", "--port", "18181", "--check", "--verbose")
    assert status == 0 and 'bind = "tcp:18181:interface=127.0.0.1:backlog=511"' in out
    status, _, err = _run(capfd, "--demo", "--port", "70000")
    assert status == 2 and "--port: expected 0 to 65535" in err


def test_a_daemon_needs_a_log_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, CONFIG)
    parent: dict[str, Any] = {"nodaemon": False, "logfile": None, "logger": None, "syslog": 0}
    status, out, err = _run(capfd, "--config", str(path), parent=parent)
    assert status == 2 and out == ""
    assert err.startswith("persistproxy: twistd without -n (--nodaemon) needs --logfile=FILE")
    parent["logfile"] = "pp.log"
    options = _options("--config", str(path), parent=parent)
    assert options.daemon and options.log_file == os.path.abspath("pp.log")
    assert parent["logger"] == "persistproxy.logs.twisted_observer"
    parent = {"nodaemon": True, "logfile": None, "logger": None, "syslog": 0}
    options = _options("--config", str(path), parent=parent)
    assert not options.daemon and options.log_file is None


def test_a_start_up_failure_is_one_line_on_stderr_naming_the_file(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from twisted.application.service import Service

    class Busy(Service):
        def privilegedStartService(self) -> None:
            raise StartupError("listener.web.bind: cannot listen on 'tcp:80': Address in use")

    root = _Root("/etc/pp.toml", False, make_event_log(open(os.devnull, "w")))  # noqa: SIM115
    Busy().setServiceParent(root)
    with pytest.raises(SystemExit) as exit:
        root.privilegedStartService()
    assert exit.value.code == 1
    out, err = capfd.readouterr()
    assert out == ""
    assert err == (
        "persistproxy: /etc/pp.toml: listener.web.bind: cannot listen on 'tcp:80': Address in use\n"
    )
    daemon = _Root("/etc/pp.toml", True, make_event_log(open(os.devnull, "w")))  # noqa: SIM115
    Busy().setServiceParent(daemon)
    with pytest.raises(RuntimeError, match=r"^persistproxy: /etc/pp\.toml: listener\.web\.bind"):
        daemon.privilegedStartService()  # twistd hands the message to the waiting parent
