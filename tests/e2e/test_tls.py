"""End-to-end TLS: the real proxy under twistd, real clients (openssl s_client, curl, Python's
ssl module) and a real TLS origin, with certificates made by trustme at test time.

Listener: handshake, SNI choosing between two certificates, ALPN, session resumption in TLS 1.2
(session ID and ticket) and TLS 1.3 shown by `openssl s_client -sess_out/-sess_in` and by the
access log, reload on SIGHUP (new certificate served, established connection kept; a bad file
keeps the old one), and a bad certificate refused at start-up with one line.
Upstream: verified TLS to a TLS origin, pooled and reused, new connections resuming the
previous session, a wrong name or an untrusted chain refused with 502 and a reason, and a
truncated response body detected although the origin closes without close_notify.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from e2ehelpers import TWISTD, ManagedProc, Origin, Proxy, curl, get, pattern_sha256
from pki import PKI, make_pki

# -- certificates -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _q(value: Any) -> str:
    return json.dumps(str(value))


def tls_config(
    servers: list[str],
    certificates: list[tuple[Path, Path]],
    tls: str = "",
    upstream: str = "",
    top: str = "",
    listener: str = "",
) -> str:
    certs = ", ".join(f"{{ cert = {_q(c)}, key = {_q(k)} }}" for c, k in certificates)
    return f"""{top}
[[listener]]
name = "web"
bind = "tcp:0:interface=127.0.0.1"
upstream = "app"
{listener}

[listener.tls]
certificates = [ {certs} ]
{tls}

