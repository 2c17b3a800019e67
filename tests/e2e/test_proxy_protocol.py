"""
The PROXY protocol end to end, with HAProxy (Debian's package) as the real sender and receiver:

 - HAProxy `mode tcp` with `send-proxy` / `send-proxy-v2` in front of an http listener with
   `proxy_protocol = true`: the origin's X-Forwarded-For, the access line and the per-client
   limit all see the client (connecting from 127.0.0.2), not HAProxy; its health checks (v2
   LOCAL, then an HTTP check) are served as HAProxy itself; the same in front of a tcp
   listener, and of a TLS listener (the header comes in clear, before the handshake);
 - persistproxy's `send_proxy_protocol = "v1" | "v2"` to HAProxy `bind ... accept-proxy`
   (`option forwardfor header X-Client`): HAProxy takes each connection's client from our
   header, from an http listener (connections per client, never lent to another), from a tcp
   listener, and through TLS to the upstream (header first, in clear);
 - raw sockets: no header, a header never completed, a peer outside `proxy_protocol_from`,
   a v2 LOCAL health check.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ProxyFactory
from e2ehelpers import (
    ManagedProc,
    Origin,
    RawConn,
    Response,
    assert_no_traceback,
    free_port,
    make_config,
    metric,
    scrape,
    wait_until,
    with_metrics,
)
from pki import PKI, make_pki

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
TCP_ORIGIN = Path(__file__).resolve().parent / "tcp_origin.py"
CLIENT = "127.0.0.2"  # clients connect from here; HAProxy and persistproxy from 127.0.0.1
OTHER = "127.0.0.3"
LOCAL_V2 = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"

pytestmark = pytest.mark.skipif(
    not Path(HAPROXY).exists(), reason="haproxy is not installed (scripts/system-deps.sh)"
)


class HAProxy(ManagedProc):
    """HAProxy in the foreground (-db), its log on stdout, ready once its monitor answers."""

    name = "haproxy"

    def __init__(self, directory: Path, sections: str) -> None:
        self.monitor = free_port()
        config = directory / f"haproxy-{self.monitor}.cfg"
        config.write_text(
            "global\n"
            "    log stdout format raw local0 info\n"
            "defaults\n"
            "    log global\n"
            "    timeout connect 5s\n"
            "    timeout client 30s\n"
            "    timeout server 30s\n"
            "frontend monitor\n"
            "    mode http\n"
            f"    bind 127.0.0.1:{self.monitor}\n"
            "    monitor-uri /ready\n" + sections
        )
        super().__init__([HAPROXY, "-f", str(config), "-db"])
        if not wait_until(self._ready, 10, 0.1):
            self.kill()
            raise RuntimeError(f"haproxy did not start: {self.all_output()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}/ready", timeout=1):
                return True
        except OSError:
            return False


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[str], HAProxy]]:
    started: list[HAProxy] = []

    def start(sections: str) -> HAProxy:
        h = HAProxy(tmp_path, sections)
        started.append(h)
        return h

    yield start
    for h in started:
        h.kill()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


class ConnFrom(RawConn):
    """A RawConn from a chosen loopback source address."""

    def __init__(self, port: int, source: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False


def _echo(response: Response) -> dict[str, list[str]]:
    """The request headers the origin received, by lower-case name."""
    assert response.status == 200, response
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return headers


def _sender(port: int, server_port: int, option: str, backend: str = "") -> str:
    """A `mode tcp` HAProxy frontend on `port` whose server (persistproxy) gets `option`."""
    return (
        "frontend fe\n"
        "    mode tcp\n"
        f"    bind 127.0.0.1:{port}\n"
        "    default_backend be\n"
        "backend be\n"
        "    mode tcp\n"
        f"{backend}"
        f"    server pp 127.0.0.1:{server_port} {option}\n"
    )


def _receiver(port: int, origin_port: int, bind_options: str = "accept-proxy") -> str:
    """A `mode http` HAProxy frontend on `port` that takes the client from a PROXY header."""
    return (
        "frontend fe\n"
        "    mode http\n"
        "    option httplog\n"
        "    option forwardfor header X-Client\n"
        "    timeout http-keep-alive 30s\n"
        f"    bind 127.0.0.1:{port} {bind_options}\n"
        "    default_backend be\n"
        "backend be\n"
        "    mode http\n"
        f"    server origin 127.0.0.1:{origin_port}\n"
    )


# -- HAProxy sends, persistproxy receives --------------------------------------------------------


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_behind_haproxy_the_carried_address_is_the_client(
    option: str,
    origin: Origin,
    proxy_factory: ProxyFactory,
    haproxy: Callable[[str], HAProxy],
) -> None:
    proxy = proxy_factory(
        origin, listener={"proxy_protocol": True, "max_connections_per_client": 1}
    )
    front = free_port()
    haproxy(_sender(front, proxy.port, option))
    with ConnFrom(front, CLIENT) as first:
        headers = _echo(first.roundtrip("GET", "/echo/first"))
        assert headers["x-forwarded-for"] == [CLIENT]
        line = proxy.wait_event("access", 5, lambda e: e["path"] == "/echo/first")
        assert line is not None and line["client"] == CLIENT
        # `first` stays open: the per-client limit counts the carried address...
        with ConnFrom(front, CLIENT) as second:
            refused = second.roundtrip("GET", "/echo/second")
            assert refused.status == 503, refused
        event = proxy.wait_event("client.refused", 5)
        assert event is not None and event["client"] == CLIENT
        # ...not HAProxy's, which every client shares.
        with ConnFrom(front, OTHER) as other:
            assert _echo(other.roundtrip("GET", "/echo/other"))["x-forwarded-for"] == [OTHER]
    assert not proxy.events("proxy_protocol.invalid")
    assert_no_traceback(proxy)


def test_haproxys_v2_local_health_checks_are_served_as_haproxy_itself(
    origin: Origin, proxy_factory: ProxyFactory, haproxy: Callable[[str], HAProxy]
) -> None:
    proxy = proxy_factory(origin, listener={"proxy_protocol": True})
    front = free_port()
    checks = "    option httpchk GET /echo/health-check\n"
    h = haproxy(
        _sender(
            front, proxy.port, "send-proxy-v2 check check-send-proxy inter 200ms", checks
        )
    )
    line = proxy.wait_event("access", 10, lambda e: e["path"] == "/echo/health-check")
    assert line is not None and line["client"] == "127.0.0.1", "LOCAL: the sender itself"
    assert proxy.wait_event(
        "access", 10, lambda e: e["path"] == line["path"] and e["ts"] != line["ts"]
    ), "and the next"
    assert not [s for s in h.all_output() if "is DOWN" in s], "every check passed"
    with ConnFrom(front, CLIENT) as client:
        assert _echo(client.roundtrip())["x-forwarded-for"] == [CLIENT]
    assert not proxy.events("proxy_protocol.invalid")


class TCPOrigin(ManagedProc):
    name = "tcp-origin"

    def __init__(self) -> None:
        super().__init__([sys.executable, str(TCP_ORIGIN)], merge_stderr=False)
        line = self.wait_line(lambda s: s.startswith('{"port"'), 10)
        if line is None:
            self.kill()
            raise RuntimeError(f"tcp origin did not start: {self.all_output()}")
        self.port = int(json.loads(line)["port"])


@pytest.fixture
def tcp_origin() -> Iterator[TCPOrigin]:
    o = TCPOrigin()
    yield o
    o.kill()


def test_a_tcp_listener_behind_haproxy_logs_the_carried_client(
    tcp_origin: TCPOrigin, proxy_factory: ProxyFactory, haproxy: Callable[[str], HAProxy]
) -> None:
    proxy = proxy_factory(
        listener={"protocol": "tcp", "proxy_protocol": True},
        servers=[f"127.0.0.1:{tcp_origin.port}"],
    )
    front = free_port()
    haproxy(_sender(front, proxy.port, "send-proxy"))
    with socket.create_connection(("127.0.0.1", front), 5, source_address=(CLIENT, 0)) as s:
        s.sendall(b"echo\nhello through two proxies")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data == b"hello through two proxies"
    line = proxy.wait_event("access", 10, lambda e: e.get("protocol") == "tcp")
    assert line is not None and line["client"] == CLIENT
    assert line["bytes_up"] == len(b"echo\nhello through two proxies")


def test_a_tls_listener_reads_the_header_before_the_handshake(
    origin: Origin,
    proxy_factory: ProxyFactory,
    haproxy: Callable[[str], HAProxy],
    pki: PKI,
) -> None:
    cert, key = pki.site
    proxy = proxy_factory(
        config_text=f"""
