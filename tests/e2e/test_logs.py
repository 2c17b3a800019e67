"""Logging can never stop the proxy, and the access log can go to a file that logrotate rotates.

The proxy is started with stdout and stderr on one pipe (as journald's stream is, or a shell
pipe into a log shipper). The test reads the first lines (to learn the ports) and then stops
reading, as a reader that hung would: the 64 KiB pipe fills after a few hundred access lines.
Before the fix the reactor then slept in a blocking write and every connection froze.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from conftest import ProxyFactory
from e2ehelpers import (
    _EXEC_WITH_PDEATHSIG,
    TWISTD,
    Origin,
    RawConn,
    get,
    make_config,
    parse_json_line,
    proc_status_kib,
)

KEEPALIVE_CONNECTIONS = 20
REQUESTS_PER_CONNECTION = 100
NEW_CONNECTIONS = 1000
TOTAL = KEEPALIVE_CONNECTIONS * REQUESTS_PER_CONNECTION + NEW_CONNECTIONS


class PipedProxy:
    """twistd persistproxy whose stdout and stderr are one pipe that only the test reads,
    and only when it chooses to."""

    def __init__(self, config_text: str, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "persistproxy.toml"
        config.write_text(config_text)
        self.read_fd, write_fd = os.pipe()
        argv = [TWISTD, "--nodaemon", "--pidfile=", "persistproxy", "--config", str(config)]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *argv],
                stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd, cwd=directory,
                start_new_session=True)
        finally:
            os.close(write_fd)
        self.data = bytearray()
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    def read_until_event(self, name: str, timeout: float) -> dict[str, Any]:
        """Read (only) until the event `name` has been seen; then reading stops."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if event.get("event") == name:
                    return event
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {name} event in:\n{self.data.decode(errors='replace')}"
            ready, _, _ = select.select([self.read_fd], [], [], remaining)
            if ready:
                chunk = os.read(self.read_fd, 4096)
                assert chunk, f"proxy exited:\n{self.data.decode(errors='replace')}"
                self.data += chunk

    def unread_bytes(self) -> int:
        buf = fcntl.ioctl(self.read_fd, termios.FIONREAD, struct.pack("i", 0))
        value: int = struct.unpack("i", buf)[0]
        return value

    def start_reading(self) -> None:
        """The reader comes back: everything is read from now on, in a thread."""
        def pump() -> None:
            while chunk := os.read(self.read_fd, 65536):
                with self._lock:
                    self.data += chunk

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            lines = bytes(self.data).decode(errors="replace").splitlines()
        return [e for e in map(parse_json_line, lines) if e is not None]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            time.sleep(0.05)
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(10)
        os.close(self.read_fd)


def _config(origin: Origin) -> str:
    # The smallest buffer (64 KiB) so that the test needs fewer requests to overflow it.
    return ('[log]\nbuffer_size = 65536\n\n[metrics]\nbind = "tcp:0:interface=127.0.0.1"\n\n'
            + make_config([f"127.0.0.1:{origin.port}"], listener={"name": "web"}))


