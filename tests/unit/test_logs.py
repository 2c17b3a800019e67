"""
Structured logs (logs.py). The lines: the proxy's events and Twisted's as JSON lines of one
shape, the level filter, and access lines encoded by hand and written in batches (by time,
with a Clock, or by size). Their outputs: a destination that stops taking lines never blocks
the caller; the buffer is bounded; what does not fit is dropped, counted and reported once,
in place, when writing resumes; a file output is reopened on SIGUSR1; exit writes what is
held, in bounded time.

The buffer (L{_Pending}) is tested step by step without threads. The writer thread is tested
with sinks that block on an event the test controls: each step waits on an event (with a
timeout), never on a sleep.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from persistproxy.log_output import FdSink, FileSink, LogOutput, LogReopener, _Pending
from persistproxy.logs import AccessLog, make_event_log, twisted_observer
from persistproxy.metrics import ProxyStats, StatsCollector

WAIT = 10.0


def line(n: int, size: int = 30) -> bytes:
    """A line of C{size} bytes, newline included, that says which it is."""
    text = f"line {n} "
    return (text + "x" * (size - len(text) - 1) + "\n").encode()


def warnings_in(data: bytes) -> list[dict[str, Any]]:
    out = []
    for raw in data.splitlines():
        if raw.startswith(b"{"):
            record = json.loads(raw)
            if record["event"] == "log.lines_dropped":
                out.append(record)
    return out


# -- the lines: events, Twisted's events, access lines ------------------------------------------


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


# -- the buffer, step by step ------------------------------------------------------------------


def test_lines_within_the_bound_come_out_in_order_without_a_warning() -> None:
    pending = _Pending("stdout", 100)
    pending.add(line(1))
    pending.add(line(2))
    assert pending.ready()
    assert pending.take() == line(1) + line(2)
    pending.written(True)
    assert not pending.ready()
    assert pending.dropped == 0


def test_a_full_buffer_drops_whole_lines_and_counts_them() -> None:
    pending = _Pending("stdout", 100)
    for n in range(1, 6):
        pending.add(line(n))  # 30 bytes each: three fit in 100
    assert pending.dropped == 2
    # Once dropping, a line that would fit is dropped too, so the gap has one place.
    pending.add(b"tiny\n")
    assert pending.dropped == 3
    data = pending.take()
    assert data.startswith(line(1) + line(2) + line(3))
    [warning] = warnings_in(data)
    assert data.endswith((json.dumps(warning) + "\n").encode())
    assert warning["level"] == "warning"
    assert (warning["output"], warning["dropped"], warning["dropped_total"]) == ("stdout", 3, 3)
    assert warning["reason"] == "buffer full"


def test_a_batch_of_lines_keeps_the_lines_that_fit() -> None:
    pending = _Pending("access_log", 100)
    pending.add(line(1) + line(2) + line(3) + line(4) + line(5, 10))
    assert pending.dropped == 2
    assert pending.take().startswith(line(1) + line(2) + line(3) + b"{")


def test_bytes_being_written_count_against_the_bound() -> None:
    """While the writer is stuck on a chunk, that chunk still holds its memory."""
    pending = _Pending("stdout", 100)
    pending.add(line(1))
    pending.add(line(2))
    assert pending.take() == line(1) + line(2)  # 60 bytes in flight
    pending.add(line(3))
    pending.add(line(4))  # 60 + 30 + 30 > 100
    assert pending.dropped == 1
    pending.written(True)
    data = pending.take()
    assert data.startswith(line(3) + b"{")
    assert warnings_in(data)[0]["dropped"] == 1
    pending.written(True)
    # Writing resumed: the next lines are kept, and no second warning is written.
    pending.add(line(5))
    assert pending.take() == line(5)


def test_a_line_larger_than_the_bound_is_dropped_and_reported() -> None:
    pending = _Pending("stdout", 100)
    pending.add(b"y" * 200 + b"\n")
    assert pending.dropped == 1
    assert pending.ready()
    [warning] = warnings_in(pending.take())
    assert warning["dropped"] == 1


def test_a_failed_write_counts_its_lines_and_its_warning_is_carried_over() -> None:
    pending = _Pending("access_log", 100)
    for n in range(1, 5):
        pending.add(line(n))  # line 4 dropped
    assert len(warnings_in(pending.take())) == 1
    pending.written(False, "No space left on device")
    assert pending.dropped == 4
    pending.add(line(5))
    data = pending.take()
    assert data.startswith(line(5))
    [warning] = warnings_in(data)
    assert (warning["dropped"], warning["dropped_total"]) == (4, 4)
    assert warning["reason"] == "write failed: No space left on device"


def test_the_warning_carries_the_time_it_is_written() -> None:
    pending = _Pending("stdout", 10, now=lambda: 86400.25)
    pending.add(line(1))
    [warning] = warnings_in(pending.take())
    assert warning["ts"] == "1970-01-02T00:00:00.250+00:00"


# -- the writer thread -------------------------------------------------------------------------


class GatedSink:
    """A destination that takes nothing until the test opens the gate (a reader that
    stopped reading), and may fail its first writes."""

    def __init__(self, failures: int = 0) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.failures = failures
        self.data = bytearray()
        self.reopened = 0

    def write(self, data: bytes) -> None:
        self.entered.set()
        assert self.gate.wait(WAIT)
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.data += data

    def reopen(self) -> None:
        self.reopened += 1


def test_a_stalled_destination_never_blocks_a_writer_and_drops_are_reported_on_resume() -> None:
    sink = GatedSink()
    output = LogOutput("stdout", sink, buffer_size=100, now=lambda: 0.0)
    try:
        output.write(line(1).decode())
        assert sink.entered.wait(WAIT)  # the writer thread is now stuck writing line 1
        for n in range(2, 1002):
            output.write(line(n).decode())  # each returns at once
        # 100 bytes: line 1 in flight, lines 2 and 3 waiting; the other 998 dropped.
        assert output.dropped == 998
        sink.gate.set()
        assert output.close(WAIT)
    finally:
        sink.gate.set()
    data = bytes(sink.data)
    assert data.startswith(line(1) + line(2) + line(3) + b"{")
    [warning] = warnings_in(data)
    assert (warning["dropped"], warning["output"]) == (998, "stdout")
    assert data.count(b"\n") == 4


def test_a_failed_write_is_counted_and_reported_by_the_next_one() -> None:
    sink = GatedSink(failures=1)
    output = LogOutput("access_log", sink, buffer_size=1000)
    try:
        output.write(line(1).decode())
        assert sink.entered.wait(WAIT)
        output.write(line(2).decode())
        sink.gate.set()
        assert output.close(WAIT)
    finally:
        sink.gate.set()
    data = bytes(sink.data)
    assert data.startswith(line(2) + b"{")
    [warning] = warnings_in(data)
    assert warning["dropped"] == 1
    assert warning["reason"] == "write failed: No space left on device"
    assert output.dropped == 1


def test_close_gives_up_on_a_destination_that_takes_nothing() -> None:
    """Process exit waits a bounded time for the buffer, then leaves it."""
    sink = GatedSink()
    output = LogOutput("stdout", sink)
    try:
        output.write(line(1).decode())
        assert sink.entered.wait(WAIT)
        assert output.close(0.01) is False
    finally:
        sink.gate.set()
    assert output.close(WAIT) is True


def test_lines_after_close_are_dropped_and_counted() -> None:
    sink = GatedSink()
    sink.gate.set()
    output = LogOutput("stdout", sink)
    output.write(line(1).decode())
    assert output.close(WAIT)
    output.write(line(2).decode())
    assert output.dropped == 1
    assert bytes(sink.data) == line(1)


def test_a_line_logged_by_a_signal_handler_inside_write_does_not_deadlock() -> None:
    """Twisted logs "Received SIGTERM" from its signal handler, which runs on the main thread
    between two bytecodes, possibly while that thread is inside write(). Run in a child
    process, whose hang would be a timeout here rather than a hung test run."""
    script = """
