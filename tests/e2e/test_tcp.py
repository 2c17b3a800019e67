"""
protocol = "tcp" end to end: raw sockets through a real `twistd -n persistproxy` to a real TCP
origin (tests/e2e/tcp_origin.py): bytes both ways, half-close each way, a gigabyte each way
behind a slow reader in bounded memory, the idle timeout, connect failures, TLS offload and
TLS to the upstream, the listener's per-client limit, and `--list-protocols`.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2ehelpers import TWISTD, ManagedProc, Proxy, free_port, proc_status_kib
from pki import PKI, make_pki

TCP_ORIGIN = Path(__file__).resolve().parent / "tcp_origin.py"
GIB = 1 << 30
MIB = 1 << 20
MEMORY_BOUND_KIB = 100 * 1024  # the proxy's peak RSS may grow by at most this much


class TCPOrigin(ManagedProc):
    name = "tcp-origin"

    def __init__(self) -> None:
        super().__init__([sys.executable, str(TCP_ORIGIN)], merge_stderr=False)
        line = self.wait_line(lambda s: s.startswith('{"port"'), 10)
        if line is None:
            self.kill()
            raise RuntimeError(f"tcp origin did not start: {self.all_output()}")
        self.port = int(json.loads(line)["port"])

    def event(self, kind: str, tag: str, timeout: float = 10) -> dict[str, Any]:
        line = self.wait_line(
            lambda s: s.startswith("{") and json.loads(s).get("event") == kind
            and json.loads(s).get("tag") == tag,
            timeout,
        )
        assert line is not None, f"the origin never said {kind} {tag}"
        return dict(json.loads(line))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def origin() -> Iterator[TCPOrigin]:
    o = TCPOrigin()
    yield o
    o.kill()


def _config(origin: TCPOrigin, pki: PKI, tls_port: int) -> str:
    cert, key = pki.site
    return f"""
[[listener]]
name = "tcp"
bind = "tcp:0:interface=127.0.0.1"
protocol = "tcp"
upstream = "origin"

[[listener]]
name = "idle"
bind = "tcp:0:interface=127.0.0.1"
protocol = "tcp"
upstream = "origin"
tunnel_idle_timeout = 1

[[listener]]
name = "limited"
bind = "tcp:0:interface=127.0.0.1"
protocol = "tcp"
upstream = "origin"
max_connections_per_client = 2

[[listener]]
name = "down"
bind = "tcp:0:interface=127.0.0.1"
protocol = "tcp"
upstream = "nobody"

[[listener]]
name = "to-tls"
bind = "tcp:0:interface=127.0.0.1"
protocol = "tcp"
upstream = "offload"

[[listener]]
name = "tls"
bind = "tcp:{tls_port}:interface=127.0.0.1"
protocol = "tcp"
upstream = "origin"
[listener.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]

[[upstream]]
name = "origin"
servers = ["127.0.0.1:{origin.port}"]

[[upstream]]
name = "nobody"
servers = ["127.0.0.1:{free_port()}"]
connect_timeout = 2

