"""
TLS, in memory: the listener's contexts (built once, shared, chosen by SNI), resumption in
TLS 1.2 and 1.3, ALPN, the handshake facts given to the access log and the metrics, the
graceful half-close, certificate reload, configuration errors, and verified, resuming TLS to
upstream servers.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from OpenSSL import SSL
from pki import PKI, make_pki
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter

from persistproxy.config import ConfigError, UpstreamConfig, parse_config
from persistproxy.logs import make_event_log
from persistproxy.metrics import ListenerStats
from persistproxy.tls.facts import tls_info
from persistproxy.tls.reload import CertificateReloader
from persistproxy.tls.server import (
    ListenerTLSSettings,
    ServerTLS,
    TLSLoadError,
    session_reused,
)
from persistproxy.tls.transport import TLSListenerFactory
from persistproxy.tls.upstream import UpstreamTLSError, endpoint_wrapper

# -- certificates -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def settings(*pairs: tuple[str, str], **kw: Any) -> ListenerTLSSettings:
    return ListenerTLSSettings(certificates=tuple(pairs), **kw)


def names_of(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


# -- an in-memory TLS client against the listener's TLS --------------------------------------


_DONE = Failure(ConnectionError("done"))


class HalfCloseTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Recorder(Protocol):
    """The wrapped (HTTP) protocol: answers each read with C{b"pong"}."""

    log_extra: dict[str, Any] | None = None

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.write(b"pong")  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.lost = reason

    def tls_established(self, facts: dict[str, Any]) -> None:
        self.log_extra = facts



class Refuser(Protocol):
    """Answers at once, before any TLS byte arrived, and closes: as a connection refusal does."""

    half_close = True
    lost: Failure | None = None

    def connectionMade(self) -> None:
        self.transport.write(b"HTTP/1.1 503 busy\r\n\r\n")  # type: ignore[union-attr]
        if self.half_close:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.lost = reason

class Sink(Protocol):
    """The upstream side's protocol: keeps what it receives."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class Link:
    """One client connection: a pyOpenSSL client pumped by hand against the server side."""

    def __init__(
        self,
        factory: TLSListenerFactory,
        clock: Clock,
        client_context: SSL.Context,
        server_name: bytes | None = b"site.test",
        session: SSL.Session | None = None,
        alpn: list[bytes] | None = None,
    ) -> None:
        self.clock = clock
        self.server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = HalfCloseTransport()
        self.server.makeConnection(self.transport)
        self.wrapped: Recorder = self.server.wrappedProtocol
        self.client = SSL.Connection(client_context, None)
        self.client.set_connect_state()
        if server_name:
            self.client.set_tlsext_host_name(server_name)
        if session is not None:
            self.client.set_session(session)
        if alpn:
            self.client.set_alpn_protos(alpn)
        self.plain = b""
        self.closed_by_server = False
        self.pump()

    def pump(self) -> None:
        for _ in range(20):
            moved = False
            with contextlib.suppress(SSL.WantReadError):
                self.client.do_handshake()
            try:
                out = self.client.bio_read(65536)
            except SSL.WantReadError:
                out = b""
            if out:
                moved = True
                self.server.dataReceived(out)
            self.clock.advance(0)
            back = self.transport.value()
            if back:
                moved = True
                self.transport.clear()
                self.client.bio_write(back)
                self._read()
            if not moved:
                return
        raise AssertionError("the handshake does not settle")

    def _read(self) -> None:
        while True:
            try:
                self.plain += self.client.recv(65536)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self.closed_by_server = True
                return
            except SSL.Error:
                return

    def send(self, data: bytes) -> None:
        self.client.send(data)
        self.pump()

    def close(self) -> None:
        """The client goes away without a close_notify, as most HTTP clients do."""
        self.server.connectionLost(Failure(ConnectionError("closed")))


def client_context(version: int, tickets: bool = True) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    if not tickets:
        context.set_options(SSL.OP_NO_TICKET)
    return context


@pytest.fixture
def clock() -> Clock:
    return Clock()


