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

import fcntl
import socket
import struct
import termios
from typing import Any

from twisted.internet import tcp

from persistproxy.net.selfcheck import usable

__all__ = [
    "MSG_MORE",
    "backlogged",
    "buffered",
    "can_write_directly",
    "fin_can_follow",
    "lose_write_directly",
    "queued",
    "write_directly",
]


#: Linux's "more data follows" send flag, for the last bytes before a FIN (0 elsewhere).
MSG_MORE: int = getattr(socket, "MSG_MORE", 0)

#: The ioctl that tells the bytes of a socket's send queue (SIOCOUTQ on Linux).
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)


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


def queued(transport: Any) -> int | None:
    """
    Bytes written to C{transport} that the peer has not acknowledged yet: those in its
    buffer and in its socket's send queue (C{SIOCOUTQ}: unsent and unacknowledged). For our
    TLS transport, those of the TCP transport under it (encryption is synchronous, so that is
    the only place bytes wait; they are ciphertext, a little more than what was written).
    L{None} for a transport we do not see into.

    The kernel's queue matters: on a slow reader it holds far more than our buffer (loopback
    grows it to about a megabyte), and our buffer drains only when the kernel wakes us, after
    much of it has gone; the buffer alone would say "nothing taken" for seconds on end.
    """
    for candidate in (transport, getattr(transport, "transport", None)):
        if isinstance(candidate, tcp.Connection) and usable("fastwrite"):
            return buffered(candidate) + _kernel_queued(candidate.socket)
    return None


def buffered(transport: Any) -> int:
    """The bytes waiting in a TCP transport's own buffer (see L{queued})."""
    return int(transport._tempDataLen + len(transport.dataBuffer) - transport.offset)


def _kernel_queued(sock: Any) -> int:
    """The bytes of C{sock}'s send queue; 0 if the system does not say."""
    if sock is None or _OUTQ is None:
        return 0
    try:
        answer = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", answer)[0])


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
