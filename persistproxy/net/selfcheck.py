# -*- test-case-name: tests.unit.test_selfcheck -*-
"""
The start-up self-check of the private Twisted and pyOpenSSL internals persistproxy relies on.

Every fast path that reaches into a library's private attributes is listed in L{INTERNALS},
with a probe: the attributes exist, and where it is cheap, the path does what it should on a
throwaway object (a TCP transport over a socket pair, a TLS handshake in memory). A probe
that fails switches its fast path off: the code then takes the public Twisted or pyOpenSSL
path, which is slower but does not depend on a library's insides. Without this, a new
Twisted or pyOpenSSL that renamed something would fail in the middle of a connection (or,
for upstream TLS, silently: every connect would time out).

Each probe runs at most once per process: L{problem} caches its finding, and the fast paths
consult it where they already decide once per connection or per listener whether to take
the fast path, so a passing probe costs a cached lookup there and nothing per request.
L{self_check}, called once by C{makeService} once the log exists, runs every probe that
applies to the running reactor and logs one C{internals.fallback} warning per failed probe.
"""

from __future__ import annotations

import functools
import inspect
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import Factory, Protocol

from persistproxy.logs import EventLog

__all__ = [
    "INTERNALS",
    "Internal",
    "ProbeFailed",
    "expect",
    "need",
    "problem",
    "self_check",
    "usable",
]


class ProbeFailed(Exception):
    """What a probe found wrong, phrased for the log line."""


@dataclass(frozen=True)
class Internal:
    """
    One group of private attributes a fast path relies on.

    @ivar name: how the fast path asks for it (L{usable}).
    @ivar module: the persistproxy module with the fast path.
    @ivar attributes: the private attributes, for the log line and the README.
    @ivar fallback: what is used instead when the probe fails.
    @ivar check: the probe; raises when the internal is missing or misbehaves.
    @ivar applies: whether the internal is in use under the given reactor.
    """

    name: str
    module: str
    attributes: str
    fallback: str
    check: Callable[[], None]
    applies: Callable[[Any], bool] = lambda reactor: True


# -- probe helpers ----------------------------------------------------------------------------


def need(owner: Any, label: str, *names: str) -> None:
    """Fail unless C{owner} has every attribute in C{names} (C{label} names it)."""
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        raise ProbeFailed(f"{label} has no {', '.join(missing)}")


def expect(condition: bool, finding: str) -> None:
    """Fail with C{finding} unless C{condition}."""
    if not condition:
        raise ProbeFailed(finding)


class _NoCall:
    def active(self) -> bool:
        return False

    def cancel(self) -> None:
        pass


class _Idle:
    """
    The reactor of a probe's transports: never run, so what they register is ignored.
    """

    def addReader(self, _: object) -> None:
        pass

    addWriter = removeReader = removeWriter = addReader

    def callLater(self, *_: object, **__: object) -> _NoCall:
        return _NoCall()

    def seconds(self) -> float:
        return 0.0