def listener(
    pki: PKI, clock: Clock, stats: ListenerStats | None = None, **kw: Any
) -> TLSListenerFactory:
    tls = ServerTLS(settings(pki.site, pki.other, **kw), "web")
    return TLSListenerFactory(tls, Factory.forProtocol(Recorder), stats, None, clock)


# -- contexts built once, SNI -----------------------------------------------------------------


def test_contexts_are_built_once_and_every_connection_starts_from_one(pki: PKI) -> None:
    tls = ServerTLS(settings(pki.site, pki.other), "web")
    first = tls.new_connection()
    second = tls.new_connection()
    assert first.get_context() is second.get_context() is tls.session_context
    assert tls.context_for(b"site.test") is tls.context_for(b"site.test")


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        (b"site.test", "site"),
        (b"LOCALHOST.", "site"),
        (b"other.test", "other"),
        (b"a.wild.test", "other"),
        (b"a.b.wild.test", "site"),  # a wildcard covers one label only
        (b"unknown.test", "site"),  # no match: the first certificate
        (None, "site"),  # no SNI at all
    ],
)
def test_sni_selects_the_certificate(
    pki: PKI, clock: Clock, server_name: bytes | None, expected: str
) -> None:
    link = Link(listener(pki, clock), clock, client_context(SSL.TLS1_3_VERSION), server_name)
    peer = link.client.get_peer_certificate(as_cryptography=True)
    assert peer is not None
    wanted = {"site": ["site.test", "localhost"], "other": ["other.test", "*.wild.test"]}
    assert names_of(peer) == wanted[expected]


def test_alpn_picks_http_1_1_and_absent_alpn_is_not_an_error(pki: PKI, clock: Clock) -> None:
    link = Link(
        listener(pki, clock), clock, client_context(SSL.TLS1_3_VERSION), alpn=[b"h2", b"http/1.1"]
    )
    assert link.client.get_alpn_proto_negotiated() == b"http/1.1"
    only_h2 = Link(listener(pki, clock), clock, client_context(SSL.TLS1_3_VERSION), alpn=[b"h2"])
    assert only_h2.client.get_alpn_proto_negotiated() == b""
    only_h2.send(b"ping")
    assert only_h2.plain == b"pong"


# -- resumption -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "tickets", "server_name"),
    [
        (SSL.TLS1_2_VERSION, False, b"site.test"),  # session ID, from the server's cache
        (SSL.TLS1_2_VERSION, True, b"site.test"),  # RFC 5077 ticket
        (SSL.TLS1_3_VERSION, True, b"site.test"),
        (SSL.TLS1_2_VERSION, False, b"other.test"),  # SNI switched to another context
        (SSL.TLS1_3_VERSION, True, b"other.test"),
    ],
)
def test_a_reconnecting_client_resumes_its_session(
    pki: PKI, clock: Clock, version: int, tickets: bool, server_name: bytes
) -> None:
    stats = ListenerStats()
    factory = listener(pki, clock, stats)
    context = client_context(version, tickets)
    first = Link(factory, clock, context, server_name, alpn=[b"http/1.1"])
    first.send(b"ping")  # a TLS 1.3 client reads its tickets with the response
    session = first.client.get_session()
    first.close()  # no close_notify
    assert session is not None
    second = Link(factory, clock, context, server_name, session=session, alpn=[b"http/1.1"])
    assert session_reused(second.client)
    assert stats.tls_handshakes == 2
    assert stats.tls_resumed == 1
    name = "TLSv1.3" if version == SSL.TLS1_3_VERSION else "TLSv1.2"
    assert stats.tls_kinds == {(name, "http/1.1", False): 1, (name, "http/1.1", True): 1}
    assert first.wrapped.log_extra == {
        "tls_version": name,
        "tls_resumed": False,
        "alpn": "http/1.1",
        "sni": server_name.decode(),
    }
    assert second.wrapped.log_extra is not None
    assert second.wrapped.log_extra["tls_resumed"] is True
    assert tls_info(second.server) == second.wrapped.log_extra


