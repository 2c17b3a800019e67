"""
The start-up self-check of the private Twisted and pyOpenSSL internals: every probe passes on
the installed versions; each one, made to fail the way a new release could break it, switches
its fast path to the public one, says so in one warning line, and the proxy path still works.
Also: the private attributes replaced by public API (the metrics listener) and the guarded
one (reactor._exitSignal).
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from fakes import OK_RESPONSE, Harness, force_fallback, parse_response
from OpenSSL import SSL
from pki import PKI, make_pki
from tlsfakes import Link, Sink, Upstream, client_context, listener
from twisted.internet import abstract, interfaces, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from persistproxy.errors import StartupError
from persistproxy.http.client_connection import ClientConnection
from persistproxy.logs import make_event_log
from persistproxy.net import fastwrite
from persistproxy.net.accept import ProxyPort, ProxyServer
from persistproxy.net.reactor import ProxyReactor, install
from persistproxy.net.selfcheck import INTERNALS, problem, self_check, usable
from persistproxy.tls import calls, probes, upstream
from persistproxy.tls import server as tls_server
from persistproxy.tls.calls import BindingCalls, PublicCalls, make_calls

GET = b"GET /a HTTP/1.1\r\nHost: example\r\n\r\n"


@pytest.fixture(autouse=True)
def _fresh_probes() -> Iterator[None]:
    """Each test sees probes run against what it patched, and leaves none cached."""
    problem.cache_clear()
    yield
    problem.cache_clear()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


class _Log:
    """The event log, and the internals.fallback lines written to it."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.log = make_event_log(self.stream)

    def fallbacks(self) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [line for line in lines if line["event"] == "internals.fallback"]


def _logged_once(name: str, reactor: Any = None) -> dict[str, Any]:
    """self_check logs exactly one warning for the failed probe C{name}; that line."""
    log = _Log()
    found = self_check(log.log, reactor if reactor is not None else Clock())
    assert name in found
    [line] = [line for line in log.fallbacks() if line["internal"] == name]
    assert line["level"] == "warning"
    assert line["attribute"] == INTERNALS[name].attributes
    assert line["fallback"] == INTERNALS[name].fallback
    assert line["finding"] == found[name]
    return line


def test_every_probe_passes_on_the_installed_twisted_and_pyopenssl() -> None:
    assert {name: problem(name) for name in INTERNALS} == dict.fromkeys(INTERNALS)
    log = _Log()
    assert self_check(log.log, ProxyReactor()) == {}
    assert log.fallbacks() == []
    assert isinstance(make_calls(), BindingCalls)


def test_makeservice_logs_each_failed_probe_once_before_anything_listens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from persistproxy import tap
    from persistproxy.log_output import FileSink, LogOutput

    output = LogOutput("stdout", FileSink(str(tmp_path / "stdout.log")))
    monkeypatch.setattr(tap, "stdout_output", lambda: output)

    config = tmp_path / "p.toml"
    config.write_text(
        '[[listener]]\nname = "web"\nbind = "tcp:0:interface=127.0.0.1"\nupstream = "app"\n'
        '[[upstream]]\nname = "app"\nservers = ["127.0.0.1:1"]\n'
    )
    force_fallback(monkeypatch, "tls.calls", "a newer pyOpenSSL, say")
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    root = tap.makeService(options)
    assert not root.running
    assert output.close(5.0), "the log's writer thread wrote everything"
    events = [json.loads(line) for line in (tmp_path / "stdout.log").read_text().splitlines()]
    assert [(e["event"], e["internal"], e["finding"]) for e in events] == [
        ("internals.fallback", "tls.calls", "a newer pyOpenSSL, say")
    ]


# -- net/fastwrite.py -------------------------------------------------------------------------


