"""
The twistd plugin's command line and service tree (tap.py): the configuration is loaded and
checked in C{postOptions}, before twistd daemonizes or binds; C{--check}, C{--demo} and
C{--version}; our JSON log observer for twistd's own events; and C{makeService} putting the
signal handlers (SIGUSR1, SIGHUP) before the listeners, with the metrics listener when
configured.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.testing import MemoryReactorClock

from persistproxy import __version__, tap
from persistproxy.logs import FileSink, LogOutput, LogReopener
from persistproxy.notify import NotifyService
from persistproxy.reload import ConfigReloader
from persistproxy.service import ProxyService
from persistproxy.tap import Options, makeService, protocol_plugins
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
    assert capsys.readouterr().out == f"persistproxy: {path}: configuration OK\n"


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
    assert capsys.readouterr().out == "persistproxy: <demo>: configuration OK\n"


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
        ({"logger": None, "logfile": "/var/log/twistd.log"}, None),
        ({"logger": "my.observer", "logfile": None}, "my.observer"),
    ],
)
def test_twistds_own_events_are_json_lines_unless_told_otherwise(
    tmp_path: Path, parent: dict[str, Any], logger: str | None
) -> None:
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
