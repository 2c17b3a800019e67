"""
A listening endpoint (listener/service.py), in a memory reactor: it binds in
C{privilegedStartService} (before twistd drops privileges) with the plugin's factory wrapped
in admission and, for a TLS listener, TLS; it says where it listens; a bind failure is one
line and exit status 1; stopping it stops accepting and leaves open connections alone; with
C{proxy_protocol = true} the header's reader comes first, before TLS.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from pki import PKI
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from persistproxy.config import ListenerConfig
from persistproxy.errors import StartupError
from persistproxy.http.plugin import HTTPProtocolPlugin
from persistproxy.listener.admission import ConnectionRegistry, ListenerFactory
from persistproxy.listener.limits import ConnectionLimits
from persistproxy.listener.proxied import ProxyHeaderFactory
from persistproxy.listener.service import ListenerService
from persistproxy.logs import make_event_log
from persistproxy.metrics import ListenerStats
from persistproxy.tls.server import ServerTLS
from persistproxy.tls.transport import TLSListenerFactory


class _Listener:
    def __init__(self, reactor: MemoryReactorClock, **config: Any) -> None:
        self.config = ListenerConfig(
            **{"name": "web", "bind": "tcp:0:interface=127.0.0.1", "upstream": "app", **config}
        )
        self.stream = io.StringIO()
        log = make_event_log(self.stream)
        self.stats = ListenerStats()
        self.limits = ConnectionLimits("web", 2, 0, 0, log, self.stats)
        self.plugin_factory = Factory.forProtocol(Protocol)
        self.service = ListenerService(
            reactor,
            self.config,
            HTTPProtocolPlugin(),
            self.plugin_factory,
            log,
            self.limits,
            self.stats,
            ConnectionRegistry(),
        )

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


def test_it_binds_before_privileges_are_dropped_and_says_where(
    memory_reactor: MemoryReactorClock,
) -> None:
    listener = _Listener(memory_reactor)
    assert memory_reactor.tcpServers == []
    listener.service.privilegedStartService()
    [(port, behind_the_port, _, interface)] = memory_reactor.tcpServers
    factory = behind_the_port.current  # what a reload may replace without rebinding
    assert (port, interface) == (0, "127.0.0.1")
    assert isinstance(factory, ListenerFactory), "every connection is admitted first"
    assert factory.wrappedFactory is listener.plugin_factory
    assert factory.limits is listener.limits and factory.stats is listener.stats
    assert listener.service.port is not None
    assert listener.limits.port is listener.service.port, "the limits can stop accepting"
    [started] = [e for e in listener.events() if e["event"] == "listener.started"]
    assert started["listener"] == "web" and started["protocol"] == "http"
    assert (started["host"], started["port"], started["tls"]) == ("127.0.0.1", 43210, False)
    assert listener.service.name == "listener:web"


def test_a_tls_listener_terminates_tls_around_the_admitted_connections(
    memory_reactor: MemoryReactorClock, pki: PKI
) -> None:
    tls = {"certificates": [{"cert": pki.site[0], "key": pki.site[1]}]}
    listener = _Listener(memory_reactor, tls=tls, access_log=False)
    assert isinstance(listener.service.tls, ServerTLS), "contexts built once, here"
    listener.service.privilegedStartService()
    [(_, behind_the_port, _, _)] = memory_reactor.tcpServers
    factory = behind_the_port.current
    assert isinstance(factory, TLSListenerFactory)
    assert isinstance(factory.wrappedFactory, ListenerFactory)
    assert factory.plaintext_answer == HTTPProtocolPlugin.plaintext_answer
    [started] = [e for e in listener.events() if e["event"] == "listener.started"]
    assert started["tls"] is True


class _Busy(MemoryReactorClock):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


@pytest.mark.parametrize(
    ("reactor", "bind", "reason"),
    [
        (_Busy(), "tcp:8080:interface=127.0.0.1", "Address already in use"),
        (MemoryReactorClock(), "systemd:domain=INET:name=web", "no inherited socket named"),
    ],
)
def test_a_bind_failure_is_one_line_naming_the_key(
    reactor: MemoryReactorClock,
    bind: str,
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    The line the twistd plugin prints on stderr, after the file's name, before exiting 1
    (tests/unit/test_tap.py, tests/e2e/test_operations.py).
    """
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_FDNAMES", raising=False)
    listener = _Listener(reactor, bind=bind)
    with pytest.raises(StartupError) as error:
        listener.service.privilegedStartService()
    [line] = str(error.value).splitlines()
    assert line.startswith(f"listener.web.bind: cannot listen on {bind!r}: "), line
    assert reason in line, line
    assert not [e for e in listener.events() if e["event"] == "listener.started"]


def test_stopping_stops_accepting_once(memory_reactor: MemoryReactorClock) -> None:
    listener = _Listener(memory_reactor)
    listener.service.privilegedStartService()
    listener.service.startService()
    port = listener.service.port
    assert port is not None
    stopped: list[Any] = []
    listener.service.stop_listening().addBoth(stopped.append)
    assert stopped == [None] and listener.service.port is None
    assert memory_reactor.tcpServers, "nothing else is undone: open connections stay"
    again: list[Any] = []
    listener.service.stopService().addBoth(again.append)  # at shutdown, after the drain
    assert again == [None] and not listener.service.running


def test_the_proxy_protocol_header_is_read_before_tls_and_admission(
    memory_reactor: MemoryReactorClock, pki: PKI
) -> None:
    tls = {"certificates": [{"cert": pki.site[0], "key": pki.site[1]}]}
    listener = _Listener(memory_reactor, tls=tls, proxy_protocol=True, header_timeout=4.0)
    listener.service.privilegedStartService()
    [(_, behind_the_port, _, _)] = memory_reactor.tcpServers
    factory = behind_the_port.current
    assert isinstance(factory, ProxyHeaderFactory), "the header comes in clear, first"
    assert factory.timeout == 4.0 and factory.limits is listener.limits
    assert isinstance(factory.wrappedFactory, TLSListenerFactory)
    admission = factory.wrappedFactory.wrappedFactory
    assert isinstance(admission, ListenerFactory) and admission._identified
    [started] = [e for e in listener.events() if e["event"] == "listener.started"]
    assert started["proxy_protocol"] is True


def test_without_usable_twisted_parsers_a_proxy_protocol_listener_does_not_start(
    memory_reactor: MemoryReactorClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fakes import force_fallback

    from persistproxy.net.selfcheck import problem

    force_fallback(monkeypatch, "proxyproto", "no V1Parser")
    try:
        plain = _Listener(memory_reactor)
        plain.service.privilegedStartService()  # a listener without it is not affected
        listener = _Listener(memory_reactor, proxy_protocol=True)
        with pytest.raises(StartupError) as error:
            listener.service.privilegedStartService()
    finally:
        monkeypatch.undo()
        problem.cache_clear()
    assert str(error.value) == (
        "listener.web.proxy_protocol: Twisted's PROXY protocol parsers are not usable: "
        "no V1Parser"
    )
