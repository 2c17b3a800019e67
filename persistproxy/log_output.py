# -*- test-case-name: tests.unit.test_logs -*-
"""
Where log lines go without ever blocking the reactor: a L{LogOutput} is a bounded buffer that
a thread of its own empties into a destination (standard output, a file). A reader that stops
reading (a full pipe, a busy journald, a slow disk) blocks that thread only; once the buffer is
full, lines are dropped and counted, and one warning line says how many when the destination
takes lines again. An access log file is reopened on SIGUSR1 (L{LogReopener}), for logrotate.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import select
import signal
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger as EventLog

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "EXIT_FLUSH_TIMEOUT",
    "FdSink",
    "FileSink",
    "LogOutput",
    "LogReopener",
    "Sink",
    "stdout_output",
]

#: Bytes of lines one output holds (waiting, and being written) while its destination does
#: not take them; beyond it, lines are dropped. C{[log] buffer_size} sets it.
DEFAULT_BUFFER_SIZE = 1024 * 1024

#: Seconds process exit waits for each output to write what it still holds. A destination
#: that takes nothing cannot hold the exit longer than that.
EXIT_FLUSH_TIMEOUT = 3.0

def _count_lines(data: bytes, start: int = 0) -> int:
    """
    The lines in C{data[start:]}, a last one without its newline included.
    """
    lines = data.count(b"\n", start)
    return lines + 1 if len(data) > start and not data.endswith(b"\n") else lines


class _Pending:
    """
    The bounded buffer of one L{LogOutput}, without threads or I/O, so that what is kept,
    what is dropped and what is reported can be tested step by step.

    Lines come in with L{add} (from whichever thread logs); the writer takes everything with
    L{take}, writes it, and says how that went with L{written}. The bytes held, waiting or
    being written, never exceed C{limit}: past it, the lines that do not fit are dropped,
    and so is every line after them until the writer takes again, so that the warning line
    L{take} appends stands exactly where the gap is.

    @ivar dropped: lines dropped since the start, full buffer and failed writes alike.
    """

    def __init__(self, name: str, limit: int, now: Callable[[], float] = time.time) -> None:
        self.name = name
        self.limit = limit
        self.dropped = 0
        self._now = now
        self._chunks: list[bytes] = []
        self._waiting = 0
        self._inflight = 0
        self._inflight_lines = 0
        self._inflight_reported = 0
        self._dropping = False
        self._unreported = 0
        self._reason = ""

    def add(self, data: bytes) -> None:
        """
        Keep C{data} (whole lines), or as many of its lines as fit; count the others.
        """
        if self._dropping:
            self._drop(_count_lines(data), "buffer full")
            return
        room = self.limit - self._waiting - self._inflight
        if len(data) <= room:
            self._chunks.append(data)
            self._waiting += len(data)
            return
        cut = data.rfind(b"\n", 0, room) + 1
        if cut:
            self._chunks.append(data[:cut])
            self._waiting += cut
        self._dropping = True
        self._drop(_count_lines(data, cut), "buffer full")

    def ready(self) -> bool:
        """
        Whether the writer has something to write: lines, or a warning owed.
        """
        return bool(self._chunks) or self._unreported > 0

    def take(self) -> bytes:
        """
        Everything waiting, followed by one warning line if lines were dropped since the
        last one; the bytes stay counted until L{written}.
        """
        data = b"".join(self._chunks)
        self._chunks = []
        # Set, not subtracted: a count that a signal handler's line made wrong (see
        # LogOutput._lock) is right again here.
        self._waiting = 0
        self._inflight = len(data)
        self._inflight_lines = _count_lines(data)
        self._inflight_reported = self._unreported
        if self._unreported:
            data += self._warning(self._unreported, self._reason)
            self._unreported = 0
        self._dropping = False
        return data

    def written(self, ok: bool, error: str = "") -> None:
        """
        The chunk from L{take} is out (C{ok}) or lost: its lines and its warning's count are
        then dropped lines, owed in the next warning.
        """
        if not ok:
            self.dropped += self._inflight_lines
            self._unreported += self._inflight_lines + self._inflight_reported
            self._reason = f"write failed: {error}"
        self._inflight = self._inflight_lines = self._inflight_reported = 0

    def after_fork(self) -> None:
        """
        In a forked child: the chunk the parent's writer had taken is the parent's.
        """
        self.written(True)

    def _drop(self, lines: int, reason: str) -> None:
        self.dropped += lines
        self._unreported += lines
        if not self._reason.startswith("write failed"):
            self._reason = reason

    def _warning(self, count: int, reason: str) -> bytes:
        self._reason = ""
        ts = datetime.fromtimestamp(self._now(), UTC).isoformat(timespec="milliseconds")
        record = {
            "event": "log.lines_dropped",
            "level": "warning",
            "output": self.name,
            "dropped": count,
            "dropped_total": self.dropped,
            "reason": reason,
            "ts": ts,
        }
        return (json.dumps(record) + "\n").encode()


class Sink(Protocol):
    """
    A destination of log bytes, used by one writer thread only: its calls may block.
    """

    def write(self, data: bytes) -> None:
        """
        Write all of C{data}, or raise L{OSError}.
        """

    def reopen(self) -> None:
        """
        Open the destination again (after a rotation), or raise L{OSError} and keep the
        current one.
        """


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            # Someone made the descriptor non-blocking (a shared pipe or terminal): this
            # thread may wait, so wait for room.
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll()
            continue
        view = view[n:]


class FdSink:
    """
    A descriptor the process was given, such as standard output: nothing to reopen.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        _write_fd(self.fd, data)

    def reopen(self) -> None:
        return