def _traffic(port: int, total_keepalive: int, new_connections: int) -> int:
    """Requests with unique paths, one after the other, on keep-alive connections and then on
    a new connection each; every one must be answered 200. Returns how many were sent."""
    n = 0
    for _ in range(total_keepalive // REQUESTS_PER_CONNECTION):
        with RawConn(port, timeout=10) as conn:
            for _ in range(REQUESTS_PER_CONNECTION):
                response = conn.roundtrip("GET", f"/echo/r{n}")
                assert response.status == 200, (n, response)
                n += 1
    for _ in range(new_connections):
        response = get(port, f"/echo/r{n}", timeout=10)
        assert response.status == 200, (n, response)
        n += 1
    return n


def _dropped(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    match = re.search(r'^persistproxy_log_lines_dropped_total\{output="stdout"\} (\S+)$', text,
                      re.MULTILINE)
    assert match, text
    return float(match.group(1))


def test_a_pipe_nobody_reads_never_stops_traffic(origin: Origin, tmp_path: Path) -> None:
    proxy = PipedProxy(_config(origin), tmp_path / "proxy")
    try:
        port = int(proxy.read_until_event("listener.started", 20)["port"])
        metrics_port = int(proxy.read_until_event("metrics.started", 20)["port"])
        # From here on nobody reads the pipe.
        started = time.monotonic()
        sent = _traffic(port, KEEPALIVE_CONNECTIONS * REQUESTS_PER_CONNECTION, NEW_CONNECTIONS)
        elapsed = time.monotonic() - started
        assert sent == TOTAL
        dropped = _dropped(metrics_port)
        unread = proxy.unread_bytes()
        rss = proc_status_kib(proxy.proc.pid, "VmHWM")
        print(f"\n{TOTAL} requests answered 200 in {elapsed:.1f} s with stdout not read: "
              f"{unread} bytes waiting in the pipe, {dropped:.0f} log lines dropped, "
              f"proxy peak RSS {rss} KiB")
        assert unread >= 60000  # the pipe is full: the proxy went on regardless
        assert dropped > 0
        assert rss < 200 * 1024  # generous: the log buffer is bounded (64 KiB here)

        # The reader comes back: the lines that waited arrive, in order, then one warning
        # saying how many were dropped, then the new ones.
        proxy.start_reading()
        warning = proxy.wait_event("log.lines_dropped", 20)
        assert warning is not None, proxy.events()[-5:]
        assert warning["level"] == "warning"
        assert warning["output"] == "stdout"
        # Read again now: the line Twisted logged for the first scrape was dropped too.
        dropped = _dropped(metrics_port)
        os.kill(proxy.proc.pid, signal.SIGTERM)
        status = proxy.proc.wait(30)
        assert proxy._reader is not None
        proxy._reader.join(10)
        events = proxy.events()
        tail = [e for e in events if e.get("event") != "access"][-10:]
        assert status == 0, tail
        assert any(e.get("event") == "drain.finished" for e in events), tail
        access = [int(e["path"].rsplit("r", 1)[1]) for e in events if e.get("event") == "access"]
        warnings = [e for e in events if e.get("event") == "log.lines_dropped"]
        reported = sum(e["dropped"] for e in warnings)
        print(f"after reading: {len(access)} access lines arrived, warnings report {reported} "
              f"dropped (counter: {dropped:.0f})")
        disorder = [(a, b) for a, b in itertools.pairwise(access) if a > b]
        assert not disorder, disorder[:5]
        assert reported == dropped, (warnings, tail)
        assert len(access) + reported >= TOTAL  # every line arrived or is counted
    finally:
        proxy.close()


def test_exit_is_not_held_by_a_pipe_nobody_reads(origin: Origin, tmp_path: Path) -> None:
    """What is buffered is written at exit for a bounded time only (EXIT_FLUSH_TIMEOUT)."""
    proxy = PipedProxy(_config(origin), tmp_path / "proxy")
    try:
        port = int(proxy.read_until_event("listener.started", 20)["port"])
        metrics_port = int(proxy.read_until_event("metrics.started", 20)["port"])
        _traffic(port, 10 * REQUESTS_PER_CONNECTION, 0)
        assert _dropped(metrics_port) > 0
        started = time.monotonic()
        os.kill(proxy.proc.pid, signal.SIGTERM)
        status = proxy.proc.wait(30)
        print(f"\nexit with a full, unread stdout pipe took {time.monotonic() - started:.1f} s")
        assert status == 0
    finally:
        proxy.close()


def _access_paths(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["path"] for line in path.read_text().splitlines()]


def _wait_lines(path: Path, count: int, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(paths := _access_paths(path)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return paths


def test_access_log_file_is_reopened_on_sigusr1(origin: Origin,
                                                proxy_factory: ProxyFactory) -> None:
    """logrotate's way: rename the file, send SIGUSR1, and the next lines go to a new file;
    no line is lost or doubled, and exit writes the last ones."""
    text = '[log]\naccess_log = "access.log"\n\n' + make_config(
        [f"127.0.0.1:{origin.port}"], listener={"name": "web"})
    proxy = proxy_factory(config_text=text)
    directory = Path(proxy.config_path).parent  # twistd's cwd: the file is relative to it
    log, rotated = directory / "access.log", directory / "access.log.1"
    first = [f"/echo/a{i}" for i in range(50)]
    with RawConn(proxy.port) as conn:
        for target in first:
            assert conn.roundtrip("GET", target).status == 200
        assert _wait_lines(log, 50) == first
        log.rename(rotated)
        proxy.proc.send_signal(signal.SIGUSR1)
        assert proxy.wait_event("log.reopened", 10) is not None, proxy.lines()[-5:]
        second = [f"/echo/b{i}" for i in range(50)]
        for target in second:
            assert conn.roundtrip("GET", target).status == 200
    assert _wait_lines(log, 50) == second
    assert _access_paths(rotated) == first
    # Answered just before SIGTERM, still in the access log's batch: written at exit.
    third = [f"/echo/c{i}" for i in range(20)]
    with RawConn(proxy.port) as conn:
        for target in third:
            assert conn.roundtrip("GET", target).status == 200
    assert proxy.terminate(20) == 0
    assert _access_paths(log) == second + third
    assert not proxy.events("access")  # none on stdout
    assert proxy.events("log.reopen")[0]["outputs"] == ["access_log"]


def test_an_access_log_file_that_cannot_be_opened_stops_the_start(
        origin: Origin, tmp_path: Path) -> None:
    """One line and exit status 1, as for a port in use; and a FIFO that nobody reads (the
    configuration cannot tell) fails at once instead of hanging the start in open()."""
    directory = tmp_path / "proxy"
    directory.mkdir()
    os.mkfifo(directory / "access.log")
    text = '[log]\naccess_log = "access.log"\n\n' + make_config([f"127.0.0.1:{origin.port}"])
    (directory / "persistproxy.toml").write_text(text)
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "persistproxy", "--config", "persistproxy.toml"],
        cwd=directory, capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines()[-1] == (
        f"persistproxy: persistproxy.toml: log.access_log: cannot open {directory / 'access.log'}: "
        "No such device or address")
