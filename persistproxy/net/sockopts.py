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

__all__ = ["configure_listening_socket", "set_tcp_keepalive"]

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
