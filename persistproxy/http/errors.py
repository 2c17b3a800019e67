# -*- test-case-name: tests.unit.test_client_connection -*-
"""
Responses the proxy writes itself: malformed requests, limits and upstream failures.

They are short, plain text and always carry C{Content-Length}, so a client can keep the
connection when the proxy says it may.
"""

from __future__ import annotations

from http import HTTPStatus

__all__ = ["error_body", "error_response"]


def error_body(status: int, detail: str = "") -> bytes:
    """The plain-text body of an error the proxy decided (also what HTTP/2 streams get)."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return f"{status} {reason}{': ' if detail else ''}{detail}\n".encode()


def error_response(
    status: int,
    detail: str = "",
    keep_alive: bool = False,
    extra_headers: bytes = b"",
) -> bytes:
    """
    A complete HTTP/1.1 response for an error the proxy itself decided.

    @param extra_headers: serialized header lines (each ending in CRLF), for example
        C{Retry-After} or C{Keep-Alive}.
    """
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    body = error_body(status, detail)
    connection = b"keep-alive" if keep_alive else b"close"
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason.encode()),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: %s\r\n" % connection,
            b"Cache-Control: no-store\r\n",
            extra_headers,
            b"\r\n",
            body,
        ]
    )
