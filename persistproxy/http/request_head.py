# -*- test-case-name: tests.unit.test_client_connection -*-
"""
A request head as the client hop reads it: collected from llhttp's callbacks, judged, and
rewritten into the head the upstream gets.

This is where a request is refused for what its head says (the status and reason go back to
the client; nothing of the request reaches the origin) and where hop-by-hop headers, and
every header the client's C{Connection} names, are left behind. It is a mixin of
L{persistproxy.http.client_connection.ClientConnection} rather than an object of its own:
llhttp calls back one object per parser, and a second object per request, or a call more per
header, would cost on every request for nothing but layout.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import httptools

from persistproxy.http.headers import (
    HOP_BY_HOP,
    MAX_CONTENT_LENGTH,
    connection_tokens,
    nominated_headers,
    remove_nominated,
)

if TYPE_CHECKING:
    from persistproxy.http.context import ListenerContext
    from persistproxy.http.headers import Header

__all__ = [
    "OTHER_VERSION",
    "UNKNOWN_METHOD",
    "BadRequest",
    "RequestHeadReader",
    "RequestLine",
    "UpstreamRequest",
    "origin_form",
]

#: A well-formed request line whose method llhttp does not know: 501, not 400.
UNKNOWN_METHOD = re.compile(rb"\A([A-Z][A-Z0-9_-]{0,31}) ([!-~]+) HTTP/(1\.[01])\r\n")

#: A request line with a well-formed version that is neither 1.0 nor 1.1 (llhttp refuses
#: HTTP/1.2 and cannot parse HTTP/1.10): 505, as for HTTP/2.0, not 400. Anchored to a line
#: start, as the read may hold requests pipelined before it.
OTHER_VERSION = re.compile(
    rb"(?:\A|\n)(?P<method>[A-Z][A-Z0-9_-]{0,31}) (?P<target>[!-~]+) "
    rb"HTTP/(?!1\.[01]\r\n)(?P<version>[0-9]{1,3}\.[0-9]{1,3})\r\n"
)

#: RFC 9112 3.2 / RFC 3986 3.2.2: a reg-name or an IP literal, and an optional port.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?\Z")

#: What the upstream is sent, and how to frame the exchange: method, origin-form target, the
#: rewritten head, HTTP/1.1 or not, the client's keep-alive wish, has a body, chunked body.
UpstreamRequest = tuple[bytes, bytes, bytes, bool, bool, bool, bool]


#: What was parsed of a refused request's line, for its access line: method, target, version
#: (C{b"-"}, C{b"-"}, C{"-"} for what was not reached).
RequestLine = tuple[bytes, bytes, str]


class BadRequest(Exception):
    """
    A request refused for its head (or its body's size): C{status} goes to the client.

    @ivar request_line: the request line, when the refusal came after it was complete.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.request_line: RequestLine | None = None


def origin_form(target: bytes) -> tuple[bytes, bytes]:
    """
    Split an absolute-form target into (origin-form target, authority), or refuse it.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadRequest(400, "request target is neither origin form nor absolute form")
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        at = rest.find(delimiter)
        if at != -1:
            end = min(end, at)
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority or not _HOST.match(authority):
        raise BadRequest(400, "invalid authority in the request target")
    if not path.startswith(b"/"):
        path = b"/" + path
    return path, authority


def _forwarded_upgrade(
    upgrade: bytes, tokens: set[bytes] | None, http11: bool, keep_alive: bool
) -> bytes:
    """
    The C{Upgrade} value the origin is asked for, or C{b""}: the two headers that ask for a
    protocol switch are the only hop-by-hop ones that cross, and only when the client asked
    for it on this hop (C{Connection: upgrade}), over HTTP/1.1 (an HTTP/1.0 Upgrade is to be
    ignored, RFC 9110 7.8), without C{Connection: close}, and for a protocol other than
    C{h2c}, which this proxy does not speak to origins (the header then goes, as before).
    Called only for a request without a body (see L{RequestHeadReader._upstream_request}).
    """
    if not upgrade or not http11 or not keep_alive or not tokens or b"upgrade" not in tokens:
        return b""
    kept = [
        token.strip()
        for token in upgrade.split(b",")
        if token.strip() and token.strip().lower() != b"h2c"
    ]
    return b", ".join(kept)


class RequestHeadReader:
    """
    llhttp's URL and header callbacks, and the judgement of the complete head.

    Its state is in slots (an idle keep-alive connection should cost little memory); the
    connection class adds its own.
    """

    __slots__ = (
        "_body_size",
        "_head_size",
        "_headers",
        "_host",
        "_hosts",
        "_length",
        "_progress",
        "_te",
        "_tokens",
        "_unlisted",
        "_upgrade",
        "_url",
        "_valid_host",
        "_xff",
    )

    # The connection's, read here.
    _ctx: ListenerContext
    _peer: bytes

    _valid_host: bytes | None
    _url: bytes
    _headers: list[Header]
    _tokens: set[bytes] | None
    _xff: list[bytes] | None
    _hosts: int
    _host: bytes
    _body_size: int
    _length: bytes | None
    _te: bytes | None
    #: The request's C{Upgrade} values while its head is read; once it is judged, the value
    #: forwarded (an Upgrade the origin is asked for), or C{b""}.
    _upgrade: bytes
    _head_size: int
    _unlisted: int
    _progress: bool

    def _reset_head(self) -> None:
        self._url = b""
        self._headers = []
        self._tokens = None
        self._xff = None
        self._hosts = 0
        self._host = b""
        self._body_size = 0
        self._length = None
        self._te = None
        self._upgrade = b""
        self._head_size = 0
        self._unlisted = 0
        self._progress = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        self._progress = True
        if self._head_size > self._ctx.config.max_head_size:
            raise BadRequest(431, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Trailer fields come through here too, after the head: max_head_size and
        # max_header_count bound the head and the trailers together. The field count is
        # len(_headers) + _unlisted, judged once per head (and once for trailers): the
        # size bound already stops a head of many fields, and this is a hot callback.
        self._head_size += len(name) + len(value) + 4
        self._progress = True
        if self._head_size > self._ctx.config.max_head_size:
            raise BadRequest(431, "request head too large")
        lower = name.lower()
        if lower in HOP_BY_HOP:
            self._unlisted += 1
            if lower == b"connection":
                if self._tokens is None:
                    self._tokens = set()
                connection_tokens(value, self._tokens)
            elif lower == b"transfer-encoding":
                self._te = value if self._te is None else self._te + b"," + value
            elif lower == b"upgrade":
                self._upgrade = value if not self._upgrade else self._upgrade + b", " + value
            return
        if lower == b"host":
            self._hosts += 1
            self._host = value
        elif lower == b"content-length":
            # Sent on normalised (see _upstream_request), not as the client wrote it.
            self._length = value
            self._unlisted += 1
            return
        elif lower == b"x-forwarded-for" and self._ctx.config.add_forwarded:
            if self._xff is None:
                self._xff = []
            self._xff.append(value)
            self._unlisted += 1
            return
        elif lower == b"x-forwarded-proto" and self._ctx.config.add_forwarded:
            self._unlisted += 1
            return
        self._headers.append((name, value))

    def _check_field_count(self) -> None:
        """
        @raise BadRequest: more fields than max_header_count in the head (or, once the
            trailers are read, in the head and trailers).
        """
        limit = self._ctx.config.max_header_count
        if len(self._headers) + self._unlisted > limit:
            raise BadRequest(431, f"more than {limit} header fields")

    def _upstream_request(self, parser: httptools.HttpRequestParser) -> UpstreamRequest:
        """
        Judge the complete head and write the one the upstream gets.

        @raise BadRequest: the head is refused (version, method, Host, framing, size).
        """
        ctx = self._ctx
        config = ctx.config
        self._check_field_count()
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise BadRequest(505, f"HTTP/{version} is not supported")
        http11 = version == "1.1"
        method: bytes = parser.get_method()
        if method == b"CONNECT":
            raise BadRequest(501, "CONNECT is not supported on this listener")
        if http11 and self._hosts != 1:
            raise BadRequest(400, "exactly one Host header is required")
        if self._hosts > 1:
            raise BadRequest(400, "more than one Host header")
        host = self._host
        if self._hosts and host != self._valid_host:
            # A kept-alive client sends the same Host each time: check it once.
            if not _HOST.match(host):
                raise BadRequest(400, "invalid Host header")
            self._valid_host = host
        te = self._te
        chunked = False
        if te is not None:
            if te.strip().lower() != b"chunked":
                raise BadRequest(501, "only the chunked transfer coding is implemented")
            if not http11:
                raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
            chunked = True
        has_body = chunked
        length = -1
        if self._length is not None:
            length = int(self._length)  # llhttp let only digits through
            if length > MAX_CONTENT_LENGTH:
                # An origin that reads it into an int64 would see a negative or wrapped
                # length, and frame the body differently from us.
                raise BadRequest(400, "Content-Length too large")
            has_body = length > 0
            if config.max_body_size and length > config.max_body_size:
                raise BadRequest(413, "request body too large")
        if has_body and parser.should_upgrade():
            # llhttp would take the body for the upgraded protocol's bytes.
            raise BadRequest(501, "Upgrade with a request body is not supported")
        headers = self._headers
        if self._tokens:
            headers = remove_nominated(headers, nominated_headers(self._tokens))
        url = self._url
        extra = []
        if url[:1] != b"/" and url != b"*":
            # Absolute form (RFC 9112 3.2.2): the target's authority replaces Host, and the
            # origin gets the origin form, so the two can never disagree downstream.
            url, authority = origin_form(url)
            headers = [h for h in headers if h[0].lower() != b"host"]
            extra.append(b"Host: %s\r\n" % authority)
        elif not self._hosts:
            extra.append(b"Host: %s\r\n" % ctx.group.pools[0].address.encode("latin-1"))
        if config.add_via:
            extra.append(b"Via: %s persistproxy\r\n" % version.encode())
        if config.add_forwarded:
            xff = self._xff
            if xff:
                extra.append(b"X-Forwarded-For: %s, %s\r\n" % (b", ".join(xff), self._peer))
            else:
                extra.append(b"X-Forwarded-For: %s\r\n" % self._peer)
            extra.append(b"X-Forwarded-Proto: %s\r\n" % ctx.scheme)
        if chunked:
            extra.append(b"Transfer-Encoding: chunked\r\n")
        elif length >= 0:
            extra.append(b"Content-Length: %d\r\n" % length)  # no leading zeros
        tokens = self._tokens
        if tokens and b"close" in tokens:
            keep_alive = False  # close wins over keep-alive (RFC 9112 9.3)
        else:
            keep_alive = http11 or (tokens is not None and b"keep-alive" in tokens)
        self._upgrade = upgrade = (
            _forwarded_upgrade(self._upgrade, tokens, http11, keep_alive)
            if not has_body and parser.should_upgrade()  # llhttp stops after this request
            else b""
        )
        if upgrade:
            extra.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % upgrade)
        head = b"".join(
            [
                b"%s %s HTTP/1.1\r\n" % (method, url),
                *[b"%s: %s\r\n" % h for h in headers],
                *extra,
                b"\r\n",
            ]
        )
        return method, url, head, http11, keep_alive, has_body, chunked
