"""
Upgrade on an HTTP listener end to end: a `websockets` client through a real
`twistd -n persistproxy` to a real WebSocket origin (tests/e2e/ws_origin.py, `websockets`' own
server): echo of text and binary, a tunnel idle for longer than the listener's keep-alive
timeout, the tunnel idle timeout and its access line, an origin refusing the upgrade,
(raw sockets) nothing pipelined behind an Upgrade request read as HTTP, wss:// through a TLS
listener, and a tunnel cut at drain_timeout.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2ehelpers import ManagedProc, Proxy
from pki import make_pki
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

WS_ORIGIN = Path(__file__).resolve().parent / "ws_origin.py"

UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class WSOrigin(ManagedProc):
    name = "ws-origin"

    def __init__(self) -> None:
        super().__init__([sys.executable, str(WS_ORIGIN)], merge_stderr=False)
        line = self.wait_line(lambda s: s.startswith('{"port"'), 10)
        if line is None:
            self.kill()
            raise RuntimeError(f"ws origin did not start: {self.all_output()}")
        self.port = int(json.loads(line)["port"])


@pytest.fixture(scope="module")
def origin() -> Iterator[WSOrigin]:
    o = WSOrigin()
    yield o
    o.kill()


@pytest.fixture(scope="module")
def proxy(origin: WSOrigin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    d = tmp_path_factory.mktemp("ws-proxy")
    cert, key = make_pki(d).site
    path = d / "persistproxy.toml"
    path.write_text(f"""
[[listener]]
name = "web"
bind = "tcp:0:interface=127.0.0.1"
upstream = "ws"
keepalive_timeout = 1

[[listener]]
name = "idle"
bind = "tcp:0:interface=127.0.0.1"
upstream = "ws"
tunnel_idle_timeout = 1

[[listener]]
name = "tls"
bind = "tcp:0:interface=127.0.0.1"
upstream = "ws"
[listener.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]

[[upstream]]
name = "ws"
servers = ["127.0.0.1:{origin.port}"]
""")
    p = Proxy(str(path), cwd=str(d), listener="tls")
    yield p
    p.terminate(10)
    p.kill()


def _port(proxy: Proxy, listener: str) -> int:
    [event] = [e for e in proxy.events("listener.started") if e["listener"] == listener]
    return int(event["port"])


def _access(proxy: Proxy, pred: Any) -> dict[str, Any]:
    """An access line once it is written (lines go out within 0.5 s)."""
    event = proxy.wait_event("access", 10, pred)
    assert event is not None, "no such access line"
    return event


def _read_head(s: socket.socket) -> tuple[bytes, bytes]:
    """A response head and whatever came after it in the same reads."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def test_text_and_binary_messages_are_echoed_through_the_proxy(proxy: Proxy) -> None:
    with connect(f"ws://127.0.0.1:{_port(proxy, 'web')}/echo", open_timeout=10) as ws:
        ws.send("hello, tunnel")
        assert ws.recv(timeout=10) == "hello, tunnel"
        payload = bytes(range(256)) * 1024
        ws.send(payload)
        assert ws.recv(timeout=10) == payload
    line = _access(proxy, lambda e: e.get("path") == "/echo" and e.get("listener") == "web"
                   and e.get("bytes_down", 0) > len(payload))
    assert line["status"] == 101 and line["method"] == "GET"
    assert line["bytes_up"] > len(payload) and line["reason"] in ("client_fin", "upstream_fin")


def test_a_tunnel_idle_longer_than_the_keep_alive_timeout_still_works(proxy: Proxy) -> None:
    with connect(f"ws://127.0.0.1:{_port(proxy, 'web')}/echo", open_timeout=10,
                 ping_interval=None) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        time.sleep(2.5)  # the listener's keepalive_timeout is 1 s: not a tunnel's timeout
        ws.send("after")
        assert ws.recv(timeout=10) == "after"


def test_an_idle_tunnel_is_closed_at_tunnel_idle_timeout_with_an_access_line(
    proxy: Proxy,
) -> None:
    with connect(f"ws://127.0.0.1:{_port(proxy, 'idle')}/echo", open_timeout=10,
                 ping_interval=None) as ws:
        ws.send("once")
        assert ws.recv(timeout=10) == "once"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)  # nothing either way for 1 s: the proxy closes the tunnel
    line = _access(proxy, lambda e: e.get("listener") == "idle" and e.get("status") == 101)
    assert line["reason"] == "idle_timeout" and line["path"] == "/echo"
    assert line["bytes_up"] > 0 and line["bytes_down"] > 0