def test_tls13_resumes_from_the_cache_when_tickets_are_off(pki: PKI, clock: Clock) -> None:
    # OpenSSL then issues stateful tickets: a reference into the server's session cache.
    stats = ListenerStats()
    factory = listener(pki, clock, stats, session_tickets=False)
    context = client_context(SSL.TLS1_3_VERSION)
    first = Link(factory, clock, context)
    first.send(b"ping")
    first.close()
    second = Link(factory, clock, context, session=first.client.get_session())
    assert session_reused(second.client)
    assert stats.tls_resumed == 1


def test_tls13_tickets_leave_with_the_next_send_not_alone(pki: PKI, clock: Clock) -> None:
    """A TLS 1.3 client that leaves right after the handshake never has a ticket (as from
    nginx), and one that sends its request gets them with the answer. (Sent alone, they
    raced the client's close, which made testssl's resumption check flaky.)"""
    factory = listener(pki, clock)
    context = client_context(SSL.TLS1_3_VERSION)
    sends: list[bytes] = []
    original = HalfCloseTransport.write

    def counting(self: HalfCloseTransport, data: bytes) -> None:
        sends.append(data)
        original(self, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HalfCloseTransport, "write", counting)
        quick = Link(factory, clock, context)
        assert quick.client.get_state_string() == b"SSL negotiation finished successfully"
        assert len(sends) == 1, "only the server's first flight, no tickets on their own"
        unusable = quick.client.get_session()
        quick.close()
        assert not session_reused(Link(factory, clock, context, session=unusable).client)

        sends.clear()
        talker = Link(factory, clock, context)
        talker.send(b"ping")
        assert talker.plain == b"pong"
        assert len(sends) == 2, "first flight; then tickets and answer in one send"
        session = talker.client.get_session()
    assert session_reused(Link(factory, clock, context, session=session).client)


def test_a_tls12_servers_last_flight_leaves_at_once(pki: PKI, clock: Clock) -> None:
    link = Link(listener(pki, clock), clock, client_context(SSL.TLS1_2_VERSION))
    assert link.client.get_state_string() == b"SSL negotiation finished successfully"
    assert link.transport.value() == b""  # all sent, and the client has read it


def test_the_metrics_say_version_alpn_and_resumption(pki: PKI, clock: Clock) -> None:
    from persistproxy.metrics import ProxyStats, StatsCollector

    proxy_stats = ProxyStats()
    factory = listener(pki, clock, proxy_stats.listener("web"))
    context = client_context(SSL.TLS1_2_VERSION)
    first = Link(factory, clock, context, alpn=[b"http/1.1"])
    first.close()
    Link(factory, clock, context, session=first.client.get_session())
    families = {m.name: m for m in StatsCollector(proxy_stats, list).collect()}
    samples = {
        tuple(sorted(s.labels.items())): s.value
        for s in families["persistproxy_tls_handshakes_by_kind"].samples
        if s.name.endswith("_total")
    }
    assert samples == {
        (
            ("alpn", "http/1.1"),
            ("listener", "web"),
            ("resumed", "false"),
            ("version", "TLSv1.2"),
        ): 1,
        (("alpn", ""), ("listener", "web"), ("resumed", "true"), ("version", "TLSv1.2")): 1,
    }
    handshakes = families["persistproxy_tls_handshakes"].samples[0]
    resumed = families["persistproxy_tls_resumed"].samples[0]
    assert (handshakes.value, resumed.value) == (2, 1)


def test_handshake_facts_for_access_lines_only_when_they_are_written(
    pki: PKI, clock: Clock
) -> None:
    from persistproxy.metrics import ListenerStats

    def link(log_facts: bool) -> Link:
        tls = ServerTLS(settings(pki.site), "web")
        factory = TLSListenerFactory(
            tls, Factory.forProtocol(Recorder), ListenerStats(), None, clock, log_facts=log_facts
        )
        return Link(factory, clock, client_context(SSL.TLS1_3_VERSION), alpn=[b"http/1.1"])

    assert link(False).wrapped.log_extra is None
    assert link(True).wrapped.log_extra == {
        "tls_version": "TLSv1.3",
        "tls_resumed": False,
        "alpn": "http/1.1",
        "sni": "site.test",
    }