def _nothing_waiting(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    return False


# -- net/fastwrite.py -------------------------------------------------------------------------

_TCP_ATTRIBUTES = (
    "_tempDataLen",
    "dataBuffer",
    "offset",
    "_writeDisconnecting",
    "_writeDisconnected",
    "_closeWriteConnection",
    "_aborting",
    "TLS",
)


def _probe_fastwrite() -> None:
    from twisted.internet import tcp

    from persistproxy.net import fastwrite

    ours, peer = socket.socketpair()
    with ours, peer:
        peer.setblocking(False)
        idle: Any = _Idle()
        transport: Any = tcp.Connection(ours, Protocol(), idle)
        need(transport, "a twisted.internet.tcp.Connection", *_TCP_ATTRIBUTES)
        transport.connected = 1
        expect(not transport.TLS, "a new tcp.Connection says TLS is on")
        expect(not fastwrite.backlogged(transport, True), "a new connection looks backlogged")
        fastwrite.write_directly(transport, b"a")
        expect(peer.recv(16) == b"a", "a direct send did not arrive")
        transport.write(b"b")
        expect(
            fastwrite.backlogged(transport, True),
            "bytes queued by write() are not seen in _tempDataLen or dataBuffer",
        )
        expect(
            fastwrite.buffered(transport) == 1,
            "bytes queued by write() are not counted by _tempDataLen + dataBuffer - offset",
        )
        fastwrite.write_directly(transport, b"c")
        expect(_nothing_waiting(peer), "a direct send overtook bytes queued by write()")
        transport.doWrite()
        expect(peer.recv(16) == b"bc", "queued and direct bytes did not arrive in order")
        expect(not fastwrite.backlogged(transport, True), "a flushed buffer looks backlogged")
        expect(fastwrite.fin_can_follow(transport), "an idle connection cannot send a FIN")
        fastwrite.lose_write_directly(transport)
        expect(peer.recv(16) == b"", "lose_write_directly did not send the FIN")
        transport.write(b"late")
        expect(
            not fastwrite.backlogged(transport, True),
            "write() after the FIN was queued (_writeDisconnected not honoured)",
        )
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.setblocking(False)
        transport = tcp.Connection(ours, Protocol(), idle)
        transport.connected = 1
        transport.abortConnection()
        fastwrite.write_directly(transport, b"x")
        expect(_nothing_waiting(peer), "a direct send went out after abortConnection")
        expect(not fastwrite.fin_can_follow(transport), "a FIN could follow abortConnection")


# -- net/accept.py ----------------------------------------------------------------------------


class _Accepted(Protocol):
    def connectionMade(self) -> None:
        self.factory.made.append(self)  # type: ignore[attr-defined]


def _probe_accept() -> None:
    from twisted.internet import tcp

    from persistproxy.net.accept import ProxyPort, ProxyServer

    need(socket.socket, "socket.socket", "_accept")
    need(
        tcp.Port,
        "twisted.internet.tcp.Port",
        "_buildAddr",
        "_fromListeningDescriptor",
        "_realPortNumber",
        "sessionno",
        "addressFamily",
        "socketType",
    )
    need(tcp.Connection, "twisted.internet.tcp.Connection", "_shouldShutdown", "_getLogPrefix")
    factory: Any = Factory.forProtocol(_Accepted)
    factory.made = []
    factory.noisy = False
    # ProxyServer.__init__ is a copy of tcp.Server.__init__: it must set what Twisted's does.
    idle: Any = _Idle()
    port = tcp.Port(0, factory, interface="127.0.0.1", reactor=idle)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        theirs = tcp.Server(a, Protocol(), ("127.0.0.1", 1), port, 7, idle)
        ours = ProxyServer(c, Protocol(), ("127.0.0.1", 1), port, 7, idle)
        missing = set(vars(theirs)) - set(vars(ours)) - {"logstr", "repstr"}
        expect(not missing, f"tcp.Server.__init__ sets {sorted(missing)}, ProxyServer does not")
        expect(
            (ours.logstr, ours.repstr) == (theirs.logstr, theirs.repstr),
            "ProxyServer's log strings differ from tcp.Server's",
        )
    # ProxyPort.doRead accepts through socket._accept and builds the address as Twisted does.
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        listening.setblocking(False)
        with socket.create_connection(listening.getsockname(), timeout=1.0) as client:
            accepting: Any = ProxyPort(0, factory, interface="127.0.0.1", reactor=idle)
            accepting.socket = listening
            accepting.numberAccepts = 1
            accepting.doRead()
            expect(len(factory.made) == 1, "ProxyPort.doRead accepted nothing")
            transport = factory.made[0].transport
            try:
                expect(isinstance(transport, ProxyServer), "the accepted transport is not ours")
                expect(
                    transport.getPeer().port == client.getsockname()[1],
                    "the accepted connection's peer address is wrong",
                )
            finally:
                transport.socket.close()


# -- net/reactor.py ---------------------------------------------------------------------------


def _probe_reactor() -> None:
    from twisted.internet import tcp
    from twisted.internet.epollreactor import EPollReactor

    need(
        EPollReactor,
        "twisted.internet.epollreactor.EPollReactor",
        "doPoll",
        "doIteration",
        "_doReadOrWrite",
        "listenTCP",
        "adoptStreamPort",
    )
    need(tcp.Port, "twisted.internet.tcp.Port", "_fromListeningDescriptor")
    # Instance attributes, read without building a reactor (that would open descriptors).
    assigned = EPollReactor.__init__.__code__.co_names
    for name in ("_poller", "_selectables"):
        expect(name in assigned, f"EPollReactor.__init__ no longer sets {name}")
    parameters = list(inspect.signature(EPollReactor._doReadOrWrite).parameters)
    expect(
        parameters == ["self", "selectable", "fd", "event"],
        f"EPollReactor._doReadOrWrite takes {parameters}",
    )


def _is_epoll(reactor: Any) -> bool:
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    return isinstance(reactor, EPollReactor)


def _is_ours(reactor: Any) -> bool:
    try:
        from persistproxy.net.reactor import ProxyReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    return isinstance(reactor, ProxyReactor)


# -- tls/: the probes live in persistproxy.tls.probes, imported when first run ---------------


def _tls_probe(name: str) -> Callable[[], None]:
    def check() -> None:
        from persistproxy.tls import probes

        getattr(probes, name)()

    return check


# -- service.py -------------------------------------------------------------------------------


def _probe_exit_signal() -> None:
    from twisted.internet import base, interfaces

    capturing = getattr(interfaces, "_ISupportsExitSignalCapturing", None)
    expect(
        capturing is not None,
        "twisted.internet.interfaces has no _ISupportsExitSignalCapturing",
    )
    need(base.ReactorBase, "twisted.internet.base.ReactorBase", "_exitSignal")
    expect(
        capturing.implementedBy(base.ReactorBase),  # type: ignore[union-attr]
        "ReactorBase does not provide _ISupportsExitSignalCapturing",
    )


# -- net/proxyproto.py -------------------------------------------------------------------------


def _probe_proxyproto() -> None:
    from twisted.internet.address import IPv4Address, IPv6Address

    from persistproxy.net import proxyproto

    imported: Any = proxyproto  # what it imported from Twisted, if anything
    for name in ("V1Parser", "V2Parser", "InvalidProxyHeader"):
        expect(
            getattr(imported, name) is not None,
            f"twisted.protocols.haproxy has no {name} where persistproxy imports it",
        )
    need(imported.V1Parser, "twisted.protocols.haproxy._v1parser.V1Parser", "parse")
    need(imported.V2Parser, "twisted.protocols.haproxy._v2parser.V2Parser", "parse")
    pairs: list[tuple[Any, Any]] = [
        (IPv4Address("TCP", "192.0.2.1", 51000), IPv4Address("TCP", "198.51.100.2", 443)),
        (IPv6Address("TCP", "2001:db8::1", 51000), IPv6Address("TCP", "2001:db8::2", 443)),
    ]
    for version in ("v1", "v2"):
        for source, destination in pairs:
            header = proxyproto.encode(version, source, destination)
            found = proxyproto.HeaderParser().feed(header + b"GET")
            expect(found is not None, f"a {version} header for {source.host} was not read")
            assert found is not None
            parsed, rest = found
            expect(
                (parsed.source, parsed.destination, rest) == (source, destination, b"GET"),
                f"a {version} header for {source.host} read as {parsed}",
            )
    local = proxyproto.V2_SIGNATURE + b"\x20\x00\x00\x00"
    found = proxyproto.HeaderParser().feed(local)
    expect(found is not None and found[0].kind == "LOCAL", "a v2 LOCAL header was not read")
    try:
        proxyproto.HeaderParser().feed(b"PROXY TCP4 192.0.2.1 198.51.100.2 x 443\r\n")
    except proxyproto.InvalidHeader:
        pass
    else:
        raise ProbeFailed("a v1 header with a non-numeric port was accepted")


# -- the list ---------------------------------------------------------------------------------

#: Every private internal, by the name its fast path asks L{usable} for.
INTERNALS: dict[str, Internal] = {
    internal.name: internal
    for internal in (
        Internal(
            "fastwrite",
            "persistproxy.net.fastwrite",
            "tcp.Connection._tempDataLen, dataBuffer, offset, _writeDisconnecting, "
            "_writeDisconnected, _aborting, TLS, _closeWriteConnection()",
            "Twisted's transport.write() and loseWriteConnection(); min_send_rate not enforced",
            _probe_fastwrite,
        ),
        Internal(
            "accept",
            "persistproxy.net.accept",
            "socket._accept(), tcp.Port._buildAddr(), _realPortNumber, sessionno, "
            "tcp.Server.__init__ (copied), tcp.Connection._shouldShutdown",
            "Twisted's tcp.Port and tcp.Server",
            _probe_accept,
            _is_ours,
        ),
        Internal(
            "reactor",
            "persistproxy.net.reactor",
            "EPollReactor.doPoll (copied), _poller, _selectables, _doReadOrWrite(), "
            "tcp.Port._fromListeningDescriptor()",
            "Twisted's EPollReactor (persistproxy's reactor is not installed)",
            _probe_reactor,
            lambda reactor: _is_epoll(reactor) and not _is_ours(reactor),
        ),
        Internal(
            "tls.calls",
            "persistproxy.tls.calls",
            "OpenSSL._util.ffi/lib, Connection._ssl, _into_ssl, _from_ssl, _raise_ssl_error()",
            "pyOpenSSL's bio_write(), recv(), sendall() and bio_read()",
            _tls_probe("probe_calls"),
        ),
        Internal(
            "tls.binding",
            "persistproxy.tls.server, persistproxy.tls.upstream",
            "OpenSSL._util.lib.SSL_session_reused, SSL_get_verify_result, "
            "X509_verify_cert_error_string on Connection._ssl",
            "tls_resumed is reported false; an untrusted upstream chain is reported "
            "without OpenSSL's reason",
            _tls_probe("probe_binding"),
        ),
        Internal(
            "tls.upstream",
            "persistproxy.tls.upstream",
            "TLSMemoryBIOProtocol._checkHandshakeStatus(), _handshakeDone, _aborted, "
            "_tlsConnection, _reason",
            "Twisted's TLSMemoryBIOProtocol with an IHandshakeListener protocol wrapper",
            _tls_probe("probe_upstream"),
        ),
        Internal(
            "proxyproto",
            "persistproxy.net.proxyproto",
            "twisted.protocols.haproxy._v1parser.V1Parser.parse(), "
            "_v2parser.V2Parser.parse(), _exceptions.InvalidProxyHeader",
            "none: a listener with proxy_protocol = true does not start (other listeners do)",
            _probe_proxyproto,
        ),
        Internal(
            "exit_signal",
            "persistproxy.service",
            "reactor._exitSignal (twistd's _ISupportsExitSignalCapturing)",
            "a drain ended by SIGTERM exits with the signal's status instead of 0",
            _probe_exit_signal,
        ),
    )
}


@functools.cache
def problem(name: str) -> str | None:
    """
    Run the probe of L{INTERNALS}C{[name]} the first time it is asked for.

    @return: L{None} when it passed, else what it found, in one line.
    """
    try:
        INTERNALS[name].check()
    except ProbeFailed as e:
        return str(e)
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def usable(name: str) -> bool:
    """Whether the fast path C{name} may use its internals (its probe passed)."""
    return problem(name) is None


def self_check(log: EventLog, reactor: Any) -> dict[str, str]:
    """
    Probe every internal that applies under C{reactor} and log one C{internals.fallback}
    warning for each that failed. Called once, at start-up.

    @return: what each failed probe found, by name.
    """
    failed: dict[str, str] = {}
    for internal in INTERNALS.values():
        if not internal.applies(reactor):
            continue
        finding = problem(internal.name)
        if finding is None:
            continue
        failed[internal.name] = finding
        log.warning(
            "internals.fallback",
            internal=internal.name,
            module=internal.module,
            attribute=internal.attributes,
            fallback=internal.fallback,
            finding=finding,
        )
    return failed
