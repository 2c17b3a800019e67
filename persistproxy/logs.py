# -*- test-case-name: tests.unit.test_logs -*-
"""
Structured logs: one JSON object per line on standard output, for the proxy's own events
and for Twisted's.

The proxy's events go through structlog, built here and passed down to the objects that log
(no logger is configured at import time, and no global logging state is changed). Twisted's
own events reach the same output through L{twisted_observer}, which the twistd plugin
installs as twistd's log observer, so a journal or a log shipper sees a single format.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping, MutableMapping
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger
from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import provider

__all__ = ["AccessLog", "EventLog", "make_event_log", "twisted_observer"]

EventLog = FilteringBoundLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["ts"] = datetime.now(UTC).isoformat(timespec="milliseconds")
    return event


def make_event_log(stream: TextIO | None = None, level: str = "info") -> EventLog:
    """
    A logger writing JSON lines to C{stream} (standard output by default).

    Filtered-out levels cost one method call, so debug events may stay in hot paths.
    """
    logger: EventLog = structlog.wrap_logger(
        structlog.WriteLogger(stream or sys.stdout),
        processors=[
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.JSONRenderer(default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=True,
    )
    return logger


_TWISTED_LEVELS = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}


def twisted_observer(stream: TextIO | None = None) -> Callable[[dict[str, Any]], None]:
    """
    A twistd log observer that renders Twisted's events in the proxy's JSON line format.
    """
    out = stream or sys.stdout

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "event": formatEvent(event),
            "level": _TWISTED_LEVELS.get(event.get("log_level", LogLevel.info), "info"),
            "ts": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
                timespec="milliseconds"
            ),
            "source": event.get("log_namespace", "twisted"),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        out.write(json.dumps(record, default=str) + "\n")
        out.flush()

    return observe  # type: ignore[no-any-return]


class AccessLog:
    """
    One JSON line per exchange, in the same shape as the other events, written in batches.

    Rendering through structlog's processor chain and flushing standard output on every
    request cost as much CPU as proxying the request itself (measured: 22 µs against 25 µs),
    so access lines are encoded with the C JSON encoder and written at most every
    C{flush_interval} seconds or whenever C{buffer_size} bytes are pending, like nginx's
    C{access_log ... buffer= flush=}. A crash loses at most that window of access lines;
    every other event is still written at once.
    """

    def __init__(
        self,
        clock: Any,
        stream: TextIO | None = None,
        flush_interval: float = 0.5,
        buffer_size: int = 64 * 1024,
    ) -> None:
        self._clock = clock
        self._stream = stream or sys.stdout
        self._interval = flush_interval
        self._limit = buffer_size
        self._lines: list[str] = []
        self._size = 0
        self._call: Any = None
        self._second = -1
        self._second_text = ""
        self._encode = json.JSONEncoder(separators=(", ", ": "), default=str).encode

    def log(
        self,
        listener: str,
        client: str,
        method: str,
        path: str,
        version: str,
        status: int,
        nbytes: int,
        duration_ms: float,
        upstream: str | None,
        upstream_reused: bool,
        retries: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """
        Write one access line. The fixed fields are formatted directly (the strings through
        the C JSON string encoder), which is half the cost of encoding a dict; C{extra}
        fields, such as the TLS facts of the connection, are appended with the encoder.
        """
        now = self._clock.seconds()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        q = _quote
        line = (
            f'{{"listener": {q(listener)}, "client": {q(client)}, "method": {q(method)}, '
            f'"path": {q(path)}, "version": "{version}", "status": {status}, '
            f'"bytes": {nbytes}, "duration_ms": {duration_ms:.3f}, '
            f'"upstream": {q(upstream) if upstream else "null"}, '
            f'"upstream_reused": {"true" if upstream_reused else "false"}, '
            f'"retries": {retries}, '
        )
        if extra:
            line += self._encode(extra)[1:-1] + ", "
        line += (
            f'"event": "access", "level": "info", '
            f'"ts": "{self._second_text}.{int((now - second) * 1000):03d}+00:00"}}'
        )
        self._add(line)

    def record(self, fields: Mapping[str, Any]) -> None:
        """
        Write one access line of a protocol whose lines are not HTTP exchanges (a TCP relay:
        bytes each way, the close reason): C{fields}, JSON-encodable, then the same C{event},
        C{level} and C{ts} as every access line.
        """
        now = self._clock.seconds()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        line = self._encode(fields)[:-1] if fields else "{"
        line += (
            f'{", " if fields else ""}"event": "access", "level": "info", '
            f'"ts": "{self._second_text}.{int((now - second) * 1000):03d}+00:00"}}'
        )
        self._add(line)

    def _add(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= self._limit:
            self.flush()
        elif self._call is None:
            self._call = self._clock.callLater(self._interval, self._timed_flush)

    def _timed_flush(self) -> None:
        self._call = None
        self.flush()

    def flush(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        if self._lines:
            lines, self._lines, self._size = self._lines, [], 0
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