[[upstream]]
name = "offload"
servers = ["127.0.0.1:{tls_port}"]
tls = true
tls_ca = "{pki.ca_pem}"
tls_server_name = "site.test"
"""


@pytest.fixture(scope="module")
def proxy(
    origin: TCPOrigin, pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    d = tmp_path_factory.mktemp("tcp-proxy")
    path = d / "persistproxy.toml"
    path.write_text(_config(origin, pki, free_port()))
    p = Proxy(str(path), cwd=str(d), listener="tls")
    yield p
    p.terminate(10)
    p.kill()


def _port(proxy: Proxy, listener: str) -> int:
    [event] = [e for e in proxy.events("listener.started") if e["listener"] == listener]
    return int(event["port"])


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_all(s: socket.socket | ssl.SSLSocket) -> bytes:
    data = bytearray()
    while chunk := s.recv(262144):
        data += chunk
    return bytes(data)


def _closed(s: socket.socket, timeout: float = 10.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _access(proxy: Proxy, listener: str, pred: Any = lambda e: True) -> dict[str, Any]:
    """The access line of a relay once it is written (lines go out within 0.5 s)."""
    event = proxy.wait_event("access", 10, lambda e: e.get("listener") == listener and pred(e))
    assert event is not None, f"no access line for {listener}"
    return event


def _pattern_ok(data: bytes) -> bool:
    block = bytes(range(256)) * (len(data) // 256 + 1)
    return data == block[: len(data)]


def test_bytes_are_echoed_and_the_client_fin_still_gets_the_rest(proxy: Proxy) -> None:
    payload = bytes(range(256)) * 4096 + b"end"
    with _connect(_port(proxy, "tcp")) as s:
        s.sendall(b"echo\n" + payload)
        s.shutdown(socket.SHUT_WR)  # half-close: the echo of what was sent still arrives
        assert _read_all(s) == payload
    line = _access(proxy, "tcp", lambda e: e["bytes_up"] == len(payload) + 5)
    assert line["bytes_down"] == len(payload)
    assert line["reason"] == "client_fin"
    assert line["protocol"] == "tcp" and line["client"] == "127.0.0.1"
    assert line["upstream"].startswith("127.0.0.1:") and line["duration_ms"] > 0


def test_the_upstream_fin_is_passed_on_and_the_client_may_still_send(
    proxy: Proxy, origin: TCPOrigin
) -> None:
    with _connect(_port(proxy, "tcp")) as s:
        s.sendall(b"source 100000 upfin\n")
        data = _read_all(s)  # ends with the origin's FIN, passed on as ours
        assert len(data) == 100000 and _pattern_ok(data)
        s.sendall(b"x" * 70000)  # the other direction still flows
        s.shutdown(socket.SHUT_WR)
        assert origin.event("after_fin", "upfin")["bytes"] == 70000
        assert _closed(s)
    line = _access(proxy, "tcp", lambda e: e["bytes_down"] == 100000)
    assert line["reason"] == "upstream_fin"
    assert line["bytes_up"] == 70000 + len(b"source 100000 upfin\n")


def test_a_gigabyte_to_a_slow_reader_holds_bounded_memory(proxy: Proxy) -> None:
    """The origin sends as fast as it can; the client stops reading for 0.2 s every 64 MiB,
    so the proxy's write buffer fills and it must stop reading the origin, again and again."""
    before = proc_status_kib(proxy.pid)
    received = 0
    started = time.monotonic()
    with _connect(_port(proxy, "tcp")) as s:
        s.sendall(b"source %d slowdown\n" % GIB)
        buf = bytearray(256 * 1024)
        pause_at = 64 * MIB
        while n := s.recv_into(buf):
            received += n
            if received >= pause_at:
                pause_at += 64 * MIB
                time.sleep(0.2)
    elapsed = time.monotonic() - started
    grown = proc_status_kib(proxy.pid, "VmHWM") - before
    print(
        f"\n1 GiB upstream -> slow client through the proxy: {elapsed:.1f} s, "
        f"proxy peak RSS growth {grown} KiB (RSS before: {before} KiB)"
    )
    assert received == GIB
    assert grown < MEMORY_BOUND_KIB, f"peak RSS grew by {grown} KiB"
    line = _access(proxy, "tcp", lambda e: e["bytes_down"] == GIB)
    assert line["reason"] == "upstream_fin"


