"""
Structured logs (logs.py): the proxy's events and Twisted's as JSON lines of one shape, the
level filter, and access lines encoded by hand and written in batches (by time, with a
Clock, or by size).
"""

from __future__ import annotations

import io
import json

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from persistproxy.logs import AccessLog, make_event_log, twisted_observer


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_events_are_json_lines_with_level_and_timestamp() -> None:
    stream = io.StringIO()
    log = make_event_log(stream)
    log.info("listener.started", listener="web", port=8080)
    log.warning("client.refused", client="10.0.0.1", reason=b"bytes are rendered")
    first, second = _lines(stream)
    assert first["event"] == "listener.started" and first["level"] == "info"
    assert (first["listener"], first["port"]) == ("web", 8080)
    assert isinstance(first["ts"], str) and first["ts"].endswith("+00:00")
    assert second["level"] == "warning" and second["reason"] == "b'bytes are rendered'"


def test_levels_below_the_configured_one_are_dropped() -> None:
    stream = io.StringIO()
    log = make_event_log(stream, "warning")
    log.debug("client.idle_timeout")
    log.info("listener.started")
    log.warning("listener.full")
    log.error("upstream.error")
    assert [e["event"] for e in _lines(stream)] == ["listener.full", "upstream.error"]


def test_twisted_events_come_out_in_the_same_shape() -> None:
    stream = io.StringIO()
    observer = twisted_observer(stream)
    observer(
        {
            "log_format": "Site starting on {port}",
            "port": 8080,
            "log_level": LogLevel.info,
            "log_time": 0.25,
            "log_namespace": "twisted.web.server",
        }
    )
    observer({"log_format": "Unexpected {what}", "what": "thing", "log_level": LogLevel.warn})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    observer({"log_format": "boom", "log_level": LogLevel.critical, "log_failure": failure})
    site, warning, critical = _lines(stream)
    assert site == {
        "event": "Site starting on 8080",
        "level": "info",
        "ts": "1970-01-01T00:00:00.250+00:00",
        "source": "twisted.web.server",
    }
    assert (warning["event"], warning["level"], warning["source"]) == (
        "Unexpected thing",
        "warning",
        "twisted",
    )
    assert critical["level"] == "critical"
    assert "ZeroDivisionError" in str(critical["traceback"])


def test_a_logger_through_the_observer_is_one_line_per_event() -> None:
    stream = io.StringIO()
    observer = twisted_observer(stream)
    globalLogPublisher.addObserver(observer)
    try:
        Logger(namespace="persistproxy.test").info("hello {name}", name="you")
    finally:
        globalLogPublisher.removeObserver(observer)
    [event] = [e for e in _lines(stream) if e["source"] == "persistproxy.test"]
    assert event["event"] == "hello you"


# -- access lines ------------------------------------------------------------------------------


def _access(log: AccessLog, **kw: object) -> None:
    fields: dict[str, object] = {
        "listener": "web",
        "client": "10.0.0.1",
        "method": "GET",
        "path": "/a",
        "version": "HTTP/1.1",
        "status": 200,
        "nbytes": 5,
        "duration_ms": 1.23456,
        "upstream": "127.0.0.1:8081",
        "upstream_reused": True,
        "retries": 0,
    }
    fields.update(kw)
    log.log(**fields)  # type: ignore[arg-type]


def test_an_access_line_has_the_documented_fields() -> None:
    clock = Clock()
    clock.advance(1_700_000_000.5)
    stream = io.StringIO()
    log = AccessLog(clock, stream, buffer_size=0)
    _access(log)
    [line] = _lines(stream)
    assert line == {
        "listener": "web",
        "client": "10.0.0.1",
        "method": "GET",
        "path": "/a",
        "version": "HTTP/1.1",
        "status": 200,
        "bytes": 5,
        "duration_ms": 1.235,
        "upstream": "127.0.0.1:8081",
        "upstream_reused": True,
        "retries": 0,
        "event": "access",
        "level": "info",
        "ts": "2023-11-14T22:13:20.500+00:00",
    }


def test_untrusted_strings_are_escaped_and_extra_fields_appended() -> None:
    stream = io.StringIO()
    log = AccessLog(Clock(), stream, buffer_size=0)
    _access(
        log,
        path='/"}, "status": 999, "x": "\n\u00e9',
        method="G\x00T",
        upstream=None,
        extra={"tls_version": "TLSv1.3", "tls_resumed": False},
    )
    [line] = _lines(stream)
    assert line["path"] == '/"}, "status": 999, "x": "\n\u00e9'
    assert line["method"] == "G\x00T" and line["status"] == 200
    assert line["upstream"] is None
    assert (line["tls_version"], line["tls_resumed"]) == ("TLSv1.3", False)
    assert len(stream.getvalue().splitlines()) == 1, "one line, whatever the path holds"


def test_access_lines_are_written_in_batches_every_flush_interval() -> None:
    clock = Clock()
    stream = io.StringIO()
    log = AccessLog(clock, stream, flush_interval=0.5)
    _access(log, path="/1")
    clock.advance(0.2)
    _access(log, path="/2")
    assert stream.getvalue() == "", "held for the batch"
    assert len(clock.getDelayedCalls()) == 1, "one timer per batch, not per line"
    clock.advance(0.3)
    assert [e["path"] for e in _lines(stream)] == ["/1", "/2"]
    assert clock.getDelayedCalls() == []
    _access(log, path="/3")
    log.flush()  # at exit: what is held is written, and the timer goes
    assert [e["path"] for e in _lines(stream)] == ["/1", "/2", "/3"]
    assert clock.getDelayedCalls() == []


def test_a_full_buffer_is_written_at_once() -> None:
    clock = Clock()
    stream = io.StringIO()
    log = AccessLog(clock, stream, flush_interval=60, buffer_size=1000)
    n = 0
    while stream.getvalue() == "":
        n += 1
        assert n < 100, "100 lines of about 300 bytes and still nothing written"
        _access(log, path=f"/{n}")
    assert 1000 <= len(stream.getvalue()) < 1400, "written once the buffer size is reached"
    assert [e["path"] for e in _lines(stream)] == [f"/{i}" for i in range(1, n + 1)]
    assert clock.getDelayedCalls() == [], "the batch timer goes with the batch"
