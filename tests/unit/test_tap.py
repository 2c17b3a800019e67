"""
The twistd plugin's command line and service tree (tap.py): the configuration is loaded and
checked in C{postOptions}, before twistd daemonizes or binds; C{--check}, C{--demo} and
C{--version}; our JSON log observer for twistd's own events; and C{makeService} putting the
signal handlers (SIGUSR1, SIGHUP) before the listeners, with the metrics listener when
configured; and the command line as an operator meets it: --check and what it says,
--check --verbose (the effective configuration), --example-config, --demo --port, addresses
bound twice, relative file names, a daemon without a log file, and a start-up failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.testing import MemoryReactorClock

from persistproxy import __version__, tap
from persistproxy.config import load_config
from persistproxy.errors import StartupError
from persistproxy.log_output import FileSink, LogOutput, LogReopener
from persistproxy.logs import make_event_log
from persistproxy.net.sockopts import with_default_backlog
from persistproxy.notify import NotifyService
from persistproxy.reload import ConfigReloader
from persistproxy.service import ProxyService
from persistproxy.tap import Options, _Root, example_config, makeService, protocol_plugins
from persistproxy.tls.reload import CertificateReloader

CONFIG = """
[[listener]]
name = "web"
bind = "tcp:0:interface=127.0.0.1"
upstream = "app"

[[upstream]]
name = "app"
servers = ["127.0.0.1:8081"]
"""


@pytest.fixture
def no_reactor_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    C{postOptions} installs the proxy's reactor when none is chosen yet; a test process must
    keep its own, so one is said to be chosen.
    """
    if "twisted.internet.reactor" not in sys.modules:
        monkeypatch.setitem(sys.modules, "twisted.internet.reactor", object())  # type: ignore[arg-type]


def _options(*argv: str, parent: dict[str, Any] | None = None) -> Options:
    options = Options()
    if parent is not None:
        options.parent = parent  # type: ignore[attr-defined]
    options.parseOptions(list(argv))
    return options


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "persistproxy.toml"
    path.write_text(text)
    return str(path)


def test_help_text_names_every_option() -> None:
    text = str(Options())
    for option in ("--config=", "--check", "--demo", "--version"):
        assert option in text, text
    assert "etc/persistproxy.toml" in text


def test_check_says_ok_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, CONFIG)
    with pytest.raises(SystemExit) as exit_:
        _options("--config", path, "--check")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"persistproxy: {path}: configuration OK"
    assert "  listener web: http on tcp:0:interface=127.0.0.1" in out


def test_a_bad_config_is_one_line_on_stderr_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, CONFIG.replace('upstream = "app"', 'upstream = "nope"'))
    for argv in (("--config", path, "--check"), ("--config", path)):
        with pytest.raises(SystemExit) as exit_:
            _options(*argv)
        assert exit_.value.code == 2
        out = capsys.readouterr()
        assert out.out == ""
        [line] = out.err.splitlines()
        assert line.startswith(f"persistproxy: {path}: listener.web.upstream"), line