def test_a_refused_upgrade_leaves_the_connection_http_for_the_next_request(
    proxy: Proxy,
) -> None:
    """The request pipelined behind the refused Upgrade is held, then read as HTTP."""
    with socket.create_connection(("127.0.0.1", _port(proxy, "web")), timeout=10) as s:
        s.sendall((UPGRADE.format(path="/refuse")
                   + "GET /plain HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").encode())
        head, rest = _read_head(s)
        assert head.startswith(b"HTTP/1.1 426 "), head
        assert b"upgrade: websocket" not in head.lower()
        data = rest
        while b"plain\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
        assert b"HTTP/1.1 200 OK" in data, data
        s.sendall(b"GET /plain HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _ = _read_head(s)
        assert head.startswith(b"HTTP/1.1 200 "), "still an HTTP connection"


def test_nothing_pipelined_after_an_upgrade_is_read_as_http(proxy: Proxy) -> None:
    """The bytes behind the Upgrade request reach the WebSocket origin as WebSocket bytes:
    it fails the connection (a close frame, 1002), and no HTTP response comes back."""
    with socket.create_connection(("127.0.0.1", _port(proxy, "web")), timeout=10) as s:
        s.sendall((UPGRADE.format(path="/echo?pipelined")
                   + "GET /plain?smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").encode())
        head, rest = _read_head(s)
        assert head.startswith(b"HTTP/1.1 101 "), head
        data = rest
        while chunk := s.recv(65536):
            data += chunk
    assert b"HTTP/1.1" not in data, data
    assert data[:1] == b"\x88", f"a WebSocket close frame, not HTTP: {data!r}"
    line = _access(proxy, lambda e: e.get("path") == "/echo" and e.get("status") == 101
                   and e.get("bytes_up") == len(b"GET /plain?smuggled HTTP/1.1\r\n"
                                                b"Host: 127.0.0.1\r\n\r\n"))
    assert line["listener"] == "web"
    assert not [e for e in proxy.events("access") if e.get("path") == "/plain"
                and e.get("listener") == "web" and "smuggled" in json.dumps(e)]


def test_wss_through_a_tls_listener(proxy: Proxy) -> None:
    ca = Path(proxy.config_path).parent / "ca.pem"
    context = ssl.create_default_context(cafile=str(ca))
    port = _port(proxy, "tls")
    with connect(f"wss://127.0.0.1:{port}/echo", ssl=context, server_hostname="site.test",
                 open_timeout=10) as ws:
        for message in ("over TLS", b"\x00\xff" * 50000):
            ws.send(message)
            assert ws.recv(timeout=10) == message
    line = _access(proxy, lambda e: e.get("listener") == "tls" and e.get("status") == 101)
    assert line["bytes_down"] > 100000 and line["tls_version"].startswith("TLSv1.")


def test_the_drain_cuts_a_tunnel_at_drain_timeout(origin: WSOrigin, tmp_path: Path) -> None:
    path = tmp_path / "persistproxy.toml"
    path.write_text(f"""
drain_timeout = 2

[[listener]]
name = "web"
bind = "tcp:0:interface=127.0.0.1"
upstream = "ws"

[[upstream]]
name = "ws"
servers = ["127.0.0.1:{origin.port}"]
""")
    proxy = Proxy(str(path), cwd=str(tmp_path))
    try:
        with connect(f"ws://127.0.0.1:{proxy.port}/echo", open_timeout=10,
                     ping_interval=None) as ws:
            ws.send("busy")
            assert ws.recv(timeout=10) == "busy"
            started = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            assert proxy.wait_event("drain.started", 5) is not None
            ws.send("still open while the drain waits")
            assert ws.recv(timeout=10) == "still open while the drain waits"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)  # cut at drain_timeout
            cut_after = time.monotonic() - started
        assert proxy.proc.wait(10) == 0
        [timeout] = proxy.events("drain.timeout")
        assert timeout["open_connections"] == 1
        [line] = [e for e in proxy.events("access") if e.get("status") == 101]
        assert line["reason"] == "drain" and line["path"] == "/echo"
        print(f"\ntunnel cut {cut_after:.1f} s after SIGTERM (drain_timeout = 2)")
    finally:
        proxy.terminate(5)
        proxy.kill()
