"""
TLS to upstream servers (tls/upstream.py, tls/trust.py), in a memory reactor: verified
against C{tls_ca}, handed over after the handshake, resuming the last session, a wrong name
or an untrusted chain refused with a reason, a handshake that never ends timed out; and the
C{tls_ca} file and the upstream TLS keys checked with the configuration.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from OpenSSL import SSL
from pki import PKI
from tlsfakes import Sink, Upstream
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from persistproxy.config import ConfigError, UpstreamConfig, parse_config
from persistproxy.logs import make_event_log
from persistproxy.tls.trust import load_trust_root
from persistproxy.tls.upstream import UpstreamTLSError, endpoint_wrapper

# -- upstream TLS -----------------------------------------------------------------------------


@pytest.fixture(params=["fast", "public"])
def handshake_path(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """
    Upstream TLS through L{_ClientTLSProtocol} (Twisted's internals), or through the public
    path taken when the self-check finds those internals changed.
    """
    from fakes import force_fallback

    from persistproxy.net.selfcheck import problem

    if request.param == "public":
        force_fallback(monkeypatch, "tls.upstream")
    yield request.param
    monkeypatch.undo()
    problem.cache_clear()


def test_upstream_tls_verifies_and_hands_over_after_the_handshake(
    pki: PKI, handshake_path: str
) -> None:
    up = Upstream(pki, pki.site)
    pump, results = up.connect()
    [protocol] = results
    assert isinstance(protocol, Sink)
    protocol.transport.write(b"ping")  # type: ignore[union-attr]
    pump.flush()
    assert protocol.received == b"pong"


def test_new_upstream_connections_resume_the_last_session(pki: PKI, handshake_path: str) -> None:
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


def test_a_wrong_upstream_name_is_a_connect_failure_that_says_why(
    pki: PKI, handshake_path: str
) -> None:
    up = Upstream(pki, pki.site, tls_server_name="wrong.test")
    _, [failure] = up.connect()
    assert isinstance(failure, Failure)
    assert failure.check(UpstreamTLSError)
    message = failure.getErrorMessage()
    assert message.startswith("TLS handshake with wrong.test: the certificate is not valid")
    assert "'wrong.test'" in message


def test_an_untrusted_upstream_chain_is_a_connect_failure_that_says_why(
    pki: PKI, tmp_path: Path, handshake_path: str
) -> None:
    stranger = trustme.CA()
    pair = pki.issue("stranger", "site.test", ca=stranger)
    up = Upstream(pki, pair)
    _, [failure] = up.connect()
    assert isinstance(failure, Failure)
    message = failure.getErrorMessage()
    assert "certificate verify failed: unable to get local issuer certificate" in message
    assert str(pki.ca_pem) in message


def test_tls_verify_false_accepts_any_certificate_and_warns(pki: PKI, handshake_path: str) -> None:
    stranger = trustme.CA()
    pair = pki.issue("stranger2", "elsewhere.test", ca=stranger)
    up = Upstream(pki, pair, tls_verify=False)
    assert up.events("upstream.tls_unverified")
    _, [protocol] = up.connect()
    assert isinstance(protocol, Sink)


def test_an_upstream_handshake_that_never_ends_times_out(pki: PKI, handshake_path: str) -> None:
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


# -- the CA file and the configuration --------------------------------------------------------


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


def test_the_trust_root_is_every_ca_of_the_pem_file(pki: PKI, tmp_path: Path) -> None:
    """
    C{load_trust_root} takes every certificate of the file (a CA bundle verifies a chain
    issued by any of them), and says in one line what is wrong with a file that has none.
    """
    stranger = trustme.CA()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca_pem.read_bytes() + stranger.cert_pem.bytes())
    load_trust_root(str(bundle))
    # Servers issued by either CA are accepted with the bundle as tls_ca.
    for pair in (pki.site, pki.issue("by-stranger", "site.test", ca=stranger)):
        up = Upstream(pki, pair, tls_ca=str(bundle))
        _, [protocol] = up.connect()
        assert isinstance(protocol, Sink), protocol

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"^no PEM certificate in the file$"):
        load_trust_root(str(garbage))
    with pytest.raises(OSError):
        load_trust_root(str(tmp_path / "missing.pem"))