[[listener]]
name = "web"
bind = "tcp:0:interface=127.0.0.1"
upstream = "app"
proxy_protocol = true
[listener.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]

[[upstream]]
name = "app"
servers = ["127.0.0.1:{origin.port}"]
"""
    )
    front = free_port()
    haproxy(_sender(front, proxy.port, "send-proxy-v2"))
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    raw = socket.create_connection(("127.0.0.1", front), 5, source_address=(CLIENT, 0))
    with context.wrap_socket(raw, server_hostname="site.test") as s:
        s.sendall(b"GET /echo/tls HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    sent = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert sent["x-forwarded-for"] == CLIENT
    line = proxy.wait_event("access", 5, lambda e: e["path"] == "/echo/tls")
    assert line is not None and line["client"] == CLIENT and line["tls_version"]


# -- persistproxy sends, HAProxy receives --------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_takes_each_client_from_our_header_and_connections_stay_per_client(
    version: str,
    origin: Origin,
    proxy_factory: ProxyFactory,
    haproxy: Callable[[str], HAProxy],
) -> None:
    back = free_port()
    h = haproxy(_receiver(back, origin.port))
    config = with_metrics(
        make_config([f"127.0.0.1:{back}"], None, {"send_proxy_protocol": version})
    )
    proxy = proxy_factory(config_text=config)
    with ConnFrom(proxy.port, CLIENT) as alice, ConnFrom(proxy.port, OTHER) as bob:
        for conn, who in ((alice, CLIENT), (bob, OTHER), (alice, CLIENT), (bob, OTHER)):
            headers = _echo(conn.roundtrip("GET", f"/echo/{who}"))
            assert headers["x-client"] == [who], "HAProxy read the client from our header"
            assert headers["x-forwarded-for"] == [who], "and ours agrees"
        alice_port = alice.sock.getsockname()[1]
        logged = h.wait_line(lambda s: f"{CLIENT}:{alice_port} " in s, 5)
        assert logged is not None, "the header carried alice's port too"
    connects = metric(
        scrape(proxy),
        f'persistproxy_upstream_connects_total{{server="127.0.0.1:{back}",upstream="app"}}',
    )
    assert connects == 2, "one upstream connection per client connection, each reused"
    assert_no_traceback(proxy)


def test_a_tcp_listener_sends_its_clients_header(
    origin: Origin, proxy_factory: ProxyFactory, haproxy: Callable[[str], HAProxy]
) -> None:
    back = free_port()
    haproxy(_receiver(back, origin.port))
    proxy = proxy_factory(
        listener={"protocol": "tcp"},
        upstream={"send_proxy_protocol": "v2"},
        servers=[f"127.0.0.1:{back}"],
    )
    with ConnFrom(proxy.port, CLIENT) as client:
        assert _echo(client.roundtrip("GET", "/echo/relayed"))["x-client"] == [CLIENT]


def test_over_tls_to_the_upstream_the_header_goes_first_in_clear(
    origin: Origin,
    proxy_factory: ProxyFactory,
    haproxy: Callable[[str], HAProxy],
    pki: PKI,
    tmp_path: Path,
) -> None:
    cert, key = pki.site
    combined = tmp_path / "haproxy.pem"
    combined.write_bytes(Path(cert).read_bytes() + Path(key).read_bytes())
    back = free_port()
    haproxy(_receiver(back, origin.port, f"accept-proxy ssl crt {combined}"))
    upstream = {
        "send_proxy_protocol": "v1",
        "tls": True,
        "tls_ca": str(pki.ca_pem),
        "tls_server_name": "site.test",
    }
    proxy = proxy_factory(upstream=upstream, servers=[f"127.0.0.1:{back}"])
    for source in (CLIENT, OTHER):
        with ConnFrom(proxy.port, source) as client:
            assert _echo(client.roundtrip("GET", "/echo/tls-up"))["x-client"] == [source]


# -- raw sockets -----------------------------------------------------------------------------------


def test_without_a_header_the_connection_closes_unanswered_and_nothing_reaches_the_origin(
    fresh_origin: Origin, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(fresh_origin, listener={"proxy_protocol": True})
    with RawConn(proxy.port) as conn:
        conn.request("GET", "/echo/smuggled")
        assert conn.closed_within(5), "closed, and without a byte of answer"
    event = proxy.wait_event("proxy_protocol.invalid", 5)
    assert event is not None and event["reason"] == "not a PROXY protocol header"
    assert event["peer"] == "127.0.0.1" and event["listener"] == "web"
    assert fresh_origin.stats()["accepts"] == 0, "nothing reached the origin"


def test_a_header_that_never_completes_is_cut_at_header_timeout(
    fresh_origin: Origin, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(fresh_origin, listener={"proxy_protocol": True, "header_timeout": 1})
    with RawConn(proxy.port) as conn:
        conn.send(b"PROXY TCP4 ")
        assert conn.closed_within(10)
    event = proxy.wait_event("proxy_protocol.invalid", 5)
    assert event is not None
    assert event["reason"] == "no complete header within 1s (11 bytes)"
    assert fresh_origin.stats()["accepts"] == 0


def test_a_v2_local_header_is_served_as_the_peer_itself(
    origin: Origin, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(origin, listener={"proxy_protocol": True})
    with RawConn(proxy.port) as conn:
        conn.send(LOCAL_V2)
        headers = _echo(conn.roundtrip("GET", "/echo/local"))
    assert headers["x-forwarded-for"] == ["127.0.0.1"]


def test_a_peer_outside_proxy_protocol_from_is_closed_at_accept(
    fresh_origin: Origin, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(
        fresh_origin,
        listener={"proxy_protocol": True, "proxy_protocol_from": ["10.0.0.0/8"]},
    )
    with RawConn(proxy.port) as conn:
        try:
            conn.send(b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n")
            conn.request("GET", "/echo/spoofed")
        except OSError:
            pass  # already closed: fine
        assert conn.closed_within(5)
    event = proxy.wait_event("proxy_protocol.refused", 5)
    assert event is not None and event["peer"] == "127.0.0.1"
    assert event["reason"] == "not in proxy_protocol_from"
    assert fresh_origin.stats()["accepts"] == 0


def test_a_header_with_a_bad_tlv_is_refused(
    fresh_origin: Origin, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(fresh_origin, listener={"proxy_protocol": True})
    block = bytes([127, 0, 0, 2, 127, 0, 0, 1, 0x30, 0x39, 0, 80]) + b"\x04\x00\x09ab"
    header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + len(block).to_bytes(2, "big") + block
    with RawConn(proxy.port) as conn:
        conn.send(header + b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.closed_within(5)
    event = proxy.wait_event("proxy_protocol.invalid", 5)
    assert event is not None and "overruns" in event["reason"]
    assert fresh_origin.stats()["accepts"] == 0