@pytest.fixture
def buffer_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A Twisted whose transports keep their write buffer under another name: no
    C{_tempDataLen}, and C{write()} queues where the fast path does not look.
    """
    original_init = abstract.FileDescriptor.__init__

    def init(self: Any, reactor: Any = None) -> None:
        original_init(self, reactor)
        del self._tempDataLen
        self._queued = []

    def write(self: Any, data: bytes) -> None:
        if self.connected and not self._writeDisconnected:
            self._queued.append(data)
            self.startWriting()

    def do_write(self: Any) -> Any:
        pending, self._queued = b"".join(self._queued), []
        if pending:
            self.socket.sendall(pending)
        self.stopWriting()
        if self.disconnecting:
            return self._postLoseConnection()
        if self._writeDisconnecting:
            self._writeDisconnected = True
            self._closeWriteConnection()
        return None

    monkeypatch.setattr(abstract.FileDescriptor, "__init__", init)
    monkeypatch.setattr(abstract.FileDescriptor, "write", write)
    monkeypatch.setattr(abstract.FileDescriptor, "doWrite", do_write)


def _socket_client(h: Harness) -> tuple[ClientConnection, Any, socket.socket]:
    ours, peer = socket.socketpair()
    client = ClientConnection(h.ctx, peer=IPv4Address("TCP", "127.0.0.1", 40000))
    transport = ProxyServer(ours, client, ("127.0.0.1", 40000), None, 0, MemoryReactorClock())
    client.makeConnection(transport)
    peer.settimeout(5)
    return client, transport, peer


@pytest.mark.usefixtures("buffer_elsewhere")
def test_a_twisted_buffering_elsewhere_turns_direct_writes_off_and_responses_still_go_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataclasses import replace

    probe = INTERNALS["fastwrite"].check
    runs: list[None] = []

    def counted() -> None:
        runs.append(None)
        probe()

    monkeypatch.setitem(INTERNALS, "fastwrite", replace(INTERNALS["fastwrite"], check=counted))
    finding = problem("fastwrite")
    assert finding == "a twisted.internet.tcp.Connection has no _tempDataLen"
    line = _logged_once("fastwrite")
    assert "_tempDataLen" in line["attribute"]
    assert line["fallback"] == (
        "Twisted's transport.write() and loseWriteConnection(); min_send_rate not enforced"
    )
    h = Harness()
    for _ in range(3):  # the probe ran once; connections only consult its result
        client, transport, peer = _socket_client(h)
        with peer:
            assert not fastwrite.can_write_directly(transport)
            client.dataReceived(GET)
            h.origin.respond(OK_RESPONSE)
            h.clock.advance(0)
            transport.doWrite()  # what the reactor does once the socket is writable
            status, _, body = parse_response(peer.recv(65536))
            assert (status, body) == (200, b"hello")
            client.connectionLost(Failure(ConnectionDone()))
    assert len(runs) == 1, "the probe runs once; connections only read its result"


def test_buffer_state_the_fast_path_cannot_see_is_found_by_the_behaviour_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write() that queues without counting it would let a direct send overtake it."""

    def write(self: Any, data: bytes) -> None:
        self._tempDataBuffer.append(data)  # queued, but _tempDataLen not kept up to date
        self.startWriting()

    monkeypatch.setattr(abstract.FileDescriptor, "write", write)
    assert problem("fastwrite") == (
        "bytes queued by write() are not seen in _tempDataLen or dataBuffer"
    )


@pytest.mark.parametrize(
    "name", ["dataBuffer", "_writeDisconnecting", "_writeDisconnected", "_aborting", "TLS"]
)
def test_the_fastwrite_probe_names_a_missing_attribute(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    owner = next(k for k in tcp.Connection.__mro__ if name in vars(k))
    monkeypatch.delattr(owner, name)
    assert problem("fastwrite") == f"a twisted.internet.tcp.Connection has no {name}"


def _connection_pair() -> tuple[Any, socket.socket]:
    ours, peer = socket.socketpair()
    transport: Any = tcp.Connection(ours, Protocol(), MemoryReactorClock())
    transport.connected = 1
    peer.setblocking(False)
    return transport, peer


def test_nothing_goes_straight_to_the_socket_after_abort_connection() -> None:
    """abortConnection sets neither disconnecting nor disconnected: _aborting is checked."""
    transport, peer = _connection_pair()
    with transport.socket, peer:
        transport.abortConnection()
        fastwrite.write_directly(transport, b"late")
        assert not fastwrite.fin_can_follow(transport)
        with pytest.raises(BlockingIOError):
            peer.recv(16)


def test_a_transport_with_tls_started_is_never_written_to_directly() -> None:
    transport, peer = _connection_pair()
    with transport.socket, peer:
        assert fastwrite.can_write_directly(transport)
        transport.TLS = True  # what startTLS sets
        assert not fastwrite.can_write_directly(transport)


# -- net/accept.py ----------------------------------------------------------------------------


class _Seen(Protocol):
    def connectionMade(self) -> None:
        self.factory.made.append(self)  # type: ignore[attr-defined]


def test_a_tcp_server_init_that_sets_more_makes_the_reactor_listen_with_twisteds_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = tcp.Server.__init__

    def init(self: Any, *args: Any) -> None:
        original(self, *args)
        self._peerCredentials = None  # per-connection state of a newer Twisted

    monkeypatch.setattr(tcp.Server, "__init__", init)
    assert problem("accept") == (
        "tcp.Server.__init__ sets ['_peerCredentials'], ProxyServer does not"
    )
    reactor = ProxyReactor()
    _logged_once("accept", reactor)
    factory: Any = Factory.forProtocol(_Seen)
    factory.made = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        assert type(port) is tcp.Port
        address = port.getHost()
        with socket.create_connection((address.host, address.port), timeout=5) as client:
            port.doRead()
            [made] = factory.made
            transport = made.transport
            assert type(transport) is tcp.Server and transport._peerCredentials is None
            assert transport.getPeer().port == client.getsockname()[1]
            reactor.removeReader(transport)
            transport.socket.close()
    finally:
        port.stopListening()


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        (tcp.Port, "_buildAddr"),
        (tcp.Port, "_realPortNumber"),
        (tcp.Port, "_fromListeningDescriptor"),
    ],
)
def test_the_accept_probe_names_a_missing_attribute(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str
) -> None:
    monkeypatch.delattr(owner, name)
    assert problem("accept") == f"twisted.internet.tcp.Port has no {name}"
    assert _logged_once("accept", ProxyReactor())["module"] == "persistproxy.net.accept"


