"""
Protocol plugins: discovery through Twisted's plugin system, the built-in HTTP plugin, and
a third-party plugin dropped into a persistproxy/plugins directory on sys.path.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from persistproxy.config import ConfigError, parse_config
from persistproxy.interfaces import IProtocolPlugin
from persistproxy.tap import protocol_plugins

PLUGIN = textwrap.dedent(
    """
    from twisted.internet.protocol import Factory, Protocol
    from twisted.plugin import IPlugin
    from zope.interface import implementer

    from persistproxy.config import ConfigError
    from persistproxy.interfaces import IProtocolPlugin


    class Echo(Protocol):
        def dataReceived(self, data):
            self.transport.write(data)


    @implementer(IPlugin, IProtocolPlugin)
    class EchoPlugin:
        name = "echo-test"

        def validate(self, listener):
            for key, value in listener.extra.items():
                if key != "greeting" or not isinstance(value, str):
                    raise ConfigError(f"{key}: unknown key or not a string")

        def build_factory(self, listener, context):
            return Factory.forProtocol(Echo)


    echo = EchoPlugin()
    """
)


def test_builtin_http_plugin_provides_the_interface() -> None:
    plugins = protocol_plugins()
    assert "http" in plugins
    verifyObject(IProtocolPlugin, plugins["http"])


@pytest.fixture
def third_party_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """
    An echo plugin in a persistproxy/plugins directory on sys.path; its module is forgotten
    afterwards, whatever the test did, so that no later test finds it.
    """
    package = tmp_path / "persistproxy" / "plugins"
    package.mkdir(parents=True)
    (package / "echo_test.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    import persistproxy.plugins

    monkeypatch.setattr(
        persistproxy.plugins, "__path__", [*persistproxy.plugins.__path__, str(package)]
    )
    try:
        yield
    finally:
        sys.modules.pop("persistproxy.plugins.echo_test", None)


@pytest.mark.usefixtures("third_party_plugin")
def test_third_party_plugin_is_found_and_validates_its_own_keys() -> None:
    plugins = protocol_plugins()
    assert "echo-test" in plugins
    validators = {name: p.validate for name, p in plugins.items()}
    doc = {"listener": [{"name": "e", "bind": "tcp:0", "protocol": "echo-test", "greeting": "hi"}]}
    config = parse_config(doc, "x.toml", validators)
    assert config.listeners[0].extra == {"greeting": "hi"}
    doc["listener"][0]["greeting"] = 3
    with pytest.raises(ConfigError, match=r"x.toml: listener.e.greeting: unknown key"):
        parse_config(doc, "x.toml", validators)


def test_unknown_protocol_is_a_config_error() -> None:
    validators = {name: p.validate for name, p in protocol_plugins().items()}
    doc = {"listener": [{"name": "e", "bind": "tcp:0", "protocol": "gopher"}]}
    with pytest.raises(ConfigError, match=r"listener.e.protocol: unknown protocol 'gopher'"):
        parse_config(doc, "x.toml", validators)


def test_the_http_plugin_checks_its_keys_and_answers_refusals_with_503() -> None:
    http = protocol_plugins()["http"]
    doc = {
        "listener": [{"name": "web", "bind": "tcp:0", "upstream": "app"}],
        "upstream": [{"name": "app", "servers": ["127.0.0.1:1"]}],
    }
    validators = {"http": http.validate}
    parse_config(doc, "x.toml", validators)
    for key, value, problem in (
        ("upstream", "", "listener.web.upstream: required key is missing"),
        ("greeting", "hi", "listener.web.greeting: unknown key"),
    ):
        bad = {**doc, "listener": [{**doc["listener"][0], key: value}]}
        with pytest.raises(ConfigError, match=rf"^x.toml: {problem}$"):
            parse_config(bad, "x.toml", validators)
    refusal = http.refusal("too many connections from your address")
    assert refusal.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 5\r\n" in refusal and b"\r\nConnection: close\r\n" in refusal
    assert http.plaintext_answer.startswith(b"HTTP/1.1 400 ")


def test_list_protocols_prints_each_protocol_with_its_description_and_exits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from persistproxy.tap import Options

    with pytest.raises(SystemExit) as exit_:
        Options().parseOptions(["--list-protocols"])  # no --config needed
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    plugins = protocol_plugins()
    assert {line.split()[0] for line in lines} == set(plugins) >= {"http", "tcp"}
    for line in lines:
        name, description = line.split(None, 1)
        assert description == plugins[name].description
    assert "--list-protocols" in str(Options())
