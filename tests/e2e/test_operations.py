"""
The proxy as an operator runs it (Operations II): the operator's endpoints of the metrics
listener (/metrics, /healthz, /readyz, /status) scraped over HTTP while traffic flows and
during a drain, the status page opened in headless Chromium, and the command-line polish:
a daemon writes every line to --logfile, a port in use is one line on stderr, the listen
backlog, relative paths, --demo --port, --example-config, lines for a person on a terminal,
[log] level for Twisted's lines, plain HTTP to a TLS port counted and logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import ProxyFactory
from e2ehelpers import TWISTD, ManagedProc, Origin, Proxy, RawConn, free_port, get, make_config

REPO = Path(__file__).resolve().parents[2]

METRICS = '[metrics]\nbind = "tcp:0:interface=127.0.0.1"\n\n'


def _http(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _value(text: str, metric: str) -> float:
    match = re.search(rf"^{re.escape(metric)} (\S+)$", text, re.MULTILINE)
    assert match, f"{metric} not in:\n{text}"
    return float(match.group(1))


def _metrics_port(proxy: Proxy) -> int:
    event = proxy.wait_event("metrics.started", 10)
    assert event is not None, proxy.lines()[-10:]
    return int(event["port"])


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _twistd(*args: str, cwd: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False, **kw
    )


# -- the operator's endpoints ---------------------------------------------------------------


def test_metrics_healthz_readyz_and_status_while_serving_and_during_a_drain(
    origin: Origin, proxy_factory: ProxyFactory
) -> None:
    text = "drain_timeout = 20\n" + METRICS + make_config([f"127.0.0.1:{origin.port}"])
    proxy = proxy_factory(config_text=text)
    port = _metrics_port(proxy)
    assert _http(port, "/healthz") == (200, "ok\n")
    assert _http(port, "/readyz") == (200, "ready\n")
    before = _http(port, "/metrics")[1]
    assert _value(before, 'persistproxy_responses_total{code="5xx",listener="web"}') == 0
    for _ in range(5):
        with RawConn(proxy.port) as conn:
            assert conn.roundtrip("GET", "/echo").status == 200
            assert conn.roundtrip("GET", "/echo").status == 200
    status, metrics = _http(port, "/metrics")
    assert status == 200
    server = f'server="127.0.0.1:{origin.port}",upstream="app"'
    assert _value(metrics, 'persistproxy_request_duration_seconds_count{listener="web"}') == 10
    assert (
        _value(metrics, f"persistproxy_upstream_request_duration_seconds_count{{{server}}}") == 10
    )
    assert _value(metrics, f"persistproxy_upstream_requests_total{{{server}}}") == 10
    assert _value(metrics, f"persistproxy_upstream_reused_total{{{server}}}") >= 9
    assert _value(metrics, f"persistproxy_upstream_connect_failures_total{{{server}}}") == 0
    assert _value(metrics, 'persistproxy_received_bytes_total{listener="web"}') > 0
    assert _value(metrics, 'persistproxy_sent_bytes_total{listener="web"}') > 0
    assert 'persistproxy_build_info{python="' in metrics
    status, page = _http(port, "/status")
    assert status == 200 and page.startswith("<!DOCTYPE html>")
    assert '<meta http-equiv="refresh" content="5">' in page and "<script" not in page
    assert f"127.0.0.1:{origin.port}" in page and f"127.0.0.1:{proxy.port}" in page
    assert 'class="state ok">serving' in page
    # A drain: readiness goes at once, the endpoints stay while the busy request finishes.
    busy = RawConn(proxy.port, timeout=10)
    busy.request("GET", "/slow/2")
    requests = 'persistproxy_requests_total{listener="web"}'
    _wait(lambda: _value(_http(port, "/metrics")[1], requests) == 11, 5, "the slow request")
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.wait_event("drain.started", 5) is not None
    status, body = _http(port, "/readyz")
    assert (status, body) == (503, "draining\n")
    assert _http(port, "/healthz")[0] == 200
    status, page = _http(port, "/status")
    assert status == 200 and 'class="state draining">draining' in page
    assert "(not listening)" in page
    assert _value(_http(port, "/metrics")[1], 'persistproxy_connections_open{listener="web"}') == 1
    assert busy.read_response().status == 200
    busy.close()
    assert proxy.proc.wait(10) == 0
    assert proxy.wait_event("drain.finished", 1) is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # Scrapes are not logged: no line mentions the operator's paths.
    requests_logged = [line for line in proxy.lines() if re.search(r'"GET /(metrics|readyz)', line)]
    assert requests_logged == []


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (scripts/system-deps.sh installs it with apt-get)")


def test_the_status_page_in_headless_chromium(
    origin: Origin, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    browser = _chromium()
    text = METRICS + make_config([f"127.0.0.1:{origin.port}", "127.0.0.1:1"])
    proxy = proxy_factory(config_text=text)
    port = _metrics_port(proxy)
    conns = [RawConn(proxy.port) for _ in range(4)]
    for conn in conns:
        conn.request("GET", "/slow/0.2")
    for conn in conns:
        conn.read_response()
        conn.close()
    get(proxy.port, "/echo")
    url = f"http://127.0.0.1:{port}/status"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = tmp_path / "status.png"
    done = subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1400,900", url],
        capture_output=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, len(data)
    print(f"\nChromium screenshot of /status: {shot} ({len(data)} bytes)")
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", url], capture_output=True, timeout=90, check=False
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout.decode()
    # What the browser made of it: both tables, one row per server, the idle-age chart.
    assert html.count('<table id="listeners">') == 1 and html.count('<table id="servers">') == 1
    assert f"127.0.0.1:{origin.port}" in html and "127.0.0.1:1<" in html
    assert 'id="idle-ages"' in html
    counts = [
        int(n) for n in re.findall(r'<div class="col"><span class="count">(\d+)</span>', html)
    ]
    assert len(counts) == 8 and sum(counts) >= 2, counts  # the pooled connections, by age


# -- daemon mode, start-up errors, backlog, paths --------------------------------------------


def test_a_daemon_needs_a_log_file_and_writes_every_line_to_it(
    origin: Origin, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "pp.toml"
    config.write_text(
        make_config(
            [f"127.0.0.1:{origin.port}"], listener={"bind": f"tcp:{port}:interface=127.0.0.1"}
        )
    )
    refused = _twistd("--pidfile=", "persistproxy", "--config", str(config), cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "twistd without -n (--nodaemon) needs --logfile=FILE" in refused.stderr
    log = tmp_path / "pp.log"
    pidfile = tmp_path / "pp.pid"
    started = _twistd(
        f"--pidfile={pidfile}", f"--logfile={log}", "persistproxy", "--config", str(config),
        cwd=tmp_path,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text())
    try:
        assert get(port, "/echo").status == 200
        _wait(lambda: '"event": "access"' in log.read_text(), 5, "the access line in the log")
    finally:
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not pidfile.exists(), 15, "the daemon to exit")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert "listener.started" in names and "access" in names and "drain.finished" in names
    assert any(e.get("source", "").startswith("twisted") for e in events), "Twisted's, as JSON"


def test_a_port_in_use_is_one_line_on_stderr_naming_the_file_and_key(
    origin: Origin, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for key, text in (
            (
                "listener.web.bind",
                make_config(
                    [f"127.0.0.1:{origin.port}"],
                    listener={"bind": f"tcp:{busy}:interface=127.0.0.1"},
                ),
            ),
            (
                "metrics.bind",
                f'[metrics]\nbind = "tcp:{busy}:interface=127.0.0.1"\n'
                + make_config([f"127.0.0.1:{origin.port}"]),
            ),
        ):
            config = tmp_path / "pp.toml"
            config.write_text(text)
            done = _twistd("-n", "--pidfile=", "persistproxy", "--config", str(config), cwd="/")
            assert done.returncode == 1, (done.stdout, done.stderr)
            assert done.stderr.splitlines() == [
                f"persistproxy: {config}: {key}: cannot listen on "
                f"'tcp:{busy}:interface=127.0.0.1': Couldn't listen on 127.0.0.1:{busy}: "
                "[Errno 98] Address already in use."
            ], done.stderr
            assert "Traceback" not in done.stdout + done.stderr


def test_listeners_listen_with_a_backlog_of_511(
    origin: Origin, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(origin)
    listing = subprocess.run(
        ["ss", "-Hltn", f"sport = :{proxy.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    # For a listening socket, ss's Send-Q column is the backlog (capped by somaxconn).
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(listing[2]) == min(511, somaxconn), listing


def test_relative_paths_are_relative_to_the_config_files_folder(
    origin: Origin, tmp_path: Path
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = etc / "pp.toml"
    config.write_text(
        '[log]\naccess_log = "access.log"\n' + make_config([f"127.0.0.1:{origin.port}"])
    )
    proxy = Proxy(os.path.relpath(config, elsewhere), cwd=str(elsewhere))
    try:
        assert get(proxy.port, "/echo").status == 200
        _wait(lambda: (etc / "access.log").exists() and (etc / "access.log").read_text(), 5,
              "the access line in etc/access.log")  # fmt: skip
        assert not (elsewhere / "access.log").exists()
    finally:
        proxy.terminate()


def test_example_config_ships_with_the_package_and_checks(tmp_path: Path) -> None:
    done = _twistd("persistproxy", "--example-config", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == (REPO / "etc" / "persistproxy.toml").read_text()
    (tmp_path / "pp.toml").write_text(done.stdout)
    check = _twistd(
        "-n", "--pidfile=", "persistproxy", "--check", "--config", "pp.toml", cwd=tmp_path
    )
    assert check.returncode == 0 and "configuration OK" in check.stdout, check.stderr
    assert not (tmp_path / "twistd.pid").exists()


def test_demo_takes_a_port(tmp_path: Path) -> None:
    port = free_port()
    demo = ManagedProc(
        [TWISTD, "-n", "--pidfile=", "persistproxy", "--demo", "--port", str(port)],
        cwd=str(tmp_path),
    )
    try:
        assert demo.wait_line(lambda line: '"listener.started"' in line, 20), demo.lines()
        response = get(port, "/")
        assert response.status == 200 and b"persistproxy demo origin" in response.body
    finally:
        demo.terminate()
        demo.kill()


# -- what the lines look like ------------------------------------------------------------------


def test_on_a_terminal_the_lines_are_for_a_person(origin: Origin, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "pp.toml"
    config.write_text(
        make_config(
            [f"127.0.0.1:{origin.port}"], listener={"bind": f"tcp:{port}:interface=127.0.0.1"}
        )
    )
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "persistproxy", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + 20
        while b"listener.started" not in output and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                with contextlib.suppress(OSError):
                    output += os.read(master, 65536)
        assert get(port, "/echo").status == 200
        deadline = time.monotonic() + 5
        while (
            b"access" not in output.split(b"listener.started", 1)[-1]
            and time.monotonic() < deadline
        ):
            if select.select([master], [], [], 0.5)[0]:
                with contextlib.suppress(OSError):
                    output += os.read(master, 65536)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        os.close(master)
    text = re.sub(rb"\x1b\[[0-9;]*m", b"", output).decode()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and not any(line.lstrip().startswith("{") for line in lines), lines[:5]
    started = next(line for line in lines if "listener.started" in line)
    assert "[info" in started and f"port={port}" in started, started
    assert any("access" in line and "GET /echo HTTP/1.1" in line for line in lines)
    assert "\x1b[" in output.decode(), "colours on a terminal"


def test_log_level_applies_to_twisteds_lines(origin: Origin, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "pp.toml"
    config.write_text(
        '[log]\nlevel = "warning"\n'
        + make_config(
            [f"127.0.0.1:{origin.port}"], listener={"bind": f"tcp:{port}:interface=127.0.0.1"}
        )
    )
    proc = ManagedProc([TWISTD, "-n", "--pidfile=", "persistproxy", "--config", str(config)],
                       cwd=str(tmp_path))  # fmt: skip
    try:
        _wait(lambda: _connectable(port), 20, "the listener")
        assert get(port, "/nothing-here").status in (200, 404)
        assert proc.terminate(15) == 0
    finally:
        proc.kill()
    events = [json.loads(line) for line in proc.lines() if line.startswith("{")]
    # Access lines have their own switch (the listener's access_log), as in nginx.
    assert [e["path"] for e in events if e["event"] == "access"] == ["/nothing-here"]
    others = [e for e in events if e["event"] != "access"]
    assert others, proc.lines()
    assert all(e["level"] in ("warning", "error", "critical") for e in others), others[:5]


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_plain_http_to_a_tls_port_is_answered_counted_and_logged(
    origin: Origin, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    from pki import make_pki

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    cert, key = pki.site
    text = METRICS + make_config([f"127.0.0.1:{origin.port}"])
    text = text.replace(
        "[[upstream]]",
        f'[listener.tls]\ncertificates = [{{ cert = "{cert}", key = "{key}" }}]\n\n[[upstream]]',
    )
    proxy = proxy_factory(config_text=text)
    port = _metrics_port(proxy)
    response = get(proxy.port, "/login?password=secret")
    assert response.status == 400 and b"TLS port" in response.body
    event = proxy.wait_event("tls.plaintext", 5)
    assert event is not None
    assert (event["listener"], event["method"], event["path"], event["status"]) == (
        "web", "GET", "/login", 400,
    )  # fmt: skip
    metrics = _http(port, "/metrics")[1]
    assert _value(metrics, 'persistproxy_tls_plaintext_total{listener="web"}') == 1
    assert _value(metrics, 'persistproxy_bad_requests_total{listener="web"}') == 1
    assert _value(metrics, 'persistproxy_responses_total{code="4xx",listener="web"}') == 1


def test_a_refused_requests_access_line_says_what_was_asked(
    origin: Origin, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(origin)
    with RawConn(proxy.port) as conn:
        conn.send(b"GET /v2?token=x HTTP/1.2\r\nHost: a\r\n\r\n")
        assert conn.read_response().status == 505
    line = proxy.wait_event("access", 5, lambda e: e["status"] == 505)
    assert line is not None
    assert (line["method"], line["path"], line["version"]) == ("GET", "/v2", "1.2")