# -- net/reactor.py ---------------------------------------------------------------------------


def test_a_changed_epoll_reactor_gets_twisteds_own_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from twisted.internet import main

    def do_read_or_write(self: Any, selectable: Any, fd: int, event: int, more: Any) -> None:
        """A newer Twisted's event dispatch, with another signature."""

    monkeypatch.setattr(EPollReactor, "_doReadOrWrite", do_read_or_write)
    installed: list[Any] = []
    monkeypatch.setattr(main, "installReactor", installed.append)
    install()
    [reactor] = installed
    assert type(reactor) is EPollReactor
    assert "_doReadOrWrite takes" in problem("reactor")  # type: ignore[operator]
    line = _logged_once("reactor", reactor)
    assert line["fallback"] == "Twisted's EPollReactor (persistproxy's reactor is not installed)"


def test_the_reactor_probe_reads_what_epoll_init_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    original = EPollReactor.__init__

    def init(self: Any) -> None:
        original(self)  # a Twisted that names its poller otherwise

    monkeypatch.setattr(EPollReactor, "__init__", init)
    assert problem("reactor") == "EPollReactor.__init__ no longer sets _poller"


def test_under_another_reactor_the_reactor_and_accept_probes_say_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    force_fallback(monkeypatch, "reactor")
    force_fallback(monkeypatch, "accept")
    log = _Log()
    assert self_check(log.log, Clock()) == {}  # twistd --reactor=...: neither is in use
    assert log.fallbacks() == []


# -- tls/calls.py -----------------------------------------------------------------------------


class _Without:
    """pyOpenSSL's cffi binding, less one function (as a newer pyOpenSSL might bind)."""

    def __init__(self, lib: Any, missing: str) -> None:
        self._lib, self._missing = lib, missing

    def __getattr__(self, name: str) -> Any:
        if name == self._missing:
            raise AttributeError(name)
        return getattr(self._lib, name)


def test_without_openssls_private_module_a_tls_listener_uses_the_public_calls(
    monkeypatch: pytest.MonkeyPatch, pki: PKI
) -> None:
    monkeypatch.setattr(calls, "_lib", None)
    assert problem("tls.calls") == "OpenSSL._util cannot be imported"
    _logged_once("tls.calls")
    clock = Clock()
    factory = listener(pki, clock)
    assert type(factory.calls) is PublicCalls
    for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
        link = Link(factory, clock, client_context(version))
        link.send(b"ping")
        assert (link.wrapped.received, link.plain) == (b"ping", b"pong")


