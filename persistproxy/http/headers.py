# -*- test-case-name: tests.unit.test_headers -*-
"""
Header rules that apply at every hop (RFC 9110 section 7.6.1, RFC 9112 section 9).

Headers travel as lists of C{(name, value)} byte pairs in their original case and order:
repeated headers stay repeated, and nothing is folded into a dict. Names are compared in
lower case; the lower-cased name is computed once per header, in the parser callback.
"""

from __future__ import annotations

__all__ = [
    "HOP_BY_HOP",
    "MAX_CONTENT_LENGTH",
    "NEVER_NOMINATED",
    "connection_tokens",
    "keepalive_timeout_param",
    "nominated_headers",
    "remove_nominated",
]

#: Headers that describe one connection and never cross a hop, whatever C{Connection} says.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

Header = tuple[bytes, bytes]

#: The largest Content-Length forwarded either way: a peer keeping lengths in a signed 64-bit
#: integer could not frame a larger body as we do (llhttp accepts up to 2^64 - 1). Larger
#: is a 400 from a client, a 502 from an origin.
MAX_CONTENT_LENGTH = 2**63 - 1


def connection_tokens(value: bytes, into: set[bytes]) -> None:
    """
    Add the lower-cased, comma-separated tokens of one C{Connection} header value.
    """
    for token in value.split(b","):
        token = token.strip().lower()
        if token:
            into.add(token)


#: Headers a C{Connection} token may never remove: they frame or route the message, and a
#: proxy that drops them on request changes where one message ends and the next begins
#: (C{Connection: content-length} would otherwise smuggle the body as a second request).
NEVER_NOMINATED = frozenset({b"content-length", b"transfer-encoding", b"host"})
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive"})


def nominated_headers(tokens: set[bytes] | None) -> set[bytes]:
    """
    The header names C{Connection} made hop-by-hop, less the options and the protected ones.
    """
    if not tokens:
        return set()
    return tokens - _CONNECTION_OPTIONS - NEVER_NOMINATED


def remove_nominated(headers: list[Header], tokens: set[bytes]) -> list[Header]:
    """
    Drop the headers that C{Connection} named: they are hop-by-hop too (RFC 9110 7.6.1).
    Neither nginx nor HAProxy does this; a proxy that forwards them leaks per-hop secrets.
    """
    if not tokens:
        return headers
    return [h for h in headers if h[0].lower() not in tokens]


def keepalive_timeout_param(value: bytes) -> float | None:
    """
    The C{timeout=N} parameter of a C{Keep-Alive} header, if any and valid.
    """
    for part in value.split(b","):
        key, sep, number = part.strip().partition(b"=")
        if sep and key.strip().lower() == b"timeout":
            try:
                seconds = float(number.strip().strip(b'"'))
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None
