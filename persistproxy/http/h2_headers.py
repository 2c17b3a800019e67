# -*- test-case-name: tests.unit.test_h2 -*-
"""
RFC 9113 section 8 at the proxy's seam between the two hops: an HTTP/2 request's header
block judged and written as the HTTP/1.1 head the upstream gets, and an HTTP/1.1 response's
fields written as an HTTP/2 header block.

The C{h2} state machine is configured not to validate or normalise header fields itself
(see L{persistproxy.http.h2_connection}): its checks walk every byte of every field in
Python, and this module has to visit each field anyway to build the upstream head. So the
rules are applied here, once, with compiled patterns:

 - field names are lower-case tokens; values hold no NUL, CR or LF and do not start or end
   with whitespace (8.2.1); pseudo-header fields come first, once each, and only the
   request ones (8.3);
 - connection-specific fields are malformed (8.2.2), C{TE} is allowed only as C{trailers};
 - C{:authority} becomes C{Host} (8.3.1), a C{Host} that disagrees with it is refused;
 - C{Cookie} crumbs are joined with C{"; "} into one field (8.2.3);
 - hop-by-hop fields the HTTP/1.x hop also drops (C{Proxy-Authorization}) are left behind.

A malformed request is a stream error (L{Malformed}, answered with C{RST_STREAM}); a
request that is well-formed HTTP/2 but refused for what it asks (size, method, host) is an
HTTP error (L{BadRequest}, answered with a response), as on the HTTP/1.x hop.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from persistproxy.http.headers import HOP_BY_HOP, MAX_CONTENT_LENGTH
from persistproxy.http.request_head import _HOST, BadRequest

if TYPE_CHECKING:
    from persistproxy.http.context import ListenerContext
    from persistproxy.http.headers import Header

__all__ = [
    "CONNECTION_SPECIFIC",
    "H2Request",
    "Malformed",
    "request_head",
    "response_fields",
    "response_trailers",
    "trailer_fields",
]

#: Fields that describe an HTTP/1.x connection: malformed in HTTP/2 (RFC 9113 8.2.2).
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)

#: Fields never forwarded from a client's HTTP/2 request, beyond the connection-specific ones
#: (the same hop-by-hop set the HTTP/1.x hop drops).
_DROPPED = HOP_BY_HOP - CONNECTION_SPECIFIC - {b"te"}

#: Fields a response or request may not carry as trailers (RFC 9110 6.5.1): framing, routing,
#: authentication, and anything connection-specific.
_NOT_TRAILERS = HOP_BY_HOP | {
    b"content-length",
    b"content-type",
    b"content-encoding",
    b"content-range",
    b"host",
    b"authorization",
    b"set-cookie",
    b"cookie",
}

#: A lower-case field name (RFC 9110 5.1 token; RFC 9113 8.2.1 forbids upper case).
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
#: A field value: no NUL, CR or LF, no leading or trailing space or tab (RFC 9113 8.2.1).
_VALUE = re.compile(rb"(?:[^\x00\r\n\t ](?:[^\x00\r\n]*[^\x00\r\n\t ])?)?\Z")
#: A method token, and a request target without spaces or controls (it goes on a request line).
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_PATH = re.compile(rb"(?:/[!-~]*|\*)\Z")

_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})

#: What the upstream is sent, and how: method, target, the HTTP/1.1 head, has a body,
#: chunked body.
H2Request = tuple[bytes, bytes, bytes, bool, bool]


class Malformed(Exception):
    """A request that breaks HTTP/2's own rules: a stream error of type PROTOCOL_ERROR."""


