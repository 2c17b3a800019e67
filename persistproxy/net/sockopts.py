# -*- test-case-name: tests.unit.test_sockopts -*-
"""
Socket options of accepted connections, set once on the listening socket.

Linux copies C{TCP_NODELAY}, C{SO_KEEPALIVE} and the keep-alive timers (C{TCP_KEEPIDLE},
C{TCP_KEEPINTVL}, C{TCP_KEEPCNT}) from a listening socket to every socket C{accept} returns.
Setting them there costs nothing per connection; setting them on each accepted socket cost
four C{setsockopt} calls per connection, which shows in connection-per-request traffic such
as TLS handshake rates.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from persistproxy.net.endpoints import EndpointError, split_description

__all__ = [
    "DEFAULT_BACKLOG",
    "configure_listening_socket",
    "set_tcp_keepalive",
    "with_default_backlog",
]

#: The listen() backlog when a listener's endpoint string does not say C{backlog=}: nginx's
#: 511, not Twisted's 50, which under a burst of connections (or while admissions are held
#: at C{max_connections}) makes the kernel drop SYNs, and clients retry only after 1 s, 3 s...
#: The kernel caps it at C{net.core.somaxconn} (4096 on current kernels).
DEFAULT_BACKLOG = 511

#: Endpoint types whose listen() takes a C{backlog=} argument.
_BACKLOG_TYPES = frozenset(("tcp", "tcp6", "unix", "ssl"))


def with_default_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """
    C{description} (a Twisted server endpoint string) with C{:backlog=N} added when it is a
    TCP, UNIX or SSL endpoint that names no backlog of its own; any other, unchanged (a
    C{systemd:} socket's backlog is systemd's C{Backlog=}).
    """
    try:
        arguments, options = split_description(description)
    except EndpointError:
        return description  # the configuration check says what is wrong with it
    if not arguments or arguments[0].strip().lower() not in _BACKLOG_TYPES:
        return description
    if "backlog" in options or len(arguments) > 2:
        return description  # its own, or positional arguments past the port or path
    return f"{description}:backlog={backlog}"


_KEEPALIVE_TIMERS = (
    (getattr(socket, "TCP_KEEPIDLE", None), "idle"),
    (getattr(socket, "TCP_KEEPINTVL", None), "interval"),
    (getattr(socket, "TCP_KEEPCNT", None), "count"),
)


def set_tcp_keepalive(sock: Any, settings: Mapping[str, int]) -> None:
    """
    SO_KEEPALIVE with the listener's timers, so a peer that vanished without a FIN (a
    crashed host, a NAT that forgot us) is detected even on a connection kept idle.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, key in _KEEPALIVE_TIMERS:
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, settings[key])


def configure_listening_socket(sock: Any, tcp_keepalive: Mapping[str, int] | None) -> bool:
    """
    Give the connections C{sock} will accept C{TCP_NODELAY} (a proxy forwards whole
    messages; Nagle would only delay the last segment of each) and, if configured, TCP
    keep-alive probes.

    @return: whether C{sock} is a TCP socket and got them; a UNIX socket has none of these.
    """
    if not isinstance(sock, socket.socket) or sock.family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return False
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tcp_keepalive:
        set_tcp_keepalive(sock, tcp_keepalive)
    return True
