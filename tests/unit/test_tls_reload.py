"""
Certificate reload (tls/reload.py), as a configuration reload asks for it (SIGHUP itself is
tests/unit/test_reload.py's): new files are served to new connections while the session
context and the connections already made are kept; a bad file keeps the old certificates and
says why; an expired certificate is warned about at start and at every reload.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from pki import PKI
from tlsfakes import Link, Recorder, client_context, names_of, settings
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock

from persistproxy.logs import make_event_log
from persistproxy.tls.reload import CertificateReloader
from persistproxy.tls.server import ServerTLS, TLSLoadError
from persistproxy.tls.transport import TLSListenerFactory


@pytest.fixture(autouse=True)
def _no_stray_sighup_handler() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


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
