"""
What an operator reads and sees, in memory: refused requests' access lines say what was
parsed of them, plain HTTP to a TLS port is counted and logged, the listen backlog is 511
unless the endpoint says otherwise, lines on a terminal are for a person, and [log] level
applies to Twisted's own lines.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from fakes import OK_RESPONSE, Harness, parse_response
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel

from persistproxy.config import parse_config
from persistproxy.logs import AccessLog, make_event_log, twisted_observer
from persistproxy.metrics import ListenerStats
from persistproxy.net.sockopts import DEFAULT_BACKLOG, with_default_backlog
from persistproxy.service import ProxyService
from persistproxy.tap import protocol_plugins

# -- refused requests' access lines -------------------------------------------------------------


def _access(h: Harness) -> dict[str, Any]:
    lines = h.events("access")
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("request_bytes", "status", "line"),
    [
        # Judged once the head is complete: everything is known.
        (b"GET /no-host?secret=1 HTTP/1.1\r\n\r\n", 400, ("GET", "/no-host", "1.1")),
        (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501, ("BREW", "/pot", "1.1")),
        (b"GET /v HTTP/1.2\r\nHost: x\r\n\r\n", 505, ("GET", "/v", "1.2")),
        (b"PUT /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
         ("PUT", "/te", "1.1")),
        (b"GET /old HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, ("GET", "/old", "1.0")),
        # Refused inside the head: the request line was complete when a header came.
        (b"GET /big HTTP/1.1\r\nHost: x\r\n" + (b"X: " + b"a" * 1000 + b"\r\n") * 20, 431,
         ("GET", "/big", "1.1")),
        (b"GET /many HTTP/1.1\r\nHost: x\r\n" + b"X: a\r\n" * 101 + b"\r\n", 431,
         ("GET", "/many", "1.1")),
        # Refused inside the request line: what was read of it.
        (b"GET /" + b"a" * 20000, 431, ("GET", "/" + "a" * 16383, "-")),
        (b"\x16\x03\x01garbage\r\n\r\n", 400, ("-", "-", "-")),
    ],
)  # fmt: skip
def test_a_refused_request_has_its_method_target_and_version_in_its_access_line(
    request_bytes: bytes, status: int, line: tuple[str, str, str]
) -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(request_bytes)
    assert parse_response(transport.value())[0] == status
    access = _access(h)
    assert (access["status"], access["method"], access["version"]) == (status, line[0], line[2])
    assert access["path"].startswith(line[1][:100]) and "secret" not in access["path"]


def test_a_request_timed_out_in_its_head_has_its_line(capfd: pytest.CaptureFixture[str]) -> None:
    h = Harness()
    client, transport = h.client()
    client.dataReceived(b"POST /slow HTTP/1.1\r\nHost: x\r\n")
    h.clock.advance(10.1)
    assert parse_response(transport.value())[0] == 408
    access = _access(h)
    assert (access["method"], access["path"], access["version"]) == ("POST", "/slow", "1.1")


def test_a_body_refused_midway_keeps_its_requests_line() -> None:
    h = Harness(listener={"max_body_size": 10})
    client, transport = h.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.dataReceived(b"20\r\n" + b"x" * 32 + b"\r\n")
    assert b" 413 " in transport.value()
    access = _access(h)
    assert (access["method"], access["path"], access["version"]) == ("POST", "/up", "1.1")


def test_answered_requests_keep_their_line() -> None:
    h = Harness()
    client, _ = h.client()
    client.dataReceived(b"GET /ok HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    h.origin.respond(OK_RESPONSE)
    access = _access(h)
    assert (access["method"], access["path"], access["version"]) == ("GET", "/ok", "1.0")


# -- plain HTTP to a TLS port ---------------------------------------------------------------


def test_plain_http_to_a_tls_port_is_answered_counted_and_logged(tmp_path: Any) -> None:
    from pki import make_pki

    from persistproxy.tls.server import ListenerTLSSettings, ServerTLS
    from persistproxy.tls.transport import TLSListenerFactory

    pki = make_pki(tmp_path)
    stream = io.StringIO()
    stats = ListenerStats()
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
    factory = TLSListenerFactory(
        ServerTLS(ListenerTLSSettings(certificates=(pki.site,)), "secure"),
        Factory.forProtocol(Protocol),
        stats,
        make_event_log(stream),
        Clock(),
        plaintext_answer=answer,
    )
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /login?password=x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert transport.value().startswith(answer)
    assert (stats.tls_plaintext, stats.bad_requests, stats.responses) == (1, 1, {4: 1})
    [event] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert event["event"] == "tls.plaintext" and event["level"] == "warning"
    assert (event["listener"], event["method"], event["path"]) == ("secure", "GET", "/login")
    assert event["status"] == 400


# -- the listen backlog -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "backlog"),
    [
        ("tcp:8080:interface=127.0.0.1", DEFAULT_BACKLOG),
        ("tcp:8080:interface=127.0.0.1:backlog=4096", 4096),
        ("tcp:8080:backlog=64:interface=127.0.0.1", 64),
    ],
)
def test_listeners_listen_with_a_backlog_of_511_unless_told(bind: str, backlog: int) -> None:
    reactor = MemoryReactorClock()
    doc = {
        "listener": [{"name": "web", "bind": bind, "upstream": "app"}],
        "upstream": [{"name": "app", "servers": ["127.0.0.1:1"]}],
    }
    config = parse_config(doc, "<test>", {n: p.validate for n, p in protocol_plugins().items()})
    service = ProxyService(reactor, config, protocol_plugins(), make_event_log(io.StringIO()))
    service.privilegedStartService()
    [(port, _factory, listened_backlog, interface)] = reactor.tcpServers
    assert (port, listened_backlog, interface) == (8080, backlog, "127.0.0.1")


def test_the_default_backlog_is_added_only_where_a_backlog_applies() -> None:
    assert with_default_backlog("unix:/run/pp.sock") == "unix:/run/pp.sock:backlog=511"
    assert with_default_backlog("unix:/run/pp.sock:backlog=8") == "unix:/run/pp.sock:backlog=8"
    assert with_default_backlog("systemd:domain=INET:name=web") == "systemd:domain=INET:name=web"
    assert (
        with_default_backlog("tcp6:80:interface=\\:\\:1") == "tcp6:80:interface=\\:\\:1:backlog=511"
    )


# -- lines for a person on a terminal; [log] level for Twisted's lines ------------------------


def test_events_on_a_terminal_are_lines_for_a_person() -> None:
    stream = io.StringIO()
    make_event_log(stream, console=True, colors=False).info("listener.started", port=8080)
    line = stream.getvalue()
    assert not line.startswith("{")
    assert "[info" in line and "listener.started" in line and "port=8080" in line


def test_access_lines_on_a_terminal_are_lines_for_a_person() -> None:
    stream = io.StringIO()
    access = AccessLog(Clock(), stream, buffer_size=0, console=True, colors=False)
    access.log("web", "10.0.0.1", "GET", "/a", "1.1", 200, 5, 1.25, "s:1", True, 0)
    line = stream.getvalue()
    assert not line.startswith("{")
    assert "access" in line and "GET /a HTTP/1.1" in line and "status=200" in line


def test_twisteds_own_lines_follow_the_configured_level() -> None:
    stream = io.StringIO()
    observe = twisted_observer(stream, level="warning")
    for level, text in ((LogLevel.info, "Site starting"), (LogLevel.warn, "careful")):
        observe({"log_level": level, "log_format": text, "log_time": 0.0, "log_namespace": "t"})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e["level"]) for e in lines] == [("careful", "warning")]
    stream = io.StringIO()
    twisted_observer(stream, level="info", console=True)(
        {"log_level": LogLevel.info, "log_format": "Site starting", "log_time": 0.0}
    )
    assert "Site starting" in stream.getvalue() and not stream.getvalue().startswith("{")
