"""
Socket options set once on the listening socket reach every accepted socket (Linux), so
connections need no setsockopt of their own.
"""

from __future__ import annotations

import socket

import pytest

from persistproxy.net.sockopts import configure_listening_socket

TCP = socket.IPPROTO_TCP


def _accepted(listening: socket.socket) -> socket.socket:
    listening.listen()
    client = socket.create_connection(listening.getsockname()[:2])
    accepted, _ = listening.accept()
    client.close()
    return accepted


def test_nodelay_and_keepalive_timers_are_inherited_by_accepted_sockets() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        assert configure_listening_socket(listening, {"idle": 61, "interval": 7, "count": 4})
        with _accepted(listening) as accepted:
            assert accepted.getsockopt(TCP, socket.TCP_NODELAY) == 1
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert accepted.getsockopt(TCP, socket.TCP_KEEPIDLE) == 61
            assert accepted.getsockopt(TCP, socket.TCP_KEEPINTVL) == 7
            assert accepted.getsockopt(TCP, socket.TCP_KEEPCNT) == 4


def test_without_tcp_keepalive_only_nodelay() -> None:
    with socket.socket(socket.AF_INET6) as listening:
        try:
            listening.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
        assert configure_listening_socket(listening, None)
        with _accepted(listening) as accepted:
            assert accepted.getsockopt(TCP, socket.TCP_NODELAY) == 1
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_not_a_tcp_socket_is_left_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "s"))
        assert not configure_listening_socket(listening, {"idle": 1, "interval": 1, "count": 1})
    assert not configure_listening_socket(None, None)
