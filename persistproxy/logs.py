# -*- test-case-name: tests.unit.test_logs -*-
"""
Structured logs: one JSON object per line on standard output, for the proxy's own events
and for Twisted's; on a terminal, the same events rendered for a human (structlog's console
renderer), as C{[log] format = "auto"} decides.

The proxy's events go through structlog, built here and passed down to the objects that log
(no logger is configured at import time, and no global logging state is changed). Twisted's
own events reach the same output through L{twisted_observer}, which the twistd plugin
installs as twistd's log observer, so a journal or a log shipper sees a single format.

No line is written by the reactor thread itself: every destination is a L{LogOutput}, a
bounded buffer emptied by a thread of its own. A reader that stops reading (a full pipe, a
busy journald, a slow disk) blocks that thread only; once the buffer is full, lines are
dropped and counted (C{persistproxy_log_lines_dropped_total}), and one warning line says how
many when the destination takes lines again. nginx writes logs to files and HAProxy to
non-blocking syslog or rings that drop lines: a proxy must not stall for its logs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, MutableMapping
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Protocol, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger
from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import provider

from persistproxy.log_output import stdout_output

__all__ = [
    "AccessLog",
    "EventLog",
    "make_event_log",
    "route_twisted_events",
    "twisted_observer",
]

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


class TextSink(Protocol):
    """
    Where lines are written: a L{LogOutput}, or in tests any text stream.
    """

    def write(self, text: str, /) -> Any: ...

    def flush(self) -> Any: ...


def console_renderer(colors: bool = True) -> structlog.dev.ConsoleRenderer:
    """
    How an event reads on a terminal: time, level, event name, then the fields as key=value.
    """
    return structlog.dev.ConsoleRenderer(colors=colors, timestamp_key="ts")


def make_event_log(
    stream: TextSink | None = None, level: str = "info", console: bool = False, colors: bool = True
) -> EventLog:
    """
    A logger writing JSON lines to C{stream} (L{stdout_output} by default), or lines for a
    human with C{console} (a terminal), in colour with C{colors}.

    Filtered-out levels cost one method call, so debug events may stay in hot paths.
    """
    renderer: Any = (
        console_renderer(colors) if console else structlog.processors.JSONRenderer(default=str)
    )
    logger: EventLog = structlog.wrap_logger(
        structlog.WriteLogger(cast(TextIO, stream or stdout_output())),
        processors=[
            structlog.processors.add_log_level,
            _timestamp,
            renderer,
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


#: Numeric rank of every level name, Twisted's "critical" included (never filtered out).
_RANKS = {**_LEVELS, "critical": logging.CRITICAL}


class _TwistedRoute:
    """
    Where L{twisted_observer} sends Twisted's events when twistd calls it without
    arguments (it is named by twistd's C{--logger} option, a dotted name, so it cannot be
    given arguments): set by the twistd plugin with L{route_twisted_events} once the
    configuration is loaded, before twistd begins logging.
    """

    output: TextSink | None = None
    level = "info"
    console = False
    colors = True


def route_twisted_events(
    output: TextSink, level: str, console: bool = False, colors: bool = True
) -> None:
    """
    Send Twisted's events to C{output}, at C{level} and above (C{[log] level} applies to
    them as to ours), as JSON lines or, with C{console}, as lines for a human.
    """
    _TwistedRoute.output = output
    _TwistedRoute.level = level
    _TwistedRoute.console = console
    _TwistedRoute.colors = colors


def twisted_observer(
    stream: TextSink | None = None, level: str | None = None, console: bool | None = None
) -> Callable[[dict[str, Any]], None]:
    """
    A twistd log observer that renders Twisted's events in the proxy's line format (JSON,
    or the console's on a terminal), dropping those below the configured level.

    It writes to L{stdout_output}, like the event log, unless L{route_twisted_events} or
    C{stream} says otherwise: twistd also sends what is printed to C{sys.stdout} and
    C{sys.stderr} here once logging has begun, so nothing written that way can block either.
    """
    out = stream or _TwistedRoute.output or stdout_output()
    floor = _RANKS[level or _TwistedRoute.level]
    if console is None:
        console = _TwistedRoute.console
    render: Callable[[dict[str, Any]], str] = (
        _console_line(console_renderer(_TwistedRoute.colors))
        if console
        else (lambda record: json.dumps(record, default=str))
    )

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        level_name = _TWISTED_LEVELS.get(event.get("log_level", LogLevel.info), "info")
        if _RANKS[level_name] < floor:
            return
        record: dict[str, Any] = {
            "event": formatEvent(event),
            "level": level_name,
            "ts": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
                timespec="milliseconds"
            ),
            "source": event.get("log_namespace", "twisted"),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        out.write(render(record) + "\n")
        out.flush()

    return observe  # type: ignore[no-any-return]


def _console_line(renderer: structlog.dev.ConsoleRenderer) -> Callable[[dict[str, Any]], str]:
    def render(record: dict[str, Any]) -> str:
        return str(renderer(None, record.get("level", "info"), dict(record)))

    return render


class AccessLog:
    """
    One JSON line per exchange, in the same shape as the other events, written in batches.

    Rendering through structlog's processor chain and flushing standard output on every
    request cost as much CPU as proxying the request itself (measured: 22 µs against 25 µs),
    so access lines are encoded with the C JSON encoder and written at most every
    C{flush_interval} seconds or whenever C{buffer_size} bytes are pending, like nginx's
    C{access_log ... buffer= flush=}. A crash loses at most that window of access lines;
    every other event is handed to its output at once. A batch goes to a L{LogOutput}
    (standard output or the C{[log] access_log} file), so writing it never blocks.
    """

    def __init__(
        self,
        clock: Any,
        stream: TextSink | None = None,
        flush_interval: float = 0.5,
        buffer_size: int = 64 * 1024,
        console: bool = False,
        colors: bool = True,
    ) -> None:
        """
        @param console: render lines for a human (a terminal) instead of JSON: slower, and
            only ever chosen for a terminal.
        """
        self._clock = clock
        self._console: Callable[[dict[str, Any]], str] | None = (
            _console_line(console_renderer(colors)) if console else None
        )
        self._stream = stream or stdout_output()
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
        if self._console is not None:
            self._console_line(
                now, listener, client, method, path, version, status, nbytes, duration_ms,
                upstream, upstream_reused, retries, extra,
            )  # fmt: skip
            return
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
        if self._console is not None:
            record = {
                "event": "access",
                "level": "info",
                "ts": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
                **fields,
            }
            self._add(self._console(record))
            return
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

    def _console_line(self, now: float, *fields: Any) -> None:
        (listener, client, method, path, version, status, nbytes, duration_ms) = fields[:8]
        upstream, upstream_reused, retries, extra = fields[8:]
        record: dict[str, Any] = {
            "event": "access",
            "level": "info",
            "ts": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            "listener": listener,
            "client": client,
            "request": f"{method} {path} HTTP/{version}",
            "status": status,
            "bytes": nbytes,
            "duration_ms": round(duration_ms, 3),
            "upstream": upstream,
            "upstream_reused": upstream_reused,
            "retries": retries,
            **(extra or {}),
        }
        assert self._console is not None
        self._add(self._console(record))

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
