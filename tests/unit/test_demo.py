"""
The demo origin of C{--demo} (demo.py): it shows a newcomer what reached the origin (the
request line and every header as the proxy forwarded it, Via and X-Forwarded-* included) and
the port of the origin connection, which stays the same while the upstream hop is kept alive.
"""

from __future__ import annotations

import io

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.server import Site

from persistproxy.demo import DEMO_CONFIG, DemoOrigin, demo_site


def _get(
    global_reactor: MemoryReactorClock, request: bytes, site: Site | None = None
) -> tuple[bytes, StringTransport]:
    site = site or demo_site()
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8081))
    assert protocol is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40123))
    protocol.makeConnection(transport)
    protocol.dataReceived(request)
    global_reactor.advance(0)
    return transport.value(), transport


def test_the_page_shows_the_request_as_it_reached_the_origin(
    global_reactor: MemoryReactorClock,
) -> None:
    raw, transport = _get(
        global_reactor,
        b"GET /hello?x=1 HTTP/1.1\r\nHost: demo\r\nVia: 1.1 persistproxy\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\n\r\n",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/plain; charset=utf-8" in head
    text = body.decode()
    assert text.startswith("Hello from the persistproxy demo origin.\n")
    assert "GET /hello?x=1 HTTP/1.1" in text
    for line in ("  Host: demo", "  Via: 1.1 persistproxy", "  X-Forwarded-For: 10.0.0.1"):
        assert line in text.splitlines(), text
    assert "Origin connection from port 40123 " in text
    assert not transport.disconnecting, "the upstream hop stays open"


def test_the_site_writes_no_access_log_and_shows_no_tracebacks(
    global_reactor: MemoryReactorClock,
) -> None:
    """The proxy's access log already has every request."""
    site = demo_site()
    assert site.displayTracebacks is False and site.noisy is False
    written = io.StringIO()
    site.logFile = written
    raw, _ = _get(global_reactor, b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n", site)
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert written.getvalue() == ""
    # What a plain Site would have written there:
    plain = Site(DemoOrigin())
    plain.logFile = written
    _get(global_reactor, b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n", plain)
    assert '"GET / HTTP/1.1" 200' in written.getvalue()


def test_the_demo_config_puts_the_proxy_on_its_port_in_front_of_the_origin() -> None:
    import tomllib

    document = tomllib.loads(DEMO_CONFIG.format(port=8080, origin_port=5555))
    [listener] = document["listener"]
    [upstream] = document["upstream"]
    assert listener["bind"] == "tcp:8080:interface=127.0.0.1"
    assert listener["upstream"] == upstream["name"]
    assert upstream["servers"] == ["127.0.0.1:5555"]
