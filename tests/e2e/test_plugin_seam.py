"""
The seam every protocol plugs into, end to end: a third-party plugin written only against
persistproxy.interfaces (tests/plugins/.../echo_plugin.py, found on PYTHONPATH as a user's
package would be) gets per-client limits, max_connections with holding, graceful drain and
TLS termination from the listener, without a line of its own for any of them.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2ehelpers import Proxy
from pki import PKI, make_pki

PLUGIN_PATH = str(Path(__file__).resolve().parent.parent / "plugins")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _config(pki: PKI) -> str:
    cert, key = pki.site
    return f"""
drain_timeout = 5

[[listener]]
name = "echo"
bind = "tcp:0:interface=127.0.0.1"
protocol = "echo-line"
greeting = "hi:"
max_connections_per_client = 2

[[listener]]
name = "full"
bind = "tcp:0:interface=127.0.0.1"
protocol = "echo-line"
max_connections = 2

[[listener]]
name = "tls"
bind = "tcp:0:interface=127.0.0.1"
protocol = "echo-line"
greeting = "tls:"
[listener.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
alpn = ["echo"]
"""


@pytest.fixture
def proxy(tmp_path: Path, pki: PKI) -> Iterator[Proxy]:
    path = tmp_path / "persistproxy.toml"
    path.write_text(_config(pki))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [PLUGIN_PATH, os.environ.get("PYTHONPATH")]))}
    p = Proxy(str(path), cwd=str(tmp_path), listener="tls", env=env)
    yield p
    p.terminate(10)
    p.kill()


def _ports(proxy: Proxy) -> dict[str, int]:
    return {e["listener"]: int(e["port"]) for e in proxy.events("listener.started")}


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _line(s: socket.socket | ssl.SSLSocket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _closed(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_the_plugin_echoes(proxy: Proxy) -> None:
    with _connect(_ports(proxy)["echo"]) as s:
        s.sendall(b"one\ntw")
        assert _line(s) == b"hi:one\n"
        s.sendall(b"o\n")
        assert _line(s) == b"hi:two\n"


def test_per_client_limit_is_the_listeners_and_uses_the_plugins_refusal(proxy: Proxy) -> None:
    port = _ports(proxy)["echo"]
    a, b = _connect(port), _connect(port)
    for s in (a, b):
        s.sendall(b"x\n")
        assert _line(s) == b"hi:x\n"
    refused = _connect(port)
    assert _line(refused) == b"refused: too many connections from your address\n"
    assert _closed(refused)
    assert proxy.wait_event("client.refused", 5, lambda e: e.get("listener") == "echo")
    a.close()
    # The slot frees when the listener sees the close.
    deadline = time.monotonic() + 5
    while True:
        c = _connect(port)
        c.sendall(b"y\n")
        answer = _line(c)
        c.close()
        if answer == b"hi:y\n" or time.monotonic() > deadline:
            break
    assert answer == b"hi:y\n"
    b.close()


def test_max_connections_holds_the_next_client_unread_until_a_slot_frees(proxy: Proxy) -> None:
    port = _ports(proxy)["full"]
    a, b = _connect(port), _connect(port)
    for s in (a, b):
        s.sendall(b"x\n")
        assert _line(s) == b"x\n"
    held = _connect(port)  # accepted by the kernel (backlog) or held unread by the listener
    held.sendall(b"waiting\n")
    held.settimeout(0.5)
    with pytest.raises(TimeoutError):
        held.recv(100)
    a.close()
    assert _line(held) == b"waiting\n", "served once a slot freed"
    for s in (b, held):
        s.close()


def test_tls_is_terminated_by_the_listener(proxy: Proxy, pki: PKI) -> None:
    port = _ports(proxy)["tls"]
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    ctx.set_alpn_protocols(["echo"])
    with ctx.wrap_socket(_connect(port), server_hostname="site.test") as s:
        assert s.selected_alpn_protocol() == "echo"
        s.sendall(b"secret\n")
        assert _line(s) == b"tls:secret\n"
    with _connect(port) as plain:
        plain.sendall(b"HELLO\n")
        assert _line(plain) == b"speak TLS\n", "the plugin's plaintext_answer"


def test_drain_closes_idle_connections_and_lets_busy_ones_finish(proxy: Proxy) -> None:
    port = _ports(proxy)["echo"]
    idle, busy = _connect(port), _connect(port)
    for s in (idle, busy):
        s.sendall(b"x\n")
        assert _line(s) == b"hi:x\n"
    busy.sendall(b"half a li")  # an incomplete line: the plugin is busy
    os.kill(proxy.pid, signal.SIGTERM)
    assert _closed(idle), "idle: closed at once"
    busy.sendall(b"ne\n")
    assert _line(busy) == b"hi:half a line\n"
    assert _closed(busy), "busy: closed once its work was done"
    assert proxy.proc.wait(10) == 0
    assert proxy.events("drain.finished")
