# -*- test-case-name: tests.unit.test_fastwrite -*-
"""
Send straight to the socket when nothing is queued before it.

Twisted's C{write} always buffers and asks the reactor to watch the socket for writability,
so every response costs two C{epoll_ctl} calls and a trip through the loop before the first
C{send}. Profiling the proxy under load put that at a fifth of its CPU time. When the
transport's buffer is empty, a direct C{send} is equivalent (bytes stay in order) and almost
always takes everything; whatever it does not take goes through Twisted's buffer as usual,
so flow control and error handling stay Twisted's.

These are plain functions rather than a closure per connection: an idle connection should
cost as little memory as possible.

They read and set Twisted's private buffer state (C{_tempDataLen}, C{dataBuffer},
C{_writeDisconnecting}, C{_aborting}...). The start-up self-check
(L{persistproxy.net.selfcheck}) probes that state on a throwaway transport; if it is not as
expected, L{can_write_directly} says no for every connection and Twisted's own write path is
used.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp

from persistproxy.net.selfcheck import usable

__all__ = [
    "MSG_MORE",
    "backlogged",
    "can_write_directly",
    "fin_can_follow",
    "lose_write_directly",
    "write_directly",
]


#: Linux's "more data follows" send flag, for the last bytes before a FIN (0 elsewhere).
MSG_MORE: int = getattr(socket, "MSG_MORE", 0)


def can_write_directly(transport: Any) -> bool:
    """
    Whether C{transport} is a plain TCP connection whose socket we may write to: a Twisted
    TCP transport without TLS started on it, while the self-check found Twisted's buffer
    state as these functions expect (asked once per connection; the probe is cached).
    """
    return isinstance(transport, tcp.Connection) and usable("fastwrite") and not transport.TLS


def write_directly(transport: Any, data: bytes, flags: int = 0) -> None:
    """
    C{transport.write(data)}, through a direct C{send} when nothing is buffered before it.
    Only for transports that L{can_write_directly}.

    @param flags: for the direct C{send}; C{MSG_MORE} when a FIN follows at once (the
        kernel then sends the data and the FIN in one segment).
    """
    if (
        transport._tempDataLen
        or transport.dataBuffer
        or transport.disconnecting
        or transport._writeDisconnecting
        or transport._aborting
        or not transport.connected
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data, flags)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Let Twisted's own write path meet the error and report the loss.
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


def backlogged(transport: Any, direct: bool) -> bool:
    """
    Whether bytes wait in C{transport}'s buffer, so that flow control must be wired up. A
    transport we do not see into is always treated as backlogged.
    """
    if not direct:
        # The TLS transport knows whether the TCP transport under it is backlogged.
        check = getattr(transport, "backlogged", None)
        return True if check is None else bool(check())
    return bool(transport._tempDataLen or transport.dataBuffer)


def fin_can_follow(transport: Any) -> bool:
    """
    Whether L{lose_write_directly} would send the FIN at once if nothing were buffered (for
    transports that L{can_write_directly}); then the last bytes may go with C{MSG_MORE}.
    """
    return bool(
        transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._aborting
        and transport.producer is None
    )


def lose_write_directly(transport: Any) -> None:
    """
    C{transport.loseWriteConnection()}, sending the FIN at once when nothing is buffered (only
    for transports that L{can_write_directly}). Twisted's version waits for the next
    writability event: a reactor turn and two C{epoll_ctl} calls later.
    """
    if fin_can_follow(transport) and not transport._tempDataLen and not transport.dataBuffer:
        transport._writeDisconnecting = transport._writeDisconnected = True
        transport._closeWriteConnection()
    else:
        transport.loseWriteConnection()