def request_head(
    fields: list[Header], ctx: ListenerContext, peer: bytes, ended: bool
) -> H2Request:
    """
    Judge a request's header block and write the head the upstream gets.

    @param ended: the HEADERS frame carried END_STREAM: the request has no body.
    @raise Malformed: the block breaks RFC 9113 section 8 (a stream error).
    @raise BadRequest: the request is refused for what it asks (a response says why).
    """
    config = ctx.config
    method = scheme = authority = path = None
    host = length = None
    regular: list[bytes] = []
    cookies: list[bytes] = []
    xff: list[bytes] | None = None
    te_trailers = False
    fields_seen = 0
    add_forwarded = config.add_forwarded
    name_ok = _NAME.match
    value_ok = _VALUE.match
    for name, value in fields:
        if name[:1] == b":":
            if fields_seen:
                raise Malformed(f"pseudo-header {name!r} after a regular field")
            if name == b":method" and method is None:
                method = value
            elif name == b":path" and path is None:
                path = value
            elif name == b":scheme" and scheme is None:
                scheme = value
            elif name == b":authority" and authority is None:
                authority = value
            elif name in _PSEUDO:
                raise Malformed(f"pseudo-header {name!r} repeated")
            else:
                raise Malformed(f"pseudo-header {name!r} is not a request's")
            continue
        fields_seen += 1
        if not name_ok(name):
            raise Malformed(f"field name {name!r} is not a lower-case token")
        if value and not value_ok(value):
            raise Malformed(f"field {name!r} has a value with NUL, CR, LF or edge whitespace")
        if name in CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific field {name!r}")
        if name == b"cookie":
            cookies.append(value)
        elif name == b"te":
            if value.lower() != b"trailers":
                raise Malformed("TE other than 'trailers'")
            te_trailers = True
        elif name == b"host":
            if host is not None:
                raise BadRequest(400, "more than one Host header")
            host = value
        elif name == b"content-length":
            if length is not None and value != length:
                raise Malformed("conflicting content-length fields")
            length = value
        elif name in _DROPPED:
            continue
        elif add_forwarded and name == b"x-forwarded-for":
            if xff is None:
                xff = []
            xff.append(value)
        elif add_forwarded and name == b"x-forwarded-proto":
            continue
        else:
            regular.append(b"%s: %s\r\n" % (name, value))
    if fields_seen > config.max_header_count:
        raise BadRequest(431, f"more than {config.max_header_count} header fields")
    if method is None or scheme is None or path is None:
        if method == b"CONNECT":
            raise BadRequest(501, "CONNECT is not supported on this listener")
        raise Malformed("a request needs :method, :scheme and :path")
    if not _METHOD.match(method):
        raise Malformed(f"invalid :method {method!r}")
    if method == b"CONNECT":
        raise BadRequest(501, "CONNECT is not supported on this listener")
    if not _PATH.match(path) or (path == b"*" and method != b"OPTIONS"):
        raise Malformed("invalid :path")
    if scheme not in (b"https", b"http"):
        raise BadRequest(400, f"scheme {scheme.decode('latin-1')!r} is not proxied here")
    if authority is not None:
        if not authority or b"@" in authority or not _HOST.match(authority):
            raise BadRequest(400, "invalid :authority")
        if host is not None and host.lower() != authority.lower():
            raise BadRequest(400, "Host disagrees with :authority")
    elif host is not None:
        if not _HOST.match(host):
            raise BadRequest(400, "invalid Host header")
        authority = host
    else:
        raise BadRequest(400, "no :authority and no Host")
    extra = [b"host: %s\r\n" % authority]
    if cookies:
        extra.append(b"cookie: %s\r\n" % b"; ".join(cookies))
    if config.add_via:
        extra.append(b"via: 2 persistproxy\r\n")
    if add_forwarded:
        if xff:
            extra.append(b"x-forwarded-for: %s, %s\r\n" % (b", ".join(xff), peer))
        else:
            extra.append(b"x-forwarded-for: %s\r\n" % peer)
        extra.append(b"x-forwarded-proto: %s\r\n" % ctx.scheme)
    if te_trailers:
        # TE is hop-by-hop: on HTTP/1.1 it must be named in Connection (RFC 9110 10.1.4).
        extra.append(b"te: trailers\r\nconnection: te\r\n")
    has_body = chunked = False
    if length is not None:
        number = int(length)  # h2 let only digits through
        if number > MAX_CONTENT_LENGTH:
            raise BadRequest(400, "Content-Length too large")
        if ended and number:
            raise Malformed("content-length with no DATA to follow")
        if config.max_body_size and number > config.max_body_size:
            raise BadRequest(413, "request body too large")
        has_body = number > 0
        extra.append(b"content-length: %d\r\n" % number)
    elif not ended:
        # The length is unknown until END_STREAM: the upstream gets the body chunked.
        has_body = chunked = True
        extra.append(b"transfer-encoding: chunked\r\n")
    head = b"".join([b"%s %s HTTP/1.1\r\n" % (method, path), *regular, *extra, b"\r\n"])
    return method, path, head, has_body, chunked


def trailer_fields(fields: list[Header]) -> bytes:
    """
    A request's trailer fields as HTTP/1.1 trailer lines (after C{0\\r\\n}), less those a
    trailer may not carry.

    @raise Malformed: a pseudo-header or an invalid field.
    """
    lines = []
    for name, value in fields:
        if name[:1] == b":":
            raise Malformed("pseudo-header in trailers")
        if not _NAME.match(name) or (value and not _VALUE.match(value)):
            raise Malformed(f"invalid trailer field {name!r}")
        if name not in _NOT_TRAILERS:
            lines.append(b"%s: %s\r\n" % (name, value))
    return b"".join(lines)


def response_fields(status: int, headers: list[Header]) -> list[Header]:
    """
    An HTTP/1.1 response's status and fields (hop-by-hop ones already gone) as an HTTP/2
    header block: names in lower case, nothing connection-specific.
    """
    block = [(b":status", b"%d" % status)]
    for name, value in headers:
        lower = name.lower()
        if lower not in CONNECTION_SPECIFIC:
            block.append((lower, value))
    return block


def response_trailers(headers: list[Header]) -> list[Header]:
    """A response's trailer fields for HTTP/2, less those a trailer may not carry."""
    block = []
    for name, value in headers:
        lower = name.lower()
        if lower not in _NOT_TRAILERS:
            block.append((lower, value))
    return block