[[upstream]]
name = "app"
servers = [{", ".join(_q(s) for s in servers)}]
{upstream}
"""


def pki_pair(pki: PKI, name: str) -> tuple[Path, Path]:
    return pki.dir / f"{name}.pem", pki.dir / f"{name}.key"


# -- clients ------------------------------------------------------------------------------------


def s_client(
    port: int,
    *args: str,
    server_name: str | None = "site.test",
    request: bytes = b"GET /echo HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n",
) -> str:
    """openssl s_client sending one request and reading the whole response (-ign_eof: a TLS
    1.3 client reads its session tickets only by reading after the handshake)."""
    sni = ["-servername", server_name] if server_name else ["-noservername"]
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *sni, "-ign_eof", *args],
        input=request, capture_output=True, timeout=10, check=False,
    )  # fmt: skip
    return out.stdout.decode("latin-1") + out.stderr.decode("latin-1")


def ssl_context(pki: PKI) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    return context


def peer_names(sock: ssl.SSLSocket) -> list[str]:
    cert = sock.getpeercert()
    assert cert is not None
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


def tls_connect(
    port: int, pki: PKI, server_name: str = "site.test", alpn: list[str] | None = None
) -> ssl.SSLSocket:
    context = ssl_context(pki)
    if alpn:
        context.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw, server_hostname=server_name)


def roundtrip(sock: ssl.SSLSocket, target: str = "/echo", close: bool = False) -> tuple[int, bytes]:
    """One request on a kept-alive TLS connection; the response must carry Content-Length."""
    head = f"GET {target} HTTP/1.1\r\nHost: site.test\r\n"
    if close:
        head += "Connection: close\r\n"
    sock.sendall(head.encode() + b"\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(
        int(v) for k, _, v in (line.partition(":") for line in lines[1:])
        if k.lower() == "content-length"
    )  # fmt: skip
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"body truncated at {len(body)} of {length}")
        body += chunk
    return status, body


def start_tls_proxy(proxy_factory: Callable[..., Proxy], config_text: str) -> Proxy:
    proxy: Proxy = proxy_factory(config_text=config_text)
    return proxy


def access_events(proxy: Proxy, count: int, timeout: float = 3.0) -> list[dict[str, Any]]:
    """The first `count` access lines (they are written in batches, every half second)."""
    deadline = time.monotonic() + timeout
    while True:
        events = proxy.events("access")
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


# -- listener -----------------------------------------------------------------------------------


def test_handshake_with_curl_and_openssl(
    pki: PKI, origin: Origin, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = start_tls_proxy(
        proxy_factory, tls_config([f"127.0.0.1:{origin.port}"], [pki_pair(pki, "site")])
    )
    port = proxy.port
    result = curl(
        "--cacert", str(pki.ca_pem), "--resolve", f"site.test:{port}:127.0.0.1",
        f"https://site.test:{port}/echo",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    echoed = json.loads(result.stdout)
    assert ["X-Forwarded-Proto", "https"] in echoed["headers"]
    out = s_client(port, "-CAfile", str(pki.ca_pem), "-brief")
    assert "Protocol version: TLSv1.3" in out
    assert "Verification: OK" in out
    assert "HTTP/1.1 200 OK" in out
    # Nothing older than TLS 1.2 is accepted.
    old = s_client(port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert "alert protocol version" in old
    assert "New, (NONE), Cipher is (NONE)" in old


def test_sni_chooses_between_two_certificates(
    pki: PKI, origin: Origin, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = start_tls_proxy(
        proxy_factory,
        tls_config([f"127.0.0.1:{origin.port}"], [pki_pair(pki, "site"), pki_pair(pki, "other")]),
    )
    with tls_connect(proxy.port, pki, "other.test") as sock:
        assert peer_names(sock) == ["other.test", "*.wild.test"]
    with tls_connect(proxy.port, pki, "a.wild.test") as sock:  # a wildcard name
        assert peer_names(sock) == ["other.test", "*.wild.test"]
        assert roundtrip(sock)[0] == 200
    with tls_connect(proxy.port, pki, "site.test") as sock:
        assert peer_names(sock) == ["site.test", "localhost"]
    # No SNI at all: the first certificate.
    context = ssl_context(pki)
    context.check_hostname = False
    with context.wrap_socket(socket.create_connection(("127.0.0.1", proxy.port), 5)) as sock:
        assert peer_names(sock) == ["site.test", "localhost"]


def test_plain_http_to_the_tls_port_gets_a_400_that_says_so(
    pki: PKI, origin: Origin, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = start_tls_proxy(
        proxy_factory, tls_config([f"127.0.0.1:{origin.port}"], [pki_pair(pki, "site")])
    )
    result = curl("-sS", "-i", f"http://127.0.0.1:{proxy.port}/echo")
    out = result.stdout.decode("latin-1")
    assert out.startswith("HTTP/1.1 400 "), out
    assert "plain HTTP request was sent to a TLS port" in out
    with tls_connect(proxy.port, pki) as sock:  # TLS clients are served as before
        assert roundtrip(sock)[0] == 200


def test_alpn_negotiates_http_1_1(
    pki: PKI, origin: Origin, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = start_tls_proxy(
        proxy_factory, tls_config([f"127.0.0.1:{origin.port}"], [pki_pair(pki, "site")])
    )
    with tls_connect(proxy.port, pki, alpn=["h2", "http/1.1"]) as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"
        assert roundtrip(sock)[0] == 200
    [event] = access_events(proxy, 1)
    assert event["alpn"] == "http/1.1"
    assert event["tls_version"] == "TLSv1.3"
    assert event["sni"] == "site.test"


def test_large_bodies_cross_the_tls_listener_intact(
    pki: PKI, origin: Origin, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    proxy = start_tls_proxy(
        proxy_factory, tls_config([f"127.0.0.1:{origin.port}"], [pki_pair(pki, "site")])
    )
    base = f"https://site.test:{proxy.port}"
    resolve = ["--cacert", str(pki.ca_pem), "--resolve", f"site.test:{proxy.port}:127.0.0.1"]
    for target, size in (("/bytes/", 8_000_000), ("/chunked/", 3_000_000)):
        out = tmp_path / "body"
        result = curl(*resolve, "-o", str(out), f"{base}{target}{size}")
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(out.read_bytes()).hexdigest() == pattern_sha256(size)
    # A slow reader: flow control holds the origin back instead of buffering everything.
    result = curl(*resolve, "--limit-rate", "4M", "-o", str(tmp_path / "slow"),
                  f"{base}/bytes/2000000")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256((tmp_path / "slow").read_bytes()).hexdigest() == pattern_sha256(2_000_000)


def test_a_client_that_half_closes_after_its_request_still_gets_the_response(
    pki: PKI, origin: Origin, proxy_factory: Callable[..., Proxy]
) -> None:
    """As over plain TCP: the client's FIN after its request (no close_notify: that is how
    `printf ... | openssl s_client`-style clients and scripts end) ends its input, not ours."""
    proxy = start_tls_proxy(
        proxy_factory, tls_config([f"127.0.0.1:{origin.port}"], [pki_pair(pki, "site")])
    )
    with tls_connect(proxy.port, pki) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: site.test\r\n\r\n")
        socket.socket.shutdown(sock, socket.SHUT_WR)  # TCP FIN under TLS
        data = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := sock.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    assert data.endswith(b"}"), "the whole body, then the server closed"


def test_a_client_over_its_connection_limit_reads_a_503_after_the_handshake(
    pki: PKI, origin: Origin, proxy_factory: Callable[..., Proxy]
) -> None:
    """The refusal is written before any TLS byte arrives; it must follow the handshake, be
    readable, and end with a close_notify rather than a reset."""
    proxy = start_tls_proxy(
        proxy_factory,
        tls_config(
            [f"127.0.0.1:{origin.port}"],
            [pki_pair(pki, "site")],
            listener="max_connections_per_client = 1",
        ),
    )
    with tls_connect(proxy.port, pki) as first:
        assert roundtrip(first)[0] == 200
        with tls_connect(proxy.port, pki) as second:
            data = b""
            while True:
                chunk = second.recv(65536)  # SSLEOFError here would mean no close_notify
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 503 "), data[:200]
        assert b"Retry-After: 5\r\n" in data
        assert roundtrip(first)[0] == 200, "the first connection is untouched"


@pytest.mark.parametrize(
    ("version", "extra"),
    [
        ("-tls1_2", ["-no_ticket"]),  # session ID: the server's session cache
        ("-tls1_2", []),  # RFC 5077 session ticket
        ("-tls1_3", []),  # TLS 1.3 ticket
    ],
    ids=["tls1.2-session-id", "tls1.2-ticket", "tls1.3-ticket"],
)
def test_session_resumption(
    pki: PKI,
    origin: Origin,
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
    version: str,
    extra: list[str],
) -> None:
    proxy = start_tls_proxy(
        proxy_factory, tls_config([f"127.0.0.1:{origin.port}"], [pki_pair(pki, "site")])
    )
    session = tmp_path / "session.pem"
    common = [version, *extra, "-CAfile", str(pki.ca_pem), "-alpn", "http/1.1"]
    first = s_client(proxy.port, *common, "-sess_out", str(session))
    assert "\nNew, " in first and "HTTP/1.1 200 OK" in first, first
    second = s_client(proxy.port, *common, "-sess_in", str(session))
    assert "\nReused, " in second and "HTTP/1.1 200 OK" in second, second
    events = access_events(proxy, 2)
    name = "TLSv1.3" if version == "-tls1_3" else "TLSv1.2"
    assert [(e["tls_version"], e["tls_resumed"], e["alpn"]) for e in events] == [
        (name, False, "http/1.1"),
        (name, True, "http/1.1"),
    ]


def test_sighup_reloads_certificates_and_keeps_established_connections(
    pki: PKI, origin: Origin, proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki.dir / "site.pem", cert)
    shutil.copy(pki.dir / "site.key", key)
    proxy = start_tls_proxy(proxy_factory, tls_config([f"127.0.0.1:{origin.port}"], [(cert, key)]))
    kept = tls_connect(proxy.port, pki)
    try:
        assert roundtrip(kept)[0] == 200
        renewed_cert, renewed_key = pki.issue("renewed", "site.test", "renewed.test")
        shutil.copy(renewed_cert, cert)
        shutil.copy(renewed_key, key)
        os.kill(proxy.pid, signal.SIGHUP)
        assert proxy.wait_event("tls.reloaded", 5) is not None
        with tls_connect(proxy.port, pki) as fresh:
            assert peer_names(fresh) == ["site.test", "renewed.test"]
        # The connection made before the reload is still served, with its old certificate.
        assert roundtrip(kept)[0] == 200
        assert peer_names(kept) == ["site.test", "localhost"]

        # A bad file at reload makes the configuration invalid, as --check would say: it is
        # kept out whole, the current certificates stay, and the log says why.
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        os.kill(proxy.pid, signal.SIGHUP)
        failed = proxy.wait_event("config.reload_failed", 5)
        assert failed is not None
        assert f"listener.web.tls.certificates[0].cert: cannot load {cert}" in failed["error"]
        assert "not a PEM certificate" in failed["error"]
        with tls_connect(proxy.port, pki) as fresh:
            assert peer_names(fresh) == ["site.test", "renewed.test"]
        assert roundtrip(kept)[0] == 200
        assert proxy.alive()
    finally:
        kept.close()


def test_sighup_without_tls_listeners_does_not_stop_the_proxy(
    origin: Origin, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy: Proxy = proxy_factory(origin)
    os.kill(proxy.pid, signal.SIGHUP)
    assert proxy.wait_event("reload", 5) is not None
    assert proxy.alive()
    assert get(proxy.port).status == 200


def test_the_documented_tls_check_script_passes_with_testssl_and_sslyze() -> None:
    """scripts/tls-check.sh (docs/tls.md) on its own throwaway listener: testssl must find
    nothing older than TLS 1.2 offered and resumption with tickets and IDs, and sslyze
    --resum both kinds of TLS 1.2 resumption supported. sslyze lives in its own virtualenv
    (it pins an older cryptography), made from PyPI on first use in the checkout's
    .venv-sslyze (about 10 s)."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TLS_CHECK_TOOLS": "testssl sslyze",
           "SSLYZE_VENV": str(repo / ".venv-sslyze")}  # fmt: skip
    result = subprocess.run(
        ["bash", str(repo / "scripts" / "tls-check.sh")], env=env,
        capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "ok:   testssl: TLS 1.1 not offered" in out
    assert "ok:   testssl: session resumption with tickets and IDs" in out
    assert "ok:   sslyze: session IDs" in out
    assert "ok:   sslyze: TLS tickets" in out


def test_a_bad_certificate_at_startup_is_one_line_naming_the_file(pki: PKI, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    config = tmp_path / "bad.toml"
    config.write_text(tls_config(["127.0.0.1:1"], [(missing, pki.dir / "site.key")]))
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "persistproxy", "--config", str(config), "--check"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"persistproxy: {config}: listener.web.tls.certificates[0].cert: "
        f"cannot load {missing}: No such file or directory"
    )


# -- upstream -----------------------------------------------------------------------------------

TLS_ORIGIN = r"""
import http.server, json, socket, ssl, sys, threading

cert, key, max_version = sys.argv[1], sys.argv[2], sys.argv[3]
lock = threading.Lock()
serial = [0]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        with lock:
            serial[0] += 1
            self.serial = serial[0]

    def do_GET(self):
        conn = self.connection
        if self.path == "/truncated":
            # Promise 1000 bytes, send 10, close the TCP connection without close_notify.
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            self.wfile.flush()
            socket.socket.shutdown(conn, socket.SHUT_RDWR)
            self.close_connection = True
            return
        body = json.dumps({
            "path": self.path, "conn": self.serial, "tls_version": conn.version(),
            "resumed": conn.session_reused, "sni": getattr(conn, "sni", None),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
if max_version == "1.2":
    context.maximum_version = ssl.TLSVersion.TLSv1_2


def remember_sni(sock, name, ctx):
    sock.sni = name


context.sni_callback = remember_sni
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
server.socket = context.wrap_socket(server.socket, server_side=True)
print(json.dumps({"port": server.server_address[1]}), flush=True)
server.serve_forever()
"""


class TLSOrigin(ManagedProc):
    name = "tls-origin"

    def __init__(self, script: Path, cert: Path, key: Path, max_version: str) -> None:
        super().__init__(
            [sys.executable, str(script), str(cert), str(key), max_version], merge_stderr=False
        )
        line = self.wait_line(lambda s: s.startswith("{"), 10)
        if line is None:
            self.kill()
            raise RuntimeError(f"TLS origin did not start: {self.all_output()}")
        self.port = int(json.loads(line)["port"])


@pytest.fixture
def tls_origin_factory(pki: PKI, tmp_path: Path) -> Iterator[Callable[..., TLSOrigin]]:
    script = tmp_path / "tls_origin.py"
    script.write_text(TLS_ORIGIN)
    started: list[TLSOrigin] = []

    def start(name: str = "site", max_version: str = "1.3") -> TLSOrigin:
        cert, key = pki_pair(pki, name)
        origin = TLSOrigin(script, cert, key, max_version)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.kill()


def upstream_config(pki: PKI, port: int, **keys: Any) -> str:
    values = {"tls": True, "tls_ca": str(pki.ca_pem), "tls_server_name": "site.test", **keys}
    lines = [
        f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
        for k, v in values.items()
    ]
    return tls_config(
        [f"127.0.0.1:{port}"], [pki_pair(pki, "site")], upstream="\n".join(lines),
        top='[log]\nlevel = "debug"\n',
    )  # fmt: skip


@pytest.mark.parametrize("max_version", ["1.2", "1.3"])
def test_verified_upstream_tls_is_pooled_and_resumed(
    pki: PKI,
    tls_origin_factory: Callable[..., TLSOrigin],
    proxy_factory: Callable[..., Proxy],
    max_version: str,
) -> None:
    origin = tls_origin_factory(max_version=max_version)
    proxy = start_tls_proxy(proxy_factory, upstream_config(pki, origin.port))
    with tls_connect(proxy.port, pki) as sock:
        status, body = roundtrip(sock, "/echo")
        assert status == 200, body
        first = json.loads(body)
        assert first["tls_version"] == f"TLSv{max_version}"
        assert first["sni"] == "site.test"
        # Pooled: the next request rides the same upstream TLS connection.
        status, body = roundtrip(sock, "/close")
        assert status == 200
        assert json.loads(body)["conn"] == first["conn"]
        # That one was closed by the origin: a new TLS connection, resuming the session.
        status, body = roundtrip(sock, "/echo")
        third = json.loads(body)
        assert third["conn"] != first["conn"]
        assert third["resumed"] is True
    events = access_events(proxy, 3)
    assert [e["upstream_reused"] for e in events] == [False, True, False]
    connected = proxy.events("upstream.tls_connected")
    assert [e["tls_resumed"] for e in connected] == [False, True]


def test_a_wrong_upstream_name_is_refused_with_502_and_a_reason(
    pki: PKI, tls_origin_factory: Callable[..., TLSOrigin], proxy_factory: Callable[..., Proxy]
) -> None:
    origin = tls_origin_factory()
    proxy = start_tls_proxy(
        proxy_factory, upstream_config(pki, origin.port, tls_server_name="wrong.test")
    )
    with tls_connect(proxy.port, pki) as sock:
        assert roundtrip(sock)[0] == 502
    failed = proxy.wait_event("upstream.connect_failed", 3)
    assert failed is not None
    assert "TLS handshake with wrong.test: the certificate is not valid" in failed["reason"]
    assert "'wrong.test'" in failed["reason"]


def test_an_untrusted_upstream_chain_is_refused_with_502_and_a_reason(
    pki: PKI,
    tls_origin_factory: Callable[..., TLSOrigin],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    origin = tls_origin_factory()
    stranger = tmp_path / "stranger-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    proxy = start_tls_proxy(proxy_factory, upstream_config(pki, origin.port, tls_ca=str(stranger)))
    with tls_connect(proxy.port, pki) as sock:
        assert roundtrip(sock)[0] == 502
    failed = proxy.wait_event("upstream.connect_failed", 3)
    assert failed is not None
    assert "certificate verify failed: unable to get local issuer certificate" in failed["reason"]


def test_a_truncated_upstream_body_is_detected_without_close_notify(
    pki: PKI, tls_origin_factory: Callable[..., TLSOrigin], proxy_factory: Callable[..., Proxy]
) -> None:
    origin = tls_origin_factory()
    proxy = start_tls_proxy(proxy_factory, upstream_config(pki, origin.port))
    with (
        tls_connect(proxy.port, pki) as sock,
        pytest.raises(ConnectionError, match="body truncated at 10 of 1000"),
    ):
        roundtrip(sock, "/truncated")
    # The cut exchange still has its access line: the status sent, and who cut it.
    [line] = access_events(proxy, 1)
    assert (line["status"], line["path"], line["aborted"]) == (200, "/truncated", "upstream")
