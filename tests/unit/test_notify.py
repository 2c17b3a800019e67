"""
The systemd notification protocol against a real datagram socket standing in for systemd's
(a file socket and an abstract one): READY once the reactor runs, STATUS every interval when
it changed, STOPPING when the drain begins, and never an exception for the reactor: no
socket, a socket gone, a manager that stopped reading.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from persistproxy.logs import make_event_log
from persistproxy.notify import NotifyService, SystemdNotifier, monotonic_usec


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """What systemd listens on: a datagram socket whose path goes in NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536).decode())
        except BlockingIOError:
            return out


def test_messages_reach_a_file_socket(manager: socket.socket) -> None:
    notifier = SystemdNotifier(
        make_event_log(io.StringIO()), {"NOTIFY_SOCKET": manager.getsockname()}
    )
    assert notifier.enabled
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    notifier.ready("2 connections open")
    notifier.stopping()
    reloading, ready, stopping = received(manager)
    fields = dict(line.split("=", 1) for line in reloading.split("\n"))
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= monotonic_usec()
    assert ready == "READY=1\nSTATUS=2 connections open"
    assert stopping == "STOPPING=1"


def test_messages_reach_an_abstract_socket() -> None:
    name = f"persistproxy-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    try:
        notifier = SystemdNotifier(make_event_log(io.StringIO()), {"NOTIFY_SOCKET": "@" + name})
        assert notifier.send(READY=1)
        assert received(sock) == ["READY=1"]
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = SystemdNotifier(make_event_log(io.StringIO()), {})
    assert not notifier.enabled
    assert notifier.send(READY=1) is False
    # Not a path, not abstract (vsock:...): ignored too.
    assert not SystemdNotifier(
        make_event_log(io.StringIO()), {"NOTIFY_SOCKET": "vsock:2:9"}
    ).enabled


def test_a_vanished_manager_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    stream = io.StringIO()
    notifier = SystemdNotifier(make_event_log(stream), {"NOTIFY_SOCKET": str(tmp_path / "gone")})
    for _ in range(3):
        assert notifier.send(STATUS="x") is False
    assert notifier.dropped == 3
    [warning] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert warning["event"] == "systemd.notify_failed"


def test_a_manager_that_stops_reading_costs_dropped_messages_not_a_blocked_reactor(
    manager: socket.socket,
) -> None:
    notifier = SystemdNotifier(
        make_event_log(io.StringIO()), {"NOTIFY_SOCKET": manager.getsockname()}
    )
    sent = 0
    started = time.monotonic()
    while notifier.dropped == 0:
        sent += notifier.send(STATUS="x" * 1000)
        assert time.monotonic() - started < 30, "the queue never filled"
    print(f"datagrams queued before the first drop: {sent}")
    assert sent > 0


class _Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.when_running: list[Any] = []

    def callWhenRunning(self, f: Any) -> None:
        self.when_running.append(f)


def test_ready_when_running_status_when_changed_stopping_when_stopped(
    manager: socket.socket,
) -> None:
    reactor = _Reactor()
    notifier = SystemdNotifier(
        make_event_log(io.StringIO()), {"NOTIFY_SOCKET": manager.getsockname()}
    )
    state = {"open": 0}
    service = NotifyService(reactor, notifier, lambda: f"{state['open']} open", interval=5)
    service.startService()
    assert received(manager) == [], "not before the reactor runs"
    reactor.when_running[0]()
    assert received(manager) == ["READY=1\nSTATUS=0 open"]
    reactor.advance(5)
    assert received(manager) == [], "unchanged: not repeated"
    state["open"] = 3
    reactor.advance(4.9)
    assert received(manager) == []
    reactor.advance(0.1)
    assert received(manager) == ["STATUS=3 open"]
    service.stopService()
    assert received(manager) == ["STOPPING=1\nSTATUS=draining: 3 open"]
    assert not reactor.getDelayedCalls()


def test_the_service_is_silent_without_a_manager() -> None:
    reactor = _Reactor()
    service = NotifyService(reactor, SystemdNotifier(make_event_log(io.StringIO()), {}), str)
    service.startService()
    assert reactor.when_running == [] and not reactor.getDelayedCalls()
    service.stopService()
