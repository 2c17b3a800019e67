"""
HTTP/2 end to end: curl, h2load and headless Chromium against the real proxy (twistd) over
TLS (ALPN h2) and cleartext (h2c, prior knowledge), in front of the real origin.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest
from e2ehelpers import Origin, Proxy, proc_cpu_seconds
from pki import PKI, make_pki

pytestmark = pytest.mark.skipif(
    shutil.which("h2load") is None or shutil.which("curl") is None,
    reason="h2load (nghttp2-client) and curl are needed: make system-deps",
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def h2_config(origin: Origin, pki: PKI | None, listener: str = "", upstream: str = "") -> str:
    """One listener: TLS offering h2 then http/1.1 (with C{pki}), else cleartext with h2c."""
    if pki is not None:
        cert, key = pki.site
        tls = (
            "[listener.tls]\n"
            f"certificates = [ {{ cert = {json.dumps(cert)}, key = {json.dumps(key)} }} ]\n"
            'alpn = ["h2", "http/1.1"]\n'
        )
    else:
        tls = ""
        listener = "h2c = true\n" + listener
    return f"""
[[listener]]
name = "web"
bind = "tcp:0:interface=127.0.0.1"
upstream = "app"
{listener}
{tls}
[[upstream]]
name = "app"
servers = ["127.0.0.1:{origin.port}"]
{upstream}
"""


def access(proxy: Proxy, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The first C{count} access lines (they are written in batches, every half second)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = proxy.events("access")
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def curl_version(url: str, *args: str) -> tuple[str, int, bytes]:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-w", "\n%{http_version} %{http_code}", *args, url],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, tail = out.rpartition(b"\n")
    version, status = tail.decode().split()
    return version, int(status), body


def h2load(url: str, *args: str) -> dict[str, float]:
    out = subprocess.run(
        ["h2load", "-c10", "-m10", *args, url], capture_output=True, text=True, timeout=120
    ).stdout
    done = re.search(
        r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out
    )
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    assert done and rate and codes, out
    return {
        "total": int(done.group(1)),
        "succeeded": int(done.group(2)),
        "failed": int(done.group(3)),
        "rate": float(rate.group(1)),
        "2xx": int(codes.group(1)),
    }


def test_curl_speaks_http2_over_tls_and_falls_back_to_http11(
    origin: Origin, pki: PKI, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = proxy_factory(config_text=h2_config(origin, pki))
    url = f"https://localhost:{proxy.port}/echo/a?x=1"
    version, status, body = curl_version(url, "--http2", "--cacert", str(pki.ca_pem))
    assert (version, status) == ("2", 200)
    seen = json.loads(body)
    headers = dict(seen["headers"])
    assert headers["host"] == f"localhost:{proxy.port}" and headers["via"] == "2 persistproxy"
    version, status, _ = curl_version(url, "--http1.1", "--cacert", str(pki.ca_pem))
    assert (version, status) == ("1.1", 200), "ALPN http/1.1 gets the HTTP/1.1 engine"
    version, status, body = curl_version(
        f"https://localhost:{proxy.port}/trailers", "--http2", "--cacert", str(pki.ca_pem)
    )
    assert (version, status, body) == ("2", 200, b"hello")
    first, second, third = access(proxy, 3)[:3]
    assert (first["version"], first["alpn"], first["stream"]) == ("2", "h2", 1)
    assert (second["version"], second["alpn"]) == ("1.1", "http/1.1")
    assert third["version"] == "2"


def test_curl_speaks_http2_with_prior_knowledge_on_h2c(
    origin: Origin, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = proxy_factory(config_text=h2_config(origin, None))
    url = f"http://127.0.0.1:{proxy.port}/bytes/100000"
    version, status, body = curl_version(url, "--http2-prior-knowledge")
    assert (version, status, len(body)) == ("2", 200, 100000)
    version, status, _ = curl_version(url)
    assert (version, status) == ("1.1", 200)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "h2c"])
def test_h2load_100_concurrent_streams_use_and_reuse_pooled_connections(
    tls: bool, origin: Origin, pki: PKI, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = proxy_factory(
        config_text=h2_config(origin, pki if tls else None, listener="access_log = false")
    )
    scheme = "https" if tls else "http"
    origin.reset()
    requests = 4000
    cpu = proc_cpu_seconds(proxy.pid)
    result = h2load(f"{scheme}://127.0.0.1:{proxy.port}/bytes/100", f"-n{requests}")
    cpu = proc_cpu_seconds(proxy.pid) - cpu
    stats = origin.stats()
    print(
        f"h2load -c10 -m10 -n{requests} over {scheme}: {result['rate']:.0f} req/s, "
        f"{cpu / requests * 1e6:.0f} us CPU per request, {stats['accepts']} upstream connections"
    )
    assert result["failed"] == 0 and result["2xx"] == requests
    assert stats["requests"] == requests
    assert stats["accepts"] <= 100 + 10, "at most one upstream connection per open stream"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is needed")
def test_chromium_loads_a_page_of_many_resources_over_one_connection(
    origin: Origin, pki: PKI, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = proxy_factory(config_text=h2_config(origin, pki))
    resources = 60
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--ignore-certificate-errors",
                "--dump-dom",
                f"https://localhost:{proxy.port}/page/{resources}",
            ],
            capture_output=True,
            timeout=120,
        )
    assert b"<p>page</p>" in result.stdout, result.stderr.decode(errors="replace")[-2000:]
    lines = [
        line for line in access(proxy, resources + 1, 10) if line["path"] != "/favicon.ico"
    ]
    paths = sorted(line["path"] for line in lines)
    assert paths == sorted(["/page/60", *[f"/bytes/{100 + i}" for i in range(resources)]])
    assert {line["status"] for line in lines} == {200}
    assert {line["version"] for line in lines} == {"2"}
    connections = {line["connection"] for line in lines}
    assert len(connections) == 1, "one HTTP/2 connection carried the whole page"
    assert len({line["stream"] for line in lines}) == resources + 1
    handshakes = proxy.events("tls.handshake_failed")
    print(f"chromium: {len(lines)} responses over connection {connections}, {handshakes=}")
