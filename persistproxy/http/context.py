# -*- test-case-name: tests.unit.test_client_connection -*-
"""
What every client connection of one HTTP listener shares: its settings, policies, timeout
queues and where it counts and logs. Built once per listener by the plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from twisted.internet.interfaces import IReactorTime

from persistproxy.net.after_event import after_event_caller
from persistproxy.policy import KeepAlivePolicy, RetryPolicy
from persistproxy.relay import Relay, idle_queue
from persistproxy.timers import TimeoutQueue

if TYPE_CHECKING:
    from persistproxy.config import ListenerConfig
    from persistproxy.http.upstream_connection import UpstreamConnection
    from persistproxy.interfaces import Upstream
    from persistproxy.listener.limits import ConnectionLimits
    from persistproxy.logs import AccessLog, EventLog
    from persistproxy.metrics import ListenerStats

__all__ = ["LINGER_SECONDS", "ListenerContext", "TimedConnection"]

#: Seconds the input is drained after our half-close before the socket is closed outright.
LINGER_SECONDS = 2.0


class TimedConnection(Protocol):
    """A client connection, as its timeout queues see it."""

    def timed_out(self) -> None: ...

    def send_timed_out(self) -> None: ...

    def send_rate_due(self) -> None: ...


def _timed_out(connection: TimedConnection) -> None:
    connection.timed_out()


def _send_timed_out(connection: TimedConnection) -> None:
    connection.send_timed_out()


def _send_rate_due(connection: TimedConnection) -> None:
    connection.send_rate_due()


@dataclass
class ListenerContext:
    """
    Everything a client connection of one listener needs, passed in rather than looked up.
    """

    config: ListenerConfig
    clock: IReactorTime
    group: Upstream[UpstreamConnection]
    log: EventLog
    stats: ListenerStats
    scheme: bytes = b"http"
    keepalive: KeepAlivePolicy = field(init=False)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    keepalive_header: bytes = field(init=False)
    name: str = field(init=False)
    header_queue: TimeoutQueue[TimedConnection] | None = field(init=False)
    body_queue: TimeoutQueue[TimedConnection] | None = field(init=False)
    idle_queue: TimeoutQueue[TimedConnection] | None = field(init=False)
    send_queue: TimeoutQueue[TimedConnection] | None = field(init=False)
    #: Connections in a stall that may last min_send_rate_window, when min_send_rate is set.
    send_rate_queue: TimeoutQueue[TimedConnection] | None = field(init=False)
    #: Connections whose FIN is out, draining the client's input for LINGER_SECONDS.
    linger_queue: TimeoutQueue[TimedConnection] = field(init=False)
    #: Upgrade tunnels, idle for C{tunnel_idle_timeout} (None: never cut for idleness).
    tunnel_queue: TimeoutQueue[Relay] | None = field(init=False)
    #: Whether the proxy is draining: responses then say C{Connection: close}.
    is_draining: Callable[[], bool] = lambda: False
    #: Where access lines go; None when the listener's C{access_log} is off.
    access_log: AccessLog | None = None
    #: The listener's admission and idle-per-client policy, if any limit is set.
    limits: ConnectionLimits | None = None
    #: HTTP/2: offered through ALPN (a TLS listener whose alpn names "h2"), and with prior
    #: knowledge on a cleartext listener (h2c = true); the streams a connection may open.
    h2_alpn: bool = False
    h2c: bool = False
    h2_max_concurrent_streams: int = 128
    #: Runs a function once the current I/O event is handled (ProxyReactor.call_after_event;
    #: the next turn with any other reactor).
    after_event: Callable[[Callable[[], object]], object] = field(init=False)
    #: The upstream sends a PROXY protocol header: connections are picked for each client.
    keyed: bool = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.keepalive = KeepAlivePolicy(config.keepalive_timeout, config.max_requests)
        clock = self.clock

        def queue(
            timeout: float, expire: Callable[[TimedConnection], None]
        ) -> TimeoutQueue[TimedConnection] | None:
            return TimeoutQueue(clock, timeout, expire) if timeout > 0 else None

        self.header_queue = queue(config.header_timeout, _timed_out)
        self.body_queue = queue(config.body_timeout, _timed_out)
        self.idle_queue = queue(config.keepalive_timeout, _timed_out)
        self.send_queue = queue(config.send_timeout, _send_timed_out)
        self.send_rate_queue = (
            queue(config.min_send_rate_window, _send_rate_due) if config.min_send_rate else None
        )
        self.linger_queue = TimeoutQueue(clock, LINGER_SECONDS, _timed_out)
        self.tunnel_queue = idle_queue(clock, config.tunnel_idle_timeout)
        self.keepalive_header = self.keepalive.header()
        self.name = self.config.name
        self.after_event = after_event_caller(clock)
        self.keyed = bool(self.group.config.send_proxy_protocol)

    @staticmethod
    def log_path(target: bytes) -> str:
        """The request target without its query string, which may carry credentials."""
        return target.partition(b"?")[0].decode("latin-1")