@pytest.mark.parametrize("missing", [*calls._NEEDED, "SSL_ERROR_ZERO_RETURN"])
def test_the_tls_calls_probe_names_a_missing_binding_function(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.setattr(calls, "_lib", _Without(calls._lib, missing))
    assert problem("tls.calls") == f"OpenSSL._util.lib has no {missing}"
    assert type(make_calls()) is PublicCalls


def test_the_tls_calls_probe_names_a_connection_attribute_that_moved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original_init = SSL.Connection.__init__

    def init(self: Any, *args: Any) -> None:
        original_init(self, *args)
        self._outgoing = self.__dict__.pop("_from_ssl")  # as a newer pyOpenSSL might name it

    monkeypatch.setattr(SSL.Connection, "__init__", init)
    assert problem("tls.calls") == "an OpenSSL.SSL.Connection has no _from_ssl"
    assert type(make_calls()) is PublicCalls


# -- the binding in tls/server.py and tls/upstream.py -----------------------------------------


class _Handle:
    def __init__(self, connection: SSL.Connection) -> None:
        self.connection = connection

    def getHandle(self) -> SSL.Connection:
        return self.connection


def test_without_the_binding_resumption_reads_false_and_verify_errors_lose_their_reason(
    monkeypatch: pytest.MonkeyPatch, pki: PKI
) -> None:
    monkeypatch.setattr(upstream, "_lib", _Without(upstream._lib, "SSL_get_verify_result"))
    assert problem("tls.binding") == "OpenSSL._util.lib has no SSL_get_verify_result"
    _logged_once("tls.binding")
    server_context, client_context_ = probes._contexts(tls12=True)
    public = PublicCalls()
    first, client = probes._connections(server_context, client_context_)
    probes._handshake(first, client, public)
    again, client_again = probes._connections(server_context, client_context_)
    client_again.set_session(client.get_session())  # type: ignore[arg-type]
    probes._handshake(again, client_again, public)
    assert tls_server._session_reused(again), "it was resumed"
    assert not tls_server.session_reused(again), "but the fallback does not read the binding"
    assert upstream._verify_result(_Handle(client_again)) == ""  # type: ignore[arg-type]


# -- tls/upstream.py --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["_checkHandshakeStatus", "_handshakeDone", "_aborted", "_reason"])
def test_the_upstream_probe_names_a_missing_tls_protocol_attribute(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delattr(TLSMemoryBIOProtocol, name)
    assert problem("tls.upstream") == (
        f"twisted.protocols.tls.TLSMemoryBIOProtocol has no {name}"
    )


def test_a_handshake_end_the_subclass_would_not_hear_is_found_and_heard_the_public_way(
    monkeypatch: pytest.MonkeyPatch, pki: PKI
) -> None:
    """
    A Twisted whose dataReceived steps the handshake without going through the overridable
    _checkHandshakeStatus: the subclass never hears the end of the handshake, so every
    upstream connect would time out. The probe finds it; the public path still connects.
    """
    step = TLSMemoryBIOProtocol._checkHandshakeStatus

    def data_received(self: Any, data: bytes) -> None:
        self._tlsConnection.bio_write(data)
        if not self._handshakeDone:
            step(self)
            if not self._handshakeDone:
                return
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._flushReceiveBIO()

    monkeypatch.setattr(TLSMemoryBIOProtocol, "dataReceived", data_received)
    assert problem("tls.upstream") == (
        "the end of the handshake was not reported (_checkHandshakeStatus, _handshakeDone)"
    )
    _logged_once("tls.upstream")
    up = Upstream(pki, pki.site)
    pump, [protocol] = up.connect()
    assert isinstance(protocol, Sink)
    protocol.transport.write(b"ping")  # type: ignore[union-attr]
    pump.flush()
    assert protocol.received == b"pong"
    # What the probe prevents: the subclass, used anyway, never completes the connect.
    monkeypatch.setattr(upstream, "usable", lambda name: True)
    _, results = Upstream(pki, pki.site).connect()
    assert results == []


# -- service.py: reactor._exitSignal ----------------------------------------------------------


def test_without_exit_signal_capturing_one_line_says_what_the_exit_status_becomes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(interfaces, "_ISupportsExitSignalCapturing")
    assert problem("exit_signal") == (
        "twisted.internet.interfaces has no _ISupportsExitSignalCapturing"
    )
    line = _logged_once("exit_signal")
    assert "exits with the signal's status" in line["fallback"]


def _drained(clock: Clock) -> None:
    from persistproxy.config import parse_config
    from persistproxy.service import ProxyService
    from persistproxy.tap import protocol_plugins

    doc = {
        "listener": [{"name": "web", "bind": "tcp:0", "upstream": "app"}],
        "upstream": [{"name": "app", "servers": ["127.0.0.1:1"]}],
    }
    config = parse_config(doc, "<test>", {n: p.validate for n, p in protocol_plugins().items()})
    service = ProxyService(clock, config, protocol_plugins(), make_event_log(io.StringIO()))
    done: list[Any] = []
    service.stopService().addBoth(done.append)
    assert len(done) == 1 and not isinstance(done[0], Failure), done


def test_a_drain_clears_the_exit_signal_where_the_reactor_has_one_and_is_fine_without() -> None:
    class Signalled(Clock):
        _exitSignal: int | None = 15  # SIGTERM, as the reactor's handler records it

    signalled = Signalled()
    _drained(signalled)
    assert signalled._exitSignal is None, "twistd would re-raise SIGTERM after a clean drain"
    plain = Clock()
    _drained(plain)  # a reactor without the attribute: nothing to clear, no error
    assert not hasattr(plain, "_exitSignal")


# -- metrics_service.py: public API instead of _raiseSynchronously, _waitingForPort ----------


def _metrics(endpoint: Any) -> tuple[Any, _Log]:
    from persistproxy.metrics_service import _MetricsService

    class Drained:
        def when_drained(self) -> Deferred[None]:
            return succeed(None)

    log = _Log()
    service = _MetricsService(endpoint, Site(Resource()), log.log, "tcp:9100", Drained())
    return service, log


def test_the_metrics_listener_listens_before_privileges_drop_logs_and_stops() -> None:
    from twisted.internet.endpoints import serverFromString

    reactor = MemoryReactorClock()
    service, log = _metrics(serverFromString(reactor, "tcp:9100:interface=127.0.0.1"))
    service.privilegedStartService()
    service.startService()  # already listening: not twice
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (9100, "127.0.0.1")
    ]
    started = [json.loads(line) for line in log.stream.getvalue().splitlines()]
    assert [(e["event"], e["paths"][0]) for e in started] == [("metrics.started", "/metrics")]
    stopped: list[Any] = []
    service.stopService().addBoth(stopped.append)
    assert stopped == [None]


def test_a_metrics_port_that_cannot_be_bound_stops_start_up() -> None:
    class Taken:
        def listen(self, factory: object) -> Deferred[Any]:
            return fail(CannotListenError("127.0.0.1", 9100, OSError("address in use")))

    service, _ = _metrics(Taken())
    with pytest.raises(StartupError, match=r"^metrics\.bind: cannot listen on 'tcp:9100': "):
        service.privilegedStartService()


def test_a_metrics_listen_still_pending_at_stop_is_cancelled_quietly() -> None:
    pending: Deferred[Any] = Deferred()

    class Slow:
        def listen(self, factory: object) -> Deferred[Any]:
            return pending

    service, log = _metrics(Slow())
    service.privilegedStartService()
    stopped: list[Any] = []
    service.stopService().addBoth(stopped.append)
    assert stopped == [None]
    assert log.stream.getvalue() == ""


def test_the_fast_paths_consult_one_cached_result() -> None:
    assert usable("fastwrite") and usable("fastwrite")
    assert problem.cache_info().misses == 1 and problem.cache_info().hits >= 1
    port = ProxyReactor().listenTCP(0, Factory(), interface="127.0.0.1")
    try:
        assert isinstance(port, ProxyPort)
    finally:
        port.stopListening()


# -- net/proxyproto.py ------------------------------------------------------------------------


def test_the_proxyproto_probe_finds_twisteds_parsers_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from persistproxy.net import proxyproto

    monkeypatch.setattr(proxyproto, "V1Parser", None)
    line = _logged_once("proxyproto")
    assert line["finding"] == (
        "twisted.protocols.haproxy has no V1Parser where persistproxy imports it"
    )
    assert "does not start" in line["fallback"]


def test_the_proxyproto_probe_finds_a_parser_that_reads_addresses_differently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from twisted.protocols.haproxy._info import ProxyInfo
    from twisted.protocols.haproxy._v2parser import V2Parser

    from persistproxy.net import proxyproto

    class Swapped:
        """A parser that, say, swapped source and destination."""

        @staticmethod
        def parse(line: bytes) -> ProxyInfo:
            info = V2Parser.parse(line)
            return ProxyInfo(info.header, info.destination, info.source)

    monkeypatch.setattr(proxyproto, "V2Parser", Swapped)
    finding = problem("proxyproto")
    assert finding is not None and finding.startswith("a v2 header for 192.0.2.1 read as")
    assert not usable("proxyproto")
