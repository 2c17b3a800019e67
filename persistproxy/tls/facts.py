# -*- test-case-name: tests.unit.test_tls -*-
"""
What the access log and the metrics say about a TLS connection: version, resumed, ALPN, SNI,
read as cheaply as a per-handshake path should.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL

from persistproxy.tls.server import session_reused

__all__ = ["alpn_selected", "connection_facts", "tls_info", "version_name"]


#: Protocol version numbers (C{SSL_version}) by name, to skip a string conversion per handshake.
_VERSION_NAMES = {SSL.TLS1_2_VERSION: "TLSv1.2", SSL.TLS1_3_VERSION: "TLSv1.3"}


def version_name(connection: SSL.Connection) -> str:
    """C{get_protocol_version_name()}, through a table for the versions a listener allows."""
    return _VERSION_NAMES.get(connection.get_protocol_version()) or str(
        connection.get_protocol_version_name()
    )


def alpn_selected(connection: SSL.Connection) -> str | None:
    """
    The ALPN protocol of a listener's connection: L{ServerTLS} notes its choice on the
    connection (app data) when it makes it, so no OpenSSL call is needed.
    """
    name = connection.get_app_data()
    if isinstance(name, bytes):
        return name.decode("ascii", "replace")
    return None


def connection_facts(connection: SSL.Connection) -> dict[str, Any]:
    """
    What the access log says about a TLS connection whose handshake is complete.
    """
    alpn = connection.get_alpn_proto_negotiated()
    server_name = connection.get_servername()
    return {
        "tls_version": version_name(connection),
        "tls_resumed": session_reused(connection),
        "alpn": alpn.decode("ascii", "replace") if alpn else None,
        "sni": server_name.decode("ascii", "replace") if server_name else None,
    }


def tls_info(transport: object) -> dict[str, Any] | None:
    """
    The TLS facts of a connection (L{connection_facts}), or L{None} for a plain transport or
    one whose handshake is not complete.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    connection = get_handle()
    if not isinstance(connection, SSL.Connection) or not connection.get_protocol_version_name():
        return None
    return connection_facts(connection)