import os, signal
from persistproxy.log_output import FdSink, LogOutput
out = LogOutput("stdout", FdSink(1))
signal.signal(signal.SIGUSR2, lambda *args: out.write("from the handler\\n"))
with out._lock:  # as if the main thread were inside write() when the signal came
    os.kill(os.getpid(), signal.SIGUSR2)
    out._pending.add(b"interrupted\\n")
out.write("after\\n")
assert out.close(5)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"from the handler\ninterrupted\nafter\n"


def test_an_output_never_written_to_starts_no_thread() -> None:
    output = LogOutput("stdout", GatedSink())
    assert output.close(0) is True
    assert output._thread is None


def test_a_forked_child_writes_through_a_thread_of_its_own(tmp_path: Path) -> None:
    """twistd without -n forks after the outputs exist: the child's lines must still go out."""
    path = tmp_path / "out.log"
    output = LogOutput("access_log", FileSink(str(path)))
    output.write("parent\n")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        output.write("child\n")
        os._exit(0 if output.close(WAIT) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert output.close(WAIT)
    lines = path.read_text().splitlines()
    # The parent's line may be written twice: held at the fork, the child writes it too (the
    # parent of a daemonizing twistd exits at once, before its thread may have written it).
    assert lines.count("child") == 1
    assert set(lines) == {"child", "parent"}


def test_a_pipe_nobody_reads_does_not_block_the_event_log() -> None:
    """The real thing: structlog's logger on an output whose pipe is never read."""
    r, w = os.pipe()
    try:
        output = LogOutput("stdout", FdSink(w), buffer_size=65536)
        log = make_event_log(output)
        for n in range(20000):  # about 1.5 MB of lines: 20 times the pipe's 64 KiB
            log.info("filler", n=n)
        assert output.dropped > 0
        measured = output.dropped
        print(f"20000 events into an unread 64 KiB pipe: {measured} dropped")
        received = bytearray()

        def read_all() -> None:
            while chunk := os.read(r, 65536):
                received.extend(chunk)

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        assert output.close(WAIT)
        os.close(w)
        w = -1
        reader.join(WAIT)
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
    records = [json.loads(raw) for raw in received.splitlines()]
    numbers = [r["n"] for r in records if r["event"] == "filler"]
    assert numbers == sorted(numbers)
    dropped = sum(r["dropped"] for r in records if r["event"] == "log.lines_dropped")
    assert dropped == output.dropped
    assert len(numbers) + dropped == 20000


# -- files and SIGUSR1 -------------------------------------------------------------------------


def test_a_file_output_is_reopened_after_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    output = LogOutput("access_log", FileSink(str(path)))
    done = threading.Event()
    errors: list[str | None] = []

    def reopened(error: str | None) -> None:
        errors.append(error)
        done.set()

    output.write("before\n")
    path.rename(tmp_path / "access.log.1")
    output.reopen(reopened)
    assert done.wait(WAIT)
    output.write("after\n")
    assert output.close(WAIT)
    assert errors == [None]
    assert (tmp_path / "access.log.1").read_text() == "before\n"
    assert path.read_text() == "after\n"


def test_a_failed_reopen_keeps_writing_to_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    output = LogOutput("access_log", FileSink(str(path)))
    done = threading.Event()
    errors: list[str | None] = []

    def reopened(error: str | None) -> None:
        errors.append(error)
        done.set()

    output.write("before\n")
    path.rename(tmp_path / "access.log.1")
    path.mkdir()  # the name cannot be opened as a file now
    output.reopen(reopened)
    assert done.wait(WAIT)
    output.write("after\n")
    assert output.close(WAIT)
    assert errors == ["Is a directory"]
    assert (tmp_path / "access.log.1").read_text() == "before\nafter\n"


class _Reactor:
    """callFromThread as the reactor does it: queued, run later on the reactor's thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.called = threading.Event()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.append((f, args))
        self.called.set()

    def run_calls(self) -> None:
        calls, self.calls = self.calls, []
        self.called.clear()
        for f, args in calls:
            f(*args)


def test_sigusr1_reopens_file_outputs_through_the_reactor(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    output = LogOutput("access_log", FileSink(str(path)))
    reactor = _Reactor()
    stream = io.StringIO()
    reopener = LogReopener(reactor, [output], make_event_log(stream))
    previous = signal.getsignal(signal.SIGUSR1)
    reopener.startService()
    try:
        output.write("before\n")
        path.rename(tmp_path / "access.log.1")
        os.kill(os.getpid(), signal.SIGUSR1)
        assert [f for f, _ in reactor.calls] == [reopener.reopen]  # nothing done in the handler
        reactor.run_calls()
        assert reactor.called.wait(WAIT)  # the writer thread reports back through the reactor
        reactor.run_calls()
        output.write("after\n")
        assert output.close(WAIT)
    finally:
        reopener.stopService()
    assert signal.getsignal(signal.SIGUSR1) == previous
    events = [json.loads(raw) for raw in stream.getvalue().splitlines()]
    assert [(e["event"], e.get("outputs", e.get("output"))) for e in events] == [
        ("log.reopen", ["access_log"]),
        ("log.reopened", "access_log"),
    ]
    assert path.read_text() == "after\n"


def test_a_failed_reopen_is_an_error_event(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    output = LogOutput("access_log", FileSink(str(path)))
    reactor = _Reactor()
    stream = io.StringIO()
    reopener = LogReopener(reactor, [output], make_event_log(stream))
    path.unlink()
    path.mkdir()
    reopener.reopen()
    assert reactor.called.wait(WAIT)
    reactor.run_calls()
    assert output.close(WAIT)
    event = json.loads(stream.getvalue().splitlines()[-1])
    assert (event["event"], event["level"]) == ("log.reopen_failed", "error")
    assert event["reason"] == "Is a directory"


def test_the_access_log_writes_its_batches_to_an_output(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    path = tmp_path / "access.log"
    output = LogOutput("access_log", FileSink(str(path)))
    clock = Clock()
    access = AccessLog(clock, output)
    access.log("web", "127.0.0.1", "GET", "/", "1.1", 200, 5, 1.0, None, False, 0)
    access.log("web", "127.0.0.1", "GET", "/x", "1.1", 404, 5, 1.0, None, False, 0)
    clock.advance(0.5)
    assert output.close(WAIT)
    paths = [json.loads(raw)["path"] for raw in path.read_text().splitlines()]
    assert paths == ["/", "/x"]


# -- metrics -----------------------------------------------------------------------------------


def test_dropped_lines_are_a_counter_per_output() -> None:
    def drops() -> list[tuple[str, int]]:
        return [("stdout", 7), ("access_log", 0)]

    families = {m.name: m for m in StatsCollector(ProxyStats(), list, drops).collect()}
    family = families["persistproxy_log_lines_dropped"]
    assert family.type == "counter"
    samples = {s.labels["output"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert samples == {"stdout": 7, "access_log": 0}


@pytest.fixture(autouse=True)
def _no_signal_leak() -> Any:
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)
