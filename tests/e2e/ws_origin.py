#!/usr/bin/env python3
"""A WebSocket origin for the end-to-end tests of Upgrade on HTTP listeners (the `websockets`
library's asyncio server: a real, strict WebSocket implementation).

Run as ``python tests/e2e/ws_origin.py``. It listens on 127.0.0.1, port 0, prints one line
``{"port": N}`` to stdout, then serves:

=============  ==============================================================================
``/echo``      a WebSocket that echoes every message, text or binary
``/refuse``    refuses the upgrade: ``426 Upgrade Required`` (an ordinary HTTP response)
``/plain``     answers ``200`` with the body ``plain`` to any request (no upgrade)
=============  ==============================================================================

The server sends no pings (an idle tunnel stays idle). Diagnostics go to stderr.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response


async def _echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


def _route(ws: ServerConnection, request: Request) -> Response | None:
    if request.path == "/refuse":
        return ws.respond(HTTPStatus.UPGRADE_REQUIRED, "no upgrade here\n")
    if request.path == "/plain":
        return ws.respond(HTTPStatus.OK, "plain\n")
    return None


async def main() -> None:
    async with serve(
        _echo, "127.0.0.1", 0, process_request=_route, ping_interval=None, compression=None
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
