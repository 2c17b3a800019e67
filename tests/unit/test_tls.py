"""
The listener's TLS (tls/server.py, tls/facts.py), in memory: its contexts (built once,
shared, chosen by SNI), ALPN, resumption in TLS 1.2 and 1.3, the handshake facts given to the
access log and the metrics, and the validation of a listener's C{tls} table.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from pki import PKI
from tlsfakes import (
    HalfCloseTransport,
    Link,
    Recorder,
    client_context,
    listener,
    names_of,
    settings,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from persistproxy.config import ConfigError, parse_config
from persistproxy.metrics import ListenerStats
from persistproxy.tls.facts import tls_info
from persistproxy.tls.server import ServerTLS, session_reused
from persistproxy.tls.transport import TLSListenerFactory

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


def test_tls_info_is_none_for_a_plain_transport() -> None:
    assert tls_info(StringTransport()) is None


def test_without_cache_and_tickets_nothing_resumes(pki: PKI, clock: Clock) -> None:
    stats = ListenerStats()
    factory = listener(pki, clock, stats, session_cache=False, session_tickets=False)
    context = client_context(SSL.TLS1_2_VERSION)
    first = Link(factory, clock, context)
    first.send(b"ping")
    second = Link(factory, clock, context, session=first.client.get_session())
    assert not session_reused(second.client)
    assert (stats.tls_handshakes, stats.tls_resumed) == (2, 0)


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
    assert "alpn: 'h2c' is not a protocol this listener speaks over TLS" in _error(
        {"certificates": [site], "alpn": ["h2c", "http/1.1"]}
    )
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