class FileSink:
    """
    A file opened for appending, as nginx opens its logs, and opened again by name on
    L{reopen} so that logrotate's rename-then-signal moves writing to a new file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = self._open()

    def _open(self) -> int:
        # O_NONBLOCK only for the open: a FIFO nobody reads fails (ENXIO) instead of hanging
        # the start; the writes are the writer thread's, which may wait.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(self.path, flags, 0o644)
        os.set_blocking(fd, True)
        return fd

    def write(self, data: bytes) -> None:
        _write_fd(self._fd, data)

    def reopen(self) -> None:
        fd = self._open()
        old, self._fd = self._fd, fd
        os.close(old)


ReopenDone = Callable[[str | None], None]


class LogOutput:
    """
    One destination of log lines, written by a thread of its own behind a bounded buffer.

    L{write} only appends to the buffer (a lock held for a list append), so a caller on the
    reactor thread never waits for the destination. The writer thread takes everything
    buffered at once and writes it with one system call, so a busy proxy costs one wake-up
    per batch, not per line. When the buffer is full, lines are dropped and counted
    (L{dropped}); the next write that goes through carries one C{log.lines_dropped} warning
    line with their number. L{write} and L{flush} make it usable where a text stream is
    expected (structlog's C{WriteLogger}, L{AccessLog}, L{twisted_observer}).

    At process exit, what is buffered is written for at most L{EXIT_FLUSH_TIMEOUT} seconds;
    the writer is a daemon thread, so a destination that takes nothing cannot hold the exit.
    The thread starts with the first line, and again in a forked child (twistd daemonizing).

    @ivar _state: C{"new"} (no writer thread yet: the first write starts it), C{"running"},
        C{"closing"} (L{close} was called: the thread writes what is held, then ends) or
        C{"closed"} (the thread ended: lines are dropped and counted).
    """

    def __init__(
        self,
        name: str,
        sink: Sink,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._sink = sink
        self._pending = _Pending(name, buffer_size, now)
        # Reentrant: Twisted logs from its signal handlers ("Received SIGTERM"), which run on
        # the main thread between two bytecodes, possibly inside write() holding this lock.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._state = "new"
        self._waiting = False
        self._reopens: list[ReopenDone] = []
        self._exit_hook = False
        ref = weakref.ref(self)

        def after_fork() -> None:
            output = ref()
            if output is not None:
                output._after_fork()

        os.register_at_fork(after_in_child=after_fork)

    @property
    def dropped(self) -> int:
        """
        Lines dropped since the start: the buffer was full, or the destination failed.
        """
        return self._pending.dropped

    @property
    def buffer_size(self) -> int:
        return self._pending.limit

    @buffer_size.setter
    def buffer_size(self, size: int) -> None:
        with self._lock:
            self._pending.limit = size

    def write(self, text: str) -> int:
        """
        Buffer C{text} (whole lines) for the writer thread; never waits for the destination.
        """
        data = text.encode("utf-8", "backslashreplace")
        with self._lock:
            state = self._state
            if state == "new":
                self._start()
            elif state == "closed":
                self._pending.dropped += _count_lines(data)
                return len(text)
            self._pending.add(data)
            if self._waiting:
                self._waiting = False
                self._wake.notify()
        return len(text)

    def flush(self) -> None:
        """
        Nothing to do: lines leave as soon as the writer thread gets to them.
        """

    def reopen(self, done: ReopenDone | None = None) -> None:
        """
        Have the writer thread reopen the destination between two writes; C{done} is then
        called on that thread with L{None} or the reason it failed (the old one is kept).
        """
        with self._lock:
            if self._state == "new":
                self._start()
            elif self._state == "closed":
                if done is not None:
                    done("the output is closed")
                return
            self._reopens.append(done or (lambda error: None))
            if self._waiting:
                self._waiting = False
                self._wake.notify()

    def close(self, timeout: float) -> bool:
        """
        Write what is held and end the writer thread, waiting at most C{timeout} seconds;
        L{True} when everything was written.
        """
        with self._lock:
            thread = self._thread
            if self._state == "new":
                self._state = "closed"
            elif self._state == "running":
                self._state = "closing"
                self._wake.notify()
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _start(self) -> None:
        if self._state != "new":
            return  # a signal handler's line, inside write(), started it already
        self._state = "running"
        self._thread = threading.Thread(target=self._run, name=f"log-{self.name}", daemon=True)
        self._thread.start()
        if not self._exit_hook:
            self._exit_hook = True
            atexit.register(_close_at_exit, weakref.ref(self))

    def _run(self) -> None:
        outcome: tuple[bool, str] | None = None
        while True:
            with self._lock:
                if outcome is not None:
                    self._pending.written(*outcome)
                    outcome = None
                while not (self._pending.ready() or self._reopens or self._state == "closing"):
                    self._waiting = True
                    self._wake.wait()
                self._waiting = False
                reopens, self._reopens = self._reopens, []
                if not (self._pending.ready() or reopens):
                    self._state = "closed"
                    return
                data = self._pending.take() if self._pending.ready() else b""
            # What this round took was logged before the reopen: it goes to the old file.
            if data:
                outcome = self._write(data)
            if reopens:
                self._reopen(reopens)

    def _write(self, data: bytes) -> tuple[bool, str]:
        try:
            self._sink.write(data)
        except Exception as e:
            return False, (e.strerror if isinstance(e, OSError) and e.strerror else repr(e))
        return True, ""

    def _reopen(self, callbacks: list[ReopenDone]) -> None:
        error: str | None = None
        try:
            self._sink.reopen()
        except OSError as e:
            error = e.strerror or errno.errorcode.get(e.errno or 0, repr(e))
        for done in callbacks:
            # A failing callback has nowhere to be reported; the writer thread must go on.
            with contextlib.suppress(Exception):
                done(error)

    def _after_fork(self) -> None:
        # The writer thread did not come along and the lock may have been held by it.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread = None
        self._waiting = False
        if self._state in ("running", "closing"):
            self._state = "new"
        self._pending.after_fork()


def _close_at_exit(ref: weakref.ReferenceType[LogOutput]) -> None:
    output = ref()
    if output is not None:
        output.close(EXIT_FLUSH_TIMEOUT)


_stdout: LogOutput | None = None


def stdout_output() -> LogOutput:
    """
    The process's one output for its standard output (descriptor 1), shared by the event
    log, Twisted's events and the access log, so that their lines stay whole and in order
    and one bound covers them all. Made on first use, not at import.
    """
    global _stdout
    if _stdout is None:
        _stdout = LogOutput("stdout", FdSink(1))
    return _stdout


class LogReopener(Service):
    """
    Reopens the file outputs on SIGUSR1, as nginx does, for logrotate's
    C{postrotate kill -USR1}: the file is renamed, and the next lines go to a new one.

    The handler is installed even without a file output, so that the signal never kills the
    proxy. It only schedules the work on the reactor; the reopening itself happens on each
    output's writer thread (an C{open()} on a slow disk must not stop traffic either), which
    reports back through the reactor.
    """

    name = "log-reopener"

    def __init__(
        self, reactor: Any, outputs: list[LogOutput], log: EventLog, signum: int = 0
    ) -> None:
        self._reactor = reactor
        self._outputs = outputs
        self._log = log
        self._signum = signum or signal.SIGUSR1
        self._previous: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._install()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._install()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
            self._previous = None

    def _install(self) -> None:
        if self._previous is None:
            self._previous = signal.signal(self._signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reopen)

    def reopen(self) -> None:
        """
        Ask every output to reopen its destination; each says how it went when done.
        """
        self._log.info("log.reopen", outputs=[output.name for output in self._outputs])
        for output in self._outputs:
            output.reopen(self._done_caller(output))

    def _done_caller(self, output: LogOutput) -> ReopenDone:
        def done(error: str | None) -> None:
            self._reactor.callFromThread(self._done, output, error)

        return done

    def _done(self, output: LogOutput, error: str | None) -> None:
        if error is None:
            self._log.info("log.reopened", output=output.name)
        else:
            self._log.error("log.reopen_failed", output=output.name, reason=error)
