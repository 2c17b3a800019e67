# -*- test-case-name: tests.unit.test_fastwrite -*-
"""
Send straight to the socket when nothing is queued before it.

Twisted's C{write} always buffers and asks the reactor to watch the socket for writability,
so every response costs two C{epoll_ctl} calls and a trip through the loop before the first
C{send}. Profiling the proxy under load put that at a fifth of its CPU time. When the
transport's buffer is empty, a direct C{send} is equivalent (bytes stay in order) and almost
always takes everything; whatever it does not take goes through Twisted's buffer as usual,
so flow control and error handling stay Twisted's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp

__all__ = ["writer_for"]


def writer_for(transport: Any) -> Callable[[bytes], None]:
    """
    The fastest correct C{write} for C{transport}: direct for a plain TCP connection,
    the transport's own for anything else (TLS, UNIX sockets, test transports).
    """
    if not isinstance(transport, tcp.Connection) or not hasattr(transport, "_tempDataLen"):
        write: Callable[[bytes], None] = transport.write
        return write
    send: Callable[[bytes], int] = transport.socket.send
    buffered_write: Callable[[bytes], None] = transport.write

    def direct_write(data: bytes) -> None:
        if (
            transport._tempDataLen
            or transport.dataBuffer
            or transport.disconnecting
            or transport._writeDisconnecting
            or not transport.connected
        ):
            buffered_write(data)
            return
        try:
            sent = send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let Twisted's own write path meet the error and report the loss.
            buffered_write(data)
            return
        if sent < len(data):
            buffered_write(data[sent:])

    return direct_write