def test_without_config_or_demo_it_says_what_is_required(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _options()
    assert exit_.value.code == 2
    assert "--config FILE is required" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _options("--version")
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"persistproxy {__version__}\n"


def test_the_demo_configuration_is_checked_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _options("--demo", "--check")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "persistproxy: <demo>: configuration OK"
    assert "  listener demo: http on tcp:8080:interface=127.0.0.1 (backlog 511)" in out


@pytest.mark.usefixtures("no_reactor_install")
def test_a_good_config_is_loaded_with_the_installed_plugins(tmp_path: Path) -> None:
    path = _write(tmp_path, CONFIG)
    options = _options("--config", path)
    assert options.proxy_config is not None and options.proxy_config.source == path
    assert [listener.name for listener in options.proxy_config.listeners] == ["web"]
    assert set(options.plugins) == set(protocol_plugins()) and "http" in options.plugins


@pytest.mark.usefixtures("no_reactor_install")
@pytest.mark.parametrize(
    ("parent", "logger"),
    [
        ({"logger": None, "logfile": None}, "persistproxy.logs.twisted_observer"),
        ({"logger": None, "logfile": "-"}, "persistproxy.logs.twisted_observer"),
        # With --logfile, every line goes to that file, Twisted's as ours (JSON).
        ({"logger": None, "logfile": "/var/log/twistd.log"}, "persistproxy.logs.twisted_observer"),
        ({"logger": None, "logfile": None, "syslog": 1}, None),
        ({"logger": "my.observer", "logfile": None}, "my.observer"),
    ],
)
def test_twistds_own_events_are_json_lines_unless_told_otherwise(
    tmp_path: Path, parent: dict[str, Any], logger: str | None
) -> None:
    parent.setdefault("nodaemon", True)
    _options("--config", _write(tmp_path, CONFIG), parent=parent)
    assert parent["logger"] == logger


@pytest.fixture
def stdout_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The process's standard output, as makeService's log sees it, written to a file."""
    path = tmp_path / "stdout.log"
    output = LogOutput("stdout", FileSink(str(path)))
    monkeypatch.setattr(tap, "stdout_output", lambda: output)
    yield path
    assert output.close(5.0), "the log's writer thread wrote everything"


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.usefixtures("no_reactor_install", "stdout_file")
def test_make_service_puts_the_signal_handlers_before_the_listeners(
    tmp_path: Path, global_reactor: MemoryReactorClock
) -> None:
    """
    Services start in order: the SIGUSR1 and SIGHUP handlers are installed before the
    listeners bind, so that neither signal kills a proxy that is already announced; systemd
    hears READY=1 after everything bound (and, services stopping in reverse, STOPPING=1
    before the drain).
    """
    options = _options("--config", _write(tmp_path, CONFIG))
    root = makeService(options)
    services = list(root)  # type: ignore[call-overload]
    assert [type(s) for s in services] == [
        LogReopener,
        CertificateReloader,
        ConfigReloader,
        ProxyService,
        NotifyService,
    ]
    proxy = services[3]
    assert [listener.config.name for listener in proxy.listeners] == ["web"]
    assert global_reactor.tcpServers == [], "nothing binds before the service starts"


@pytest.mark.usefixtures("no_reactor_install", "stdout_file")
def test_make_service_adds_the_metrics_listener_when_configured(
    tmp_path: Path, global_reactor: MemoryReactorClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    (The endpoint itself is served and scraped in tests/e2e/test_metrics.py; it is not built
    here because prometheus_client's Twisted resource imports the global reactor.)
    """
    made: list[tuple[Any, ...]] = []

    def metrics_service(reactor: Any, bind: str, proxy: Any, log: Any, outputs: Any) -> Service:
        made.append((reactor, bind, proxy))
        return Service()

    fake = types.ModuleType("persistproxy.metrics_service")
    fake.metrics_service = metrics_service  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "persistproxy.metrics_service", fake)
    text = '[metrics]\nbind = "tcp:0:interface=127.0.0.1"\n' + CONFIG
    root = makeService(_options("--config", _write(tmp_path, text)))
    services = list(root)  # type: ignore[call-overload]
    assert len(services) == 6 and isinstance(services[3], ProxyService)
    assert isinstance(services[5], NotifyService), "last, after the metrics listener too"
    assert made == [(global_reactor, "tcp:0:interface=127.0.0.1", services[3])]


@pytest.mark.usefixtures("no_reactor_install")
def test_make_service_for_the_demo_binds_the_demo_origin_and_points_the_proxy_at_it(
    global_reactor: MemoryReactorClock, stdout_file: Path
) -> None:
    root = makeService(_options("--demo"))
    [(port, site, _, interface)] = global_reactor.tcpServers
    assert (port, interface) == (0, "127.0.0.1"), "an ephemeral port on loopback"
    assert type(site).__name__ == "_QuietSite"
    [proxy] = [s for s in root if isinstance(s, ProxyService)]  # type: ignore[attr-defined]
    [listener] = proxy.config.listeners
    assert listener.bind == "tcp:8080:interface=127.0.0.1"
    assert proxy.config.upstreams[listener.upstream].servers == (("127.0.0.1", 43210),)
    tap.stdout_output().close(5.0)
    [demo] = [e for e in _events(stdout_file) if e["event"] == "demo.origin"]
    assert demo["port"] == 43210, "the log says where the demo origin is"


# -- what --check says; the operator's command line ------------------------------------------

ETC = Path(__file__).resolve().parents[2] / "etc" / "persistproxy.toml"

FULL_CONFIG = """
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


def _run(capfd: pytest.CaptureFixture[str], *args: str, **kw: Any) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit:
        _options(*args, **kw)
    out, err = capfd.readouterr()
    return int(exit.value.code or 0), out, err


def _write_file(tmp_path: Path, text: str, name: str = "pp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_says_what_would_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = _write_file(tmp_path, FULL_CONFIG)
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
    path = _write_file(tmp_path, FULL_CONFIG)
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
    again = load_config(_write_file(tmp_path, effective, "effective.toml"))
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

    config = load_config(_write_file(tmp_path, FULL_CONFIG))
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
    path = _write_file(tmp_path, text)
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
    path = _write_file(tmp_path, FULL_CONFIG.replace("tcp:9100:", "tcp:8080:"))
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
    path = _write_file(etc, '[log]\naccess_log = "logs/access.log"\n' + FULL_CONFIG)
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
    path = _write_file(tmp_path, out)
    assert _run(capfd, "--check", "--config", str(path))[0] == 0


def test_demo_takes_a_port(capfd: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capfd, "--demo", "--port", "18181", "--check", "--verbose")
    assert status == 0 and 'bind = "tcp:18181:interface=127.0.0.1:backlog=511"' in out
    status, _, err = _run(capfd, "--demo", "--port", "70000")
    assert status == 2 and "--port: expected 0 to 65535" in err


@pytest.mark.usefixtures("no_reactor_install")
def test_a_daemon_needs_a_log_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = _write_file(tmp_path, FULL_CONFIG)
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
