#!/usr/bin/env python3
"""The keep-alive race soak: bursts of GET and POST through a proxy, each burst timed to reach
the proxy when the origin is closing the upstream connections the last burst left idle.

Standard library only, so it drives any proxy (persistproxy in the e2e tests, nginx for a
comparison in ``bench/race_soak.py``)::

    python tests/e2e/soak.py --port PROXY_PORT --idle-close 1.0 --seconds 60 \\
        [--origin-port ORIGIN_PORT] [--clients 16]

prints one JSON object: per method, the requests sent, answered 200, and the failures by kind
(``502``, ``reset``...); the failures per offset; and, with ``--origin-port`` (an origin from
``tests/e2e/origin.py``), how many POSTs reached the origin more than once and how many
connections it accepted.

Each round, every client connection sends one request at the same moment (alternately GET and
POST, the split changing from round to round), waits for all answers, then all wait the
origin's idle-close time plus an offset; the offsets sweep a few milliseconds either side of
the moment the origin closes, where one request in the burst meets a connection being closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

#: Milliseconds added to the origin's idle-close time before each burst, in turn. The proxy
#: notices a connection released some hundred microseconds after the origin started its idle
#: timer, and our clock starts later still, once the last answer of the burst is read: so
#: most of the sweep is a few milliseconds before the nominal moment, and the offsets that met
#: the race most often here (against a proxy that does not avoid it) come first.
OFFSETS_MS = (
    -4.0, -3.0, -6.0, -8.0, -5.0, -2.0, -12.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0
)

#: Time allowed for one answer; the proxy's own timeouts are far longer, so a request still
#: unanswered by then is counted as a failure ("timeout"), not waited for.
ANSWER_TIMEOUT = 10.0


@dataclass
class MethodCounts:
    sent: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    @property
    def errors(self) -> int:
        return sum(self.failures.values())


@dataclass
class SoakResult:
    seconds: float = 0.0
    rounds: int = 0
    methods: dict[str, MethodCounts] = field(
        default_factory=lambda: {"GET": MethodCounts(), "POST": MethodCounts()}
    )
    #: Failures by offset (in ms, as a string key for JSON).
    by_offset: dict[str, int] = field(default_factory=dict)
    post_ids: list[str] = field(default_factory=list)
    #: POST ids the origin saw more than once, and the connections it accepted (filled by
    #: check_origin).
    duplicated_posts: int | None = None
    origin_accepts: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "rounds": self.rounds,
            "methods": {
                m: {"sent": c.sent, "ok": c.ok, "errors": c.errors, "failures": c.failures}
                for m, c in self.methods.items()
            },
            "failures_by_offset_ms": self.by_offset,
            "duplicated_posts": self.duplicated_posts,
            "origin_accepts": self.origin_accepts,
        }


class _Client:
    """One keep-alive client connection; reconnects after the proxy closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """Send one request, read its answer: (status, connection kept)."""
        if self.writer is None:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        keep = True
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "connection" and "close" in value.lower():
                keep = False
            elif name == "transfer-encoding":
                raise ValueError("chunked answer: the soak expects Content-Length")
        if length:
            await self.reader.readexactly(length)
        if not keep:
            self.close()
        return status, keep


def _request(method: str, target: str, host: str, req_id: str) -> bytes:
    if method == "POST":
        body = b'{"soak": "' + req_id.encode() + b'"}'
        return (
            f"POST {target} HTTP/1.1\r\nHost: {host}\r\nX-Req-Id: {req_id}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def _one(
    client: _Client, method: str, target: str, result: SoakResult, offset: float | None
) -> None:
    counts = result.methods[method]
    counts.sent += 1
    req_id = uuid.uuid4().hex
    if method == "POST":
        result.post_ids.append(req_id)
    try:
        status, _ = await asyncio.wait_for(
            client.exchange(_request(method, target, "soak.test", req_id)), ANSWER_TIMEOUT
        )
    except TimeoutError:
        client.close()
        kind = "timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        client.close()
        kind = "reset"
    else:
        if status == 200:
            counts.ok += 1
            return
        kind = str(status)
    counts.fail(kind)
    key = "first" if offset is None else f"{offset:g}"
    result.by_offset[key] = result.by_offset.get(key, 0) + 1


async def soak(
    port: int,
    idle_close: float,
    seconds: float,
    clients: int = 16,
    host: str = "127.0.0.1",
    target: str = "/echo",
    offsets_ms: tuple[float, ...] = OFFSETS_MS,
) -> SoakResult:
    """
    Run rounds until C{seconds} have passed; see the module's docstring.
    """
    result = SoakResult()
    conns = [_Client(host, port) for _ in range(clients)]
    started = time.monotonic()
    offset: float | None = None  # the first round opens the connections: no offset
    try:
        while True:
            split = result.rounds % 2
            await asyncio.gather(
                *(
                    _one(c, "POST" if (i + split) % 2 else "GET", target, result, offset)
                    for i, c in enumerate(conns)
                )
            )
            result.rounds += 1
            if time.monotonic() - started >= seconds:
                break
            offset = offsets_ms[(result.rounds - 1) % len(offsets_ms)]
            await asyncio.sleep(max(0.0, idle_close + offset / 1000.0))
    finally:
        for c in conns:
            c.close()
    result.seconds = time.monotonic() - started
    return result


def check_origin(result: SoakResult, origin_port: int, host: str = "127.0.0.1") -> None:
    """
    Ask the test origin how often it saw each POST (it counts requests by X-Req-Id) and how
    many connections it accepted.
    """
    import http.client

    conn = http.client.HTTPConnection(host, origin_port, timeout=10)
    try:
        conn.request("GET", "/__stats", headers={"Connection": "close"})
        stats = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    seen: dict[str, int] = stats["ids"]
    result.duplicated_posts = sum(1 for i in result.post_ids if seen.get(i, 0) > 1)
    result.origin_accepts = int(stats["accepts"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--port", type=int, required=True, help="the proxy's port")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--idle-close", type=float, required=True,
                    help="seconds after which the origin closes an idle connection")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--origin-port", type=int, default=None,
                    help="the test origin's port, to count POSTs it saw twice")
    args = ap.parse_args(argv)
    result = asyncio.run(
        soak(args.port, args.idle_close, args.seconds, args.clients, args.host)
    )
    if args.origin_port is not None:
        with contextlib.suppress(OSError):
            check_origin(result, args.origin_port, args.host)
    json.dump(result.as_json(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