def test_without_cache_and_tickets_nothing_resumes(pki: PKI, clock: Clock) -> None:
    stats = ListenerStats()
    factory = listener(pki, clock, stats, session_cache=False, session_tickets=False)
    context = client_context(SSL.TLS1_2_VERSION)
    first = Link(factory, clock, context)
    first.send(b"ping")
    second = Link(factory, clock, context, session=first.client.get_session())
    assert not session_reused(second.client)
    assert (stats.tls_handshakes, stats.tls_resumed) == (2, 0)


def test_tls_info_is_none_for_a_plain_transport() -> None:
    assert tls_info(StringTransport()) is None


# -- closing ----------------------------------------------------------------------------------


def test_half_close_sends_what_is_pending_then_close_notify_then_fin(
    pki: PKI, clock: Clock
) -> None:
    link = Link(listener(pki, clock), clock, client_context(SSL.TLS1_3_VERSION))
    link.client.send(b"ping")
    link.server.dataReceived(link.client.bio_read(65536))
    # The response is still waiting for the end of the reactor turn when the close comes.
    link.server.write(b"bye")
    link.server.loseWriteConnection()
    assert link.transport.write_closed
    link.client.bio_write(link.transport.value())
    link._read()
    assert link.plain == b"pongbye"
    assert link.closed_by_server


def test_writes_of_one_turn_leave_in_one_send(pki: PKI, clock: Clock) -> None:
    link = Link(listener(pki, clock), clock, client_context(SSL.TLS1_3_VERSION))
    link.transport.clear()
    writes: list[bytes] = []
    original = link.transport.write
    link.transport.write = lambda data: (writes.append(data), original(data))  # type: ignore[method-assign,func-returns-value]
    link.server.write(b"head")
    link.server.write(b"body")
    assert writes == []
    clock.advance(0)
    assert len(writes) == 1
    link.client.bio_write(link.transport.value())
    link._read()
    assert link.plain == b"headbody"


def test_client_eof_without_close_notify_reaches_the_wrapped_protocol(
    pki: PKI, clock: Clock
) -> None:
    link = Link(listener(pki, clock), clock, client_context(SSL.TLS1_2_VERSION))
    link.send(b"ping")
    link.server.readConnectionLost()
    assert link.transport.disconnecting
    link.close()
    assert link.wrapped.lost is not None



def test_a_large_write_arrives_whole(pki: PKI, clock: Clock) -> None:
    """pyOpenSSL enables partial writes: one SSL_write may take a single 16 KiB record."""
    link = Link(listener(pki, clock), clock, client_context(SSL.TLS1_2_VERSION))
    link.transport.clear()
    body = bytes(range(256)) * 1000  # 256,000 bytes, sixteen records
    link.server.write(body)
    clock.advance(0)
    link.client.bio_write(link.transport.value())
    link._read()
    assert link.plain == body


@pytest.mark.parametrize("calls", ["binding", "public"])
def test_both_ways_of_calling_openssl_carry_records_both_ways(
    pki: PKI, clock: Clock, calls: str
) -> None:
    from persistproxy.tls.calls import BindingCalls, PublicCalls

    factory = listener(pki, clock)
    assert isinstance(factory.calls, BindingCalls)
    if calls == "public":
        factory.calls = PublicCalls()
    for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
        link = Link(factory, clock, client_context(version))
        link.client.sendall(b"ping" * 5000)  # several records in one read
        link.pump()
        assert link.wrapped.received == b"ping" * 5000
        link.transport.clear()
        link.plain = b""
        body = bytes(range(256)) * 700  # more than one read of the outgoing buffer
        link.server.write(body)
        clock.advance(0)
        link.client.bio_write(link.transport.value())
        link._read()
        assert link.plain == body
        link.client.shutdown()  # the client's close_notify: answered, then closed
        link.server.dataReceived(link.client.bio_read(65536))
        assert link.transport.disconnecting


