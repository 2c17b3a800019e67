# -*- test-case-name: tests.unit.test_demo -*-
"""
A small origin that runs inside the proxy process with C{--demo}, so that a newcomer sees
the proxy work before writing a configuration.

It answers every request with a short text page that shows what reached the origin (method,
target, and the headers the proxy added or removed), which is also the quickest way to see
what persistproxy does to a request.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = ["DEMO_CONFIG", "DemoOrigin", "demo_site"]

#: The configuration of C{--demo}; the origin's port is filled in once it is bound.
DEMO_CONFIG = """
[[listener]]
name = "demo"
bind = "tcp:{port}:interface=127.0.0.1"
upstream = "demo-origin"

[[upstream]]
name = "demo-origin"
servers = ["127.0.0.1:{origin_port}"]
"""


class DemoOrigin(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        lines = [
            "Hello from the persistproxy demo origin.",
            "",
            f"{request.method.decode()} {request.uri.decode('latin-1')} "
            f"{request.clientproto.decode()}",
            "",
            "Headers as they reached the origin (note Via and X-Forwarded-*):",
        ]
        for name, values in request.requestHeaders.getAllRawHeaders():
            for value in values:
                lines.append(f"  {name.decode('latin-1')}: {value.decode('latin-1')}")
        transport: Any = request.channel.transport
        lines += [
            "",
            f"Origin connection from port {transport.getPeer().port} "
            "(the same on every request: the upstream hop is kept alive).",
            "",
        ]
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return "\n".join(lines).encode()


class _QuietSite(Site):
    def log(self, request: Any) -> None:
        """The proxy's access log already has every request."""


def demo_site() -> Site:
    site = _QuietSite(DemoOrigin())  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    site.noisy = False
    return site