def test_a_gigabyte_to_a_slow_origin_holds_bounded_memory(proxy: Proxy) -> None:
    """The client sends as fast as it can; the origin stops reading for 0.1 s every 32 MiB."""
    before = proc_status_kib(proxy.pid)
    started = time.monotonic()
    chunk = memoryview(bytes(range(256)) * 4096)
    with _connect(_port(proxy, "tcp")) as s:
        s.settimeout(60)
        s.sendall(b"sink slowup 100\n")
        for _ in range(GIB // len(chunk)):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        answer = _read_all(s)
    elapsed = time.monotonic() - started
    grown = proc_status_kib(proxy.pid, "VmHWM") - before
    print(
        f"\n1 GiB client -> slow origin through the proxy: {elapsed:.1f} s, "
        f"proxy peak RSS growth {grown} KiB (RSS before: {before} KiB)"
    )
    assert answer == b"%d -\n" % GIB
    assert grown < MEMORY_BOUND_KIB, f"peak RSS grew by {grown} KiB"


def test_a_relay_idle_both_ways_is_closed_at_tunnel_idle_timeout(proxy: Proxy) -> None:
    with _connect(_port(proxy, "idle")) as s:
        s.sendall(b"hold\n")
        assert _closed(s, 10), "closed after tunnel_idle_timeout (1 s)"
    line = _access(proxy, "idle", lambda e: e["reason"] == "idle_timeout")
    assert line["bytes_up"] == 5 and line["bytes_down"] == 0


def test_connect_failure_closes_the_client_and_says_why(proxy: Proxy) -> None:
    with _connect(_port(proxy, "down")) as s:
        s.sendall(b"anyone?")
        assert _closed(s)
    line = _access(proxy, "down")
    assert line["reason"] == "connect_failed"
    assert "refused" in line["error"].lower()
    assert proxy.wait_event("upstream.connect_failed", 5) is not None


def test_tls_offload(proxy: Proxy, pki: PKI) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    with ctx.wrap_socket(_connect(_port(proxy, "tls")), server_hostname="site.test") as s:
        s.sendall(b"echo\nsecret")
        got = b""
        while len(got) < 6:
            got += s.recv(100)
        assert got == b"secret"
    line = _access(proxy, "tls", lambda e: e["bytes_up"] == 11)
    assert line["tls_version"] in ("TLSv1.2", "TLSv1.3")


def test_tls_to_the_upstream_with_a_half_close_through_it(proxy: Proxy) -> None:
    """client -> to-tls (plain) -> TLS -> tls listener (offload) -> origin, and back: the
    client's FIN becomes a close_notify on the TLS hop, then a FIN to the origin."""
    payload = b"through two relays and TLS" * 1000
    with _connect(_port(proxy, "to-tls")) as s:
        s.sendall(b"echo\n" + payload)
        s.shutdown(socket.SHUT_WR)
        assert _read_all(s) == payload
    line = _access(proxy, "to-tls", lambda e: e["bytes_down"] == len(payload))
    assert line["reason"] == "client_fin"
    assert _access(proxy, "tls", lambda e: e["bytes_down"] == len(payload))["reason"] in (
        "client_fin",
        "upstream_fin",
    )


def test_the_per_client_limit_of_the_listener_applies(proxy: Proxy) -> None:
    port = _port(proxy, "limited")
    held = [_connect(port), _connect(port)]
    for s in held:
        s.sendall(b"echo\nping")
        assert s.recv(10) == b"ping"
    refused = _connect(port)
    assert _closed(refused), "refused: closed without a word"
    assert proxy.wait_event("client.refused", 5, lambda e: e.get("listener") == "limited")
    for s in (*held, refused):
        s.close()


def test_drain_closes_a_silent_relay_at_once_and_cuts_a_busy_one_at_drain_timeout(
    origin: TCPOrigin, tmp_path: Path
) -> None:
    path = tmp_path / "persistproxy.toml"
    path.write_text(
        f"""
drain_timeout = 2

[[listener]]
name = "tcp"
bind = "tcp:0:interface=127.0.0.1"
protocol = "tcp"
upstream = "origin"

[[upstream]]
name = "origin"
servers = ["127.0.0.1:{origin.port}"]
"""
    )
    proxy = Proxy(str(path), cwd=str(tmp_path), listener="tcp")
    try:
        port = _port(proxy, "tcp")
        silent = _connect(port)  # never sends a byte, gets none
        busy = _connect(port)
        busy.sendall(b"hold\n")  # a relay that carried bytes and is still open
        assert proxy.wait_event("access", 0.5) is None
        time.sleep(0.3)  # both relays are up
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        assert _closed(silent), "closed: nothing was ever relayed"
        assert _closed(busy), "cut at drain_timeout"
        cut_after = time.monotonic() - started
        assert proxy.proc.wait(10) == 0
        [timeout] = proxy.events("drain.timeout")
        assert timeout["open_connections"] == 1, "only the busy relay was left to cut"
        lines = [e for e in proxy.events("access") if e.get("listener") == "tcp"]
        assert sorted((e["bytes_up"], e["reason"]) for e in lines) == [(0, "drain"), (5, "drain")]
        print(f"\nbusy relay cut {cut_after:.1f} s after SIGTERM (drain_timeout = 2)")
        for s in (silent, busy):
            s.close()
    finally:
        proxy.terminate(5)
        proxy.kill()


def test_list_protocols() -> None:
    out = subprocess.run(
        [TWISTD, "persistproxy", "--list-protocols"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    names = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines()}
    assert names["tcp"].startswith("raw TCP relay")
    assert names["http"].startswith("HTTP/1.1")


def test_nothing_went_wrong_inside_the_proxy(proxy: Proxy) -> None:
    """Last in this module: no traceback and no error event in all that the proxy logged."""
    bad = [
        e
        for e in proxy.events()
        if "traceback" in e or e.get("level") in ("error", "critical")
    ]
    assert bad == []