@pytest.mark.parametrize(("half_close", "version"), [(True, 0x304), (False, 0x303)])
def test_what_is_written_before_the_handshake_follows_it_then_the_close_asked_for(
    pki: PKI, clock: Clock, half_close: bool, version: int
) -> None:
    """A refusal (503) written at connection time reaches the client after the handshake."""
    factory = TLSListenerFactory(
        ServerTLS(settings(pki.site), "web"), Factory.forProtocol(Refuser), None, None, clock
    )
    Refuser.half_close = half_close
    try:
        link = Link(factory, clock, client_context(version))
    finally:
        Refuser.half_close = True
    assert link.plain == b"HTTP/1.1 503 busy\r\n\r\n"
    assert link.closed_by_server
    assert link.transport.write_closed if half_close else link.transport.disconnecting


def test_a_close_before_any_byte_is_just_a_close(pki: PKI, clock: Clock) -> None:
    server = listener(pki, clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = HalfCloseTransport()
    server.makeConnection(transport)
    server.loseConnection()
    assert transport.disconnecting and transport.value() == b""


def test_a_bad_client_hello_is_answered_with_an_alert_and_a_close(
    pki: PKI, clock: Clock
) -> None:
    server = listener(pki, clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = HalfCloseTransport()
    server.makeConnection(transport)
    server.dataReceived(b"\x16\x03\x01\x00\x05hello")  # a handshake record, nonsense inside
    assert transport.disconnecting
    assert transport.value()[:1] == b"\x15", "a TLS alert record"
    server.connectionLost(Failure(ConnectionError("closed")))
    assert server.wrappedProtocol.lost is not None
    assert isinstance(server.wrappedProtocol.lost.value, SSL.Error)



def test_plain_text_to_the_tls_port_gets_the_wrapped_factorys_plain_answer(
    pki: PKI, clock: Clock
) -> None:
    answer = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"
    factory = listener(pki, clock)
    factory.plaintext_answer = answer
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = HalfCloseTransport()
    server.makeConnection(transport)
    server.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value() == answer and transport.disconnecting
    server.connectionLost(Failure(ConnectionError("closed")))
    assert isinstance(server.wrappedProtocol.lost.value, SSL.Error)
    assert server.wrappedProtocol.received == b"", "the request never reaches the protocol"

    # A factory without an answer (a protocol that is not HTTP): closed, as for nonsense
    # (OpenSSL recognises an HTTP request and sends no alert).
    bare = listener(pki, clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    bare_transport = HalfCloseTransport()
    bare.makeConnection(bare_transport)
    bare.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert bare_transport.value() == b"" and bare_transport.disconnecting

    # Only the first byte counts: a ClientHello split anywhere still completes.
    link = Link(factory, clock, client_context(SSL.TLS1_3_VERSION))
    link.send(b"ping")
    assert link.plain == b"pong"


# -- reload -----------------------------------------------------------------------------------


def test_reload_swaps_certificates_and_keeps_the_session_context(
    pki: PKI, clock: Clock, tmp_path: Path
) -> None:
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki.site[0], cert)
    shutil.copy(pki.site[1], key)
    tls = ServerTLS(settings((str(cert), str(key))), "web")
    factory = TLSListenerFactory(tls, Factory.forProtocol(Recorder), None, None, clock)
    before = Link(factory, clock, client_context(SSL.TLS1_3_VERSION))
    old_context, session_context = tls.context_for(None), tls.session_context
    new_cert, new_key = pki.issue("renewed", "site.test", "renewed.test")
    shutil.copy(new_cert, cert)
    shutil.copy(new_key, key)
    tls.reload()
    assert tls.context_for(None) is not old_context
    assert tls.session_context is session_context
    after = Link(factory, clock, client_context(SSL.TLS1_3_VERSION))
    peer = after.client.get_peer_certificate(as_cryptography=True)
    assert peer is not None and "renewed.test" in names_of(peer)
    # The connection made before the reload goes on with its certificate.
    before.send(b"ping")
    assert before.plain == b"pong"


def test_a_bad_file_at_reload_keeps_the_old_certificates(pki: PKI, tmp_path: Path) -> None:
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki.site[0], cert)
    shutil.copy(pki.site[1], key)
    tls = ServerTLS(settings((str(cert), str(key))), "web")
    old = tls.context_for(None)
    cert.write_text("not a certificate\n")
    stream = io.StringIO()
    reloader = CertificateReloader([tls], make_event_log(stream))
    assert reloader.reload() is False
    assert tls.context_for(None) is old
    event = json.loads(stream.getvalue().splitlines()[-1])
    assert event["event"] == "tls.reload_failed"
    assert event["file"] == str(cert)
    assert "not a PEM certificate" in event["reason"]
    with pytest.raises(TLSLoadError):
        tls.reload()


def test_an_expired_certificate_is_warned_about_at_start_and_at_reload(pki: PKI) -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    expired = pki.issue(
        "expired", "old.test", not_before=now - timedelta(days=30), not_after=now - timedelta(1)
    )
    tls = ServerTLS(settings(pki.site, expired), "web")
    stream = io.StringIO()
    reloader = CertificateReloader([tls], make_event_log(stream))

    def warnings() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        return [e for e in lines if e["event"] == "tls.certificate_expired"]

    reloader.startService()
    try:
        [warning] = warnings()
        assert (warning["file"], warning["level"]) == (expired[0], "warning")
        assert warning["not_after"].startswith((now - timedelta(1)).date().isoformat())
        assert reloader.reload()
        assert len(warnings()) == 2
    finally:
        reloader.stopService()


# -- configuration ----------------------------------------------------------------------------


def _config(tls: Any, source: str = "/nonexistent/p.toml") -> Any:
    document = {
        "listener": [{"name": "web", "bind": "tcp:0", "upstream": "app", "tls": tls}],
        "upstream": [{"name": "app", "servers": ["127.0.0.1:1"]}],
    }
    return parse_config(document, source)


def _error(tls: Any) -> str:
    with pytest.raises(ConfigError) as info:
        _config(tls)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("/nonexistent/p.toml: listener.web.tls.")
    return message


def test_a_valid_table_is_normalised(pki: PKI) -> None:
    config = _config({"certificates": [{"cert": pki.site[0], "key": pki.site[1]}]})
    tls = config.listeners[0].tls
    assert tls == {
        "certificates": [{"cert": pki.site[0], "key": pki.site[1]}],
        "min_version": "TLSv1.2",
        "alpn": ["http/1.1"],
        "session_cache": True,
        "session_tickets": True,
        "session_timeout": 3600,
    }


def test_relative_paths_are_relative_to_the_start_directory(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(pki.site[0], tmp_path / "c.pem")
    shutil.copy(pki.site[1], tmp_path / "c.key")
    monkeypatch.chdir(tmp_path)
    config = _config({"certificates": [{"cert": "c.pem", "key": "c.key"}]})
    assert config.listeners[0].tls["certificates"][0]["cert"] == str(tmp_path / "c.pem")


def test_config_errors_name_the_key_and_the_file(pki: PKI, tmp_path: Path) -> None:
    site = {"cert": pki.site[0], "key": pki.site[1]}
    assert _error({"certificates": [site], "ciphers": "x"}).endswith("tls.ciphers: unknown key")
    assert "certificates: required key is missing" in _error({})
    assert "certificates: expected a non-empty list" in _error({"certificates": []})
    assert "certificates[0].key: required key is missing" in _error(
        {"certificates": [{"cert": pki.site[0]}]}
    )
    assert "certificates[0].pem: unknown key" in _error({"certificates": [dict(site, pem=1)]})
    assert "min_version: expected TLSv1.2 or TLSv1.3" in _error(
        {"certificates": [site], "min_version": "TLSv1.0"}
    )
    assert "session_cache: expected true or false" in _error(
        {"certificates": [site], "session_cache": "yes"}
    )
    assert "session_timeout: must be >= 1" in _error({"certificates": [site], "session_timeout": 0})
    assert "alpn: 'h2' is not HTTP/1.x" in _error({"certificates": [site], "alpn": ["h2"]})
    missing = str(tmp_path / "missing.pem")
    message = _error({"certificates": [{"cert": missing, "key": pki.site[1]}]})
    assert message.endswith(
        f"certificates[0].cert: cannot load {missing}: No such file or directory"
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    assert f"certificates[0].cert: cannot load {garbage}: not a PEM certificate" in _error(
        {"certificates": [{"cert": str(garbage), "key": pki.site[1]}]}
    )
    assert f"certificates[0].key: cannot load {garbage}: not a PEM private key" in _error(
        {"certificates": [{"cert": pki.site[0], "key": str(garbage)}]}
    )
    assert (
        f"certificates[1].key: cannot load {pki.site[1]}: the key does not match the "
        f"certificate in {pki.other[0]}"
    ) in _error({"certificates": [site, {"cert": pki.other[0], "key": pki.site[1]}]})


def test_an_unusable_upstream_ca_file_is_a_config_error(pki: PKI, tmp_path: Path) -> None:
    def upstream_error(tls_ca: str) -> str:
        document = {
            "listener": [{"name": "web", "bind": "tcp:0", "upstream": "app"}],
            "upstream": [{"name": "app", "servers": ["a:1"], "tls": True, "tls_ca": tls_ca}],
        }
        with pytest.raises(ConfigError) as info:
            parse_config(document, "p.toml")
        return str(info.value)

    missing = tmp_path / "nope.pem"
    assert upstream_error(str(missing)) == (
        f"p.toml: upstream.app.tls_ca: cannot load {missing}: No such file or directory"
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("x")
    assert upstream_error(str(garbage)).endswith("no PEM certificate in the file")


def test_upstream_tls_keys_without_tls_are_a_config_error(pki: PKI) -> None:
    """tls_ca or tls_server_name with tls off would send the requests in plain text,
    silently: refused, naming the key. (Their defaults, as in the sample file, are fine.)"""
    for key, value in (("tls_ca", str(pki.ca_pem)), ("tls_server_name", "a")):
        document = {
            "listener": [{"name": "web", "bind": "tcp:0", "upstream": "app"}],
            "upstream": [{"name": "app", "servers": ["a:1"], key: value}],
        }
        with pytest.raises(ConfigError) as info:
            parse_config(document, "p.toml")
        assert str(info.value) == (
            f"p.toml: upstream.app.{key}: set, but tls is false: set tls = true, or remove it"
        )
        document["upstream"][0]["tls"] = True  # type: ignore[index]
        parse_config(document, "p.toml")


def test_an_encrypted_key_is_refused_with_the_reason(pki: PKI, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pki.site[1]).read_bytes(), None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert "the key is encrypted" in _error(
        {"certificates": [{"cert": pki.site[0], "key": str(encrypted)}]}
    )


# -- upstream TLS -----------------------------------------------------------------------------


class Upstream:
    """A TLS server in a memory reactor, and the upstream side dialling it."""

    def __init__(self, pki: PKI, server_pair: tuple[str, str], **config: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.stats = ListenerStats()
        server_tls = ServerTLS(settings(server_pair), "origin")
        self.reactor.listenTCP(
            4321,
            TLSListenerFactory(
                server_tls, Factory.forProtocol(Recorder), self.stats, None, self.reactor
            ),
        )
        self.log = io.StringIO()
        defaults: dict[str, Any] = {"tls_ca": str(pki.ca_pem), "tls_server_name": "site.test"}
        self.config = UpstreamConfig(
            name="app", servers=(("127.0.0.1", 4321),), tls=True, **{**defaults, **config}
        )
        wrap = endpoint_wrapper(self.reactor, self.config, make_event_log(self.log, "debug"))
        assert wrap is not None
        self.endpoint = wrap(TCP4ClientEndpoint(self.reactor, "127.0.0.1", 4321), "127.0.0.1")

    def connect(self) -> tuple[Any, list[Any]]:
        results: list[Any] = []
        d = self.endpoint.connect(Factory.forProtocol(Sink))
        d.addBoth(results.append)
        pump = ConnectionCompleter(self.reactor).succeedOnce()
        assert pump is not None
        pump.flush()
        return pump, results

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.log.getvalue().splitlines()]
        return [e for e in lines if e["event"] == name]


def test_upstream_tls_verifies_and_hands_over_after_the_handshake(pki: PKI) -> None:
    up = Upstream(pki, pki.site)
    pump, results = up.connect()
    [protocol] = results
    assert isinstance(protocol, Sink)
    protocol.transport.write(b"ping")  # type: ignore[union-attr]
    pump.flush()
    assert protocol.received == b"pong"


def test_new_upstream_connections_resume_the_last_session(pki: PKI) -> None:
    for version in ("TLSv1.2", "TLSv1.3"):
        up = Upstream(pki, pki.site)
        if version == "TLSv1.2":
            tls = up.reactor.tcpServers[0][1].tls
            tls.session_context.set_max_proto_version(SSL.TLS1_2_VERSION)
        pump, [first] = up.connect()
        first.transport.write(b"ping")
        pump.flush()  # a TLS 1.3 session ticket arrives after the handshake
        first.transport.loseConnection()
        pump.flush()
        _, [second] = up.connect()
        assert isinstance(second, Sink)
        assert (up.stats.tls_handshakes, up.stats.tls_resumed) == (2, 1), version
        connected = up.events("upstream.tls_connected")
        assert [e["tls_resumed"] for e in connected] == [False, True]
        assert connected[0]["tls_version"] == version


def test_a_wrong_upstream_name_is_a_connect_failure_that_says_why(pki: PKI) -> None:
    up = Upstream(pki, pki.site, tls_server_name="wrong.test")
    _, [failure] = up.connect()
    assert isinstance(failure, Failure)
    assert failure.check(UpstreamTLSError)
    message = failure.getErrorMessage()
    assert message.startswith("TLS handshake with wrong.test: the certificate is not valid")
    assert "'wrong.test'" in message


def test_an_untrusted_upstream_chain_is_a_connect_failure_that_says_why(
    pki: PKI, tmp_path: Path
) -> None:
    stranger = trustme.CA()
    pair = pki.issue("stranger", "site.test", ca=stranger)
    up = Upstream(pki, pair)
    _, [failure] = up.connect()
    assert isinstance(failure, Failure)
    message = failure.getErrorMessage()
    assert "certificate verify failed: unable to get local issuer certificate" in message
    assert str(pki.ca_pem) in message


def test_tls_verify_false_accepts_any_certificate_and_warns(pki: PKI) -> None:
    stranger = trustme.CA()
    pair = pki.issue("stranger2", "elsewhere.test", ca=stranger)
    up = Upstream(pki, pair, tls_verify=False)
    assert up.events("upstream.tls_unverified")
    _, [protocol] = up.connect()
    assert isinstance(protocol, Sink)


def test_an_upstream_handshake_that_never_ends_times_out(pki: PKI) -> None:
    up = Upstream(pki, pki.site, connect_timeout=2.0)
    results: list[Any] = []
    up.endpoint.connect(Factory.forProtocol(Sink)).addBoth(results.append)
    # The TCP connection is made but the server never answers the ClientHello.
    client_factory = up.reactor.tcpClients[0][2]
    protocol = client_factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert results == []
    up.reactor.advance(2.0)
    protocol.connectionLost(Failure(ConnectionError("aborted")))
    [failure] = results
    assert failure.getErrorMessage() == "TLS handshake with site.test: not complete within 2s"


def test_no_wrapper_for_a_plain_upstream(pki: PKI) -> None:
    config = UpstreamConfig(name="app", servers=(("127.0.0.1", 1),))
    assert endpoint_wrapper(Clock(), config, make_event_log(io.StringIO())) is None


@pytest.fixture(autouse=True)
def _no_stray_sighup_handler() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)
