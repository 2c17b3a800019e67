# -*- test-case-name: tests.unit.test_notify -*-
"""
The systemd notification protocol (C{Type=notify}), without libsystemd: one datagram per
message to the C{AF_UNIX} socket named by C{$NOTIFY_SOCKET} (an abstract socket when it
starts with C{@}).

What the proxy says, and when:

 - C{READY=1} once the reactor runs, so after every listener is bound (they bind in
   C{privilegedStartService}, before twistd runs the reactor): C{systemctl start} returns then,
   and units ordered after this one start when it really serves.
 - C{RELOADING=1} with C{MONOTONIC_USEC} when a reload begins, C{READY=1} when it has ended,
   whether it applied the new configuration or kept the old one.
 - C{STOPPING=1} when the graceful drain begins.
 - C{STATUS=} with the open connections and the requests served, every L{STATUS_INTERVAL}
   seconds when it changed (C{systemctl status} shows it), and after each reload.

A notification is a courtesy to the service manager, never a condition of serving: the socket
is non-blocking, a datagram the manager's queue cannot take is dropped, and no error reaches
the reactor (the first one is logged). Without C{$NOTIFY_SOCKET} (not under systemd, or
C{Type=simple}) nothing is sent at all.

A supervisor of several worker processes would own the one L{SystemdNotifier} (systemd
accepts messages from the main process only, C{NotifyAccess=main}) and call its methods when
all of its workers are ready or reloaded; nothing here assumes one process.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service

from persistproxy.logs import EventLog
from persistproxy.policy import Deadline

__all__ = ["STATUS_INTERVAL", "NotifyService", "SystemdNotifier", "monotonic_usec"]

#: Seconds between two C{STATUS=} lines (sent only when the text changed).
STATUS_INTERVAL = 5.0


def monotonic_usec() -> int:
    """C{CLOCK_MONOTONIC} in microseconds, as C{RELOADING=1} wants it in C{MONOTONIC_USEC}."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _address(value: str) -> str | bytes | None:
    """The socket address C{$NOTIFY_SOCKET} names; L{None} if it names none we can use."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock and others: not for a proxy on one host


class SystemdNotifier:
    """
    Sends notifications to the service manager, if there is one.
    """

    def __init__(self, log: EventLog, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self._log = log
        self._address = _address(environ.get("NOTIFY_SOCKET", ""))
        self._socket: socket.socket | None = None
        self._warned = False
        #: Messages that could not be sent (the manager's queue was full, or an error).
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: Any) -> bool:
        """
        Send one message (C{READY="1"} becomes C{READY=1}); L{True} if it left.
        """
        address = self._address
        if address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
            self._socket.sendto(message.encode(), address)
        except OSError as e:
            # EAGAIN: the manager is not reading; anything else: no manager any more. Either
            # way the proxy goes on, and says so once.
            self.dropped += 1
            if not self._warned:
                self._warned = True
                self._log.warning("systemd.notify_failed", reason=e.strerror or str(e))
            return False
        return True

    def ready(self, status: str = "") -> None:
        fields: dict[str, Any] = {"READY": 1}
        if status:
            fields["STATUS"] = status
        self.send(**fields)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec())

    def stopping(self) -> None:
        self.send(STOPPING=1)

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class NotifyService(Service):
    """
    Says C{READY=1} once the reactor runs, C{STATUS=} every L{STATUS_INTERVAL} seconds, and
    C{STOPPING=1} when stopping begins. It is the last service of the tree: started after
    the listeners bound, and, as a L{MultiService} stops its children in reverse, stopped
    first, as the drain begins.
    """

    name = "systemd-notify"

    def __init__(
        self,
        clock: Any,
        notifier: SystemdNotifier,
        status: Callable[[], str],
        interval: float = STATUS_INTERVAL,
    ) -> None:
        """
        @param status: the current C{STATUS=} text.
        """
        self._clock = clock
        self.notifier = notifier
        self._status = status
        self._interval = interval
        self._timer = Deadline(clock, self._tick)
        self._last = ""

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if not self.notifier.enabled:
            return
        call_when_running = getattr(self._clock, "callWhenRunning", None)
        if call_when_running is not None:
            call_when_running(self._ready)
        else:  # a Clock in tests
            self._ready()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self._timer.stop()
        if self.notifier.enabled:
            self.notifier.send(STOPPING=1, STATUS="draining: " + self._status())

    def _ready(self) -> None:
        if not self.running:
            return
        self._last = self._status()
        self.notifier.ready(self._last)
        self._timer.arm(self._interval)

    def _tick(self) -> None:
        text = self._status()
        if text != self._last:
            self._last = text
            self.notifier.status(text)
        self._timer.arm(self._interval)

    def refresh(self) -> None:
        """Send the status now (after a reload, say) rather than at the next tick."""
        if self.notifier.enabled and self.running:
            self._last = self._status()
            self.notifier.status(self._last)
