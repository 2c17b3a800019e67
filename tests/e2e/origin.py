#!/usr/bin/env python3
"""A real HTTP/1.1 origin server for the end-to-end tests (stdlib only, asyncio).

Run as ``python tests/e2e/origin.py [--host 127.0.0.1] [--idle-close SECONDS]``.  It listens on
port 0, prints exactly one line ``{"port": N}`` to stdout, then serves; all diagnostics go to
stderr.  It parses requests itself (request line, headers, Content-Length and chunked bodies,
keep-alive, pipelining) and behaves by path:

=========================  ==================================================================
``GET /__stats``           JSON counters: accepts, requests, open, bad, ids, paths
``POST /__reset``          resets the counters (``open`` stays the real number)
``/__arm/drop-reused``     one shot: the next request arriving on a *reused* connection is read
                           completely (and counted) and then the connection is closed with no
                           answer -- a deterministic reproduction of the keep-alive race
``/echo``, ``/echo/...``   JSON description of the request as received
``/bytes/N``               N bytes (byte i == i % 256), Content-Length, 64 KiB writes
``/chunked/N``             the same bytes, ``Transfer-Encoding: chunked``
``/closedelim/N``          HTTP/1.1, neither Content-Length nor chunked, close after N bytes
``/http10/N``              ``HTTP/1.0 200`` with Content-Length N, then close
``/status/NNN``            that status (204/304 without body)
``/slow/SECONDS``          answers after that delay
``/close``                 200 with ``Connection: close`` then close
``/keepalive-timeout/N``   ``Keep-Alive: timeout=N`` and really closes after N s of idleness
``/hop``                   a response full of hop-by-hop headers plus ``X-End-To-End: yes``
``/continue``              honours ``Expect: 100-continue`` before reading the body
``/reset``                 reads the request, then closes without answering
``/endless-trailer``       chunked 200: a 5-byte chunk, then a trailer line that never ends
                           (64 KiB writes until the peer goes, 1 GiB at most); the bytes it
                           got out are in ``endless_trailer_bytes`` of the stats
``/status-length/NNN``     that status with ``Content-Length: 5`` and no body (204, 304)
``/raw-length/VALUE``      200 with ``Content-Length: VALUE`` as written (leading zeros, huge
                           values) and ``int(VALUE)`` bytes of body if under 1 MiB
``/many-headers/N``        200 with N extra header fields ``X-H<i>: <i>``
``/tiny-chunks/N``         chunked 200 of N 1-byte chunks, in one write
``/stall/N``               200 announcing 2N bytes (Content-Length), sends N of them, then goes
                           silent until the peer closes (60 s at most); the stats count such
                           responses in ``stalls`` and those whose peer closed in ``stalls_cut``
``/unread``                reads the request head and never its body, and answers nothing
                           (60 s at most, then closes); counted in ``unread``
``/page/N``                an HTML page with N images ``/bytes/N?i=<k>`` (a browser's page load)
``/trailers``              chunked 200 ``hello`` with the trailer ``X-Checksum: 42``
=========================  ==================================================================

The stats also count the chunks of all chunked request bodies read (``chunks``), and
``/echo`` says how many chunks its body came in (``chunks``).

Connections whose first request is a ``/__`` control path (stats, reset, arm) are not counted
in ``accepts``/``open``/``requests``, so tests can read the counters without disturbing them.
Every request carrying ``X-Req-Id`` is counted under that id in ``ids`` (also dropped ones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import re
import sys

MAX_HEAD = 256 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB; byte i of a /bytes body is i % 256

TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
REQUEST_LINE_RE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) HTTP/(\d)\.(\d)$")

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    206: "Partial Content", 301: "Moved Permanently", 302: "Found", 304: "Not Modified",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


def log(*args: object) -> None:
    print("origin:", *args, file=sys.stderr, flush=True)


class BadRequest(Exception):
    pass


class PeerGone(Exception):
    pass


class Stats:
    def __init__(self) -> None:
        self.serial = 0
        self.open = 0
        self.reset()
        self.drop_reused = False

    def reset(self) -> None:
        self.accepts = 0
        self.requests = 0
        self.bad = 0
        self.ids: dict[str, int] = {}
        self.paths: dict[str, int] = {}
        self.chunks = 0
        self.endless_trailer_bytes = 0
        self.stalls = 0
        self.stalls_cut = 0
        self.unread = 0

    def as_json(self) -> bytes:
        return json.dumps({
            "accepts": self.accepts, "requests": self.requests, "open": self.open,
            "bad": self.bad, "ids": self.ids, "paths": self.paths, "chunks": self.chunks,
            "endless_trailer_bytes": self.endless_trailer_bytes,
            "stalls": self.stalls, "stalls_cut": self.stalls_cut, "unread": self.unread,
        }).encode()


STATS = Stats()
OPTS: argparse.Namespace


class Request:
    def __init__(self, method: str, target: str, version: tuple[int, int],
                 headers: list[tuple[str, str]]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = b""
        self.chunked = False
        self.chunks = 0

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def connection_tokens(self) -> set[str]:
        tokens: set[str] = set()
        for v in self.get_all("connection"):
            tokens.update(t.strip().lower() for t in v.split(",") if t.strip())
        return tokens

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def wants_keepalive(self) -> bool:
        tokens = self.connection_tokens()
        if "close" in tokens:
            return False
        if self.version >= (1, 1):
            return True
        return "keep-alive" in tokens


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        STATS.serial += 1
        self.serial = STATS.serial
        self.nreq = 0
        self.counted = True
        self.idle_timeout: float | None = OPTS.idle_close
        STATS.accepts += 1
        STATS.open += 1

    # -- reading -------------------------------------------------------------------------
    async def fill(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise PeerGone()
        self.buf += data

    async def read_until(self, sep: bytes, limit: int) -> bytes:
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise BadRequest("line/head too long")
            start = max(0, len(self.buf) - len(sep) + 1)
            await self.fill()

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_head(self) -> Request:
        if not self.buf and self.idle_timeout is not None:
            try:
                await asyncio.wait_for(self.fill(), self.idle_timeout)
            except TimeoutError:
                raise PeerGone() from None  # idle: close silently
        # RFC 9112 2.2: ignore at least one empty line before a request-line.
        while self.buf.startswith(b"\r\n"):
            del self.buf[:2]
        head = await self.read_until(b"\r\n\r\n", MAX_HEAD)
        lines = head.split(b"\r\n")
        m = REQUEST_LINE_RE.match(lines[0])
        if not m:
            raise BadRequest(f"bad request line {lines[0][:80]!r}")
        method, target, major, minor = m.groups()
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise BadRequest("obsolete line folding")
            name, sep, value = line.partition(b":")
            if not sep or not TOKEN_RE.match(name):
                raise BadRequest(f"bad header line {line[:80]!r}")
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        return Request(method.decode(), target.decode("latin-1"), (int(major), int(minor)),
                       headers)

    async def read_body(self, req: Request) -> None:
        te = req.get_all("transfer-encoding")
        cl = req.get_all("content-length")
        if te:
            if cl:
                raise BadRequest("both Transfer-Encoding and Content-Length")
            codings = [c.strip().lower() for v in te for c in v.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise BadRequest(f"unsupported transfer-coding {codings}")
            req.chunked = True
            req.body = await self.read_chunked(req)
        elif cl:
            values = {c.strip() for v in cl for c in v.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise BadRequest(f"bad Content-Length {cl}")
            req.body = await self.read_exact(int(next(iter(values))))

    async def read_chunked(self, req: Request) -> bytes:
        parts: list[bytes] = []
        while True:
            line = await self.read_until(b"\r\n", 4096)
            size_s = line.split(b";", 1)[0].strip()
            if not size_s or not re.fullmatch(rb"[0-9A-Fa-f]+", size_s):
                raise BadRequest(f"bad chunk size {line[:40]!r}")
            size = int(size_s, 16)
            if size == 0:
                while True:  # trailer section
                    trailer = await self.read_until(b"\r\n", 16384)
                    if not trailer:
                        return b"".join(parts)
            parts.append(await self.read_exact(size))
            req.chunks += 1
            STATS.chunks += 1
            if await self.read_exact(2) != b"\r\n":
                raise BadRequest("chunk not followed by CRLF")

    # -- writing -------------------------------------------------------------------------
    async def send_head(self, status: int, headers: list[tuple[str, str]],
                        version: str = "HTTP/1.1") -> None:
        lines = [f"{version} {status} {REASONS.get(status, 'Status')}"]
        lines.append(f"X-Origin-Conn: {self.serial}")
        lines.append(f"X-Origin-Req: {self.nreq}")
        lines.append("Server: e2e-origin")
        lines += [f"{k}: {v}" for k, v in headers]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()

    async def send_simple(self, req: Request, status: int, body: bytes,
                          headers: list[tuple[str, str]] | None = None,
                          content_type: str = "text/plain") -> None:
        hdrs = list(headers or [])
        if status not in (204, 304) and not 100 <= status < 200:
            hdrs += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        else:
            body = b""
        await self.send_head(status, hdrs)
        if req.method != "HEAD" and body:
            self.writer.write(body)
            await self.writer.drain()

    async def send_pattern(self, n: int, chunked: bool) -> None:
        sent = 0
        while sent < n:
            piece = BLOCK[: min(len(BLOCK), n - sent)]
            if chunked:
                self.writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            else:
                self.writer.write(piece)
            sent += len(piece)
            await self.writer.drain()
        if chunked:
            self.writer.write(b"0\r\n\r\n")
            await self.writer.drain()

    # -- main loop -----------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                try:
                    req = await self.read_head()
                except BadRequest as e:
                    STATS.bad += 1
                    log(f"conn {self.serial}: 400: {e}")
                    self.nreq += 1
                    await self.send_simple(Request("GET", "/", (1, 1), []), 400,
                                           b"bad request\n", [("Connection", "close")])
                    return
                self.nreq += 1
                keep = await self.handle(req)
                if not keep:
                    return
        except (PeerGone, ConnectionError, asyncio.IncompleteReadError):
            return
        except BadRequest as e:
            STATS.bad += 1
            log(f"conn {self.serial}: bad body: {e}")
            with contextlib.suppress(ConnectionError):
                await self.send_simple(Request("GET", "/", (1, 1), []), 400, b"bad request\n",
                                       [("Connection", "close")])
        except Exception as e:
            log(f"conn {self.serial}: crashed: {e!r}")
        finally:
            if self.counted:
                STATS.open -= 1
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.close()

    def count(self, req: Request) -> None:
        STATS.requests += 1
        STATS.paths[req.path] = STATS.paths.get(req.path, 0) + 1
        rid = req.get("x-req-id")
        if rid is not None:
            STATS.ids[rid] = STATS.ids.get(rid, 0) + 1

    async def handle(self, req: Request) -> bool:
        """Answer one request; return whether to keep the connection open."""
        path = req.path
        keep = req.wants_keepalive()
        conn_hdr: list[tuple[str, str]] = []
        if not keep:
            conn_hdr = [("Connection", "close")]
        elif req.version < (1, 1):
            conn_hdr = [("Connection", "keep-alive")]

        if path.startswith("/__"):
            if self.nreq == 1 and self.counted:
                # A control connection: do not let it show in the counters.
                self.counted = False
                STATS.accepts -= 1
                STATS.open -= 1
            await self.read_body(req)
            if path == "/__stats":
                await self.send_simple(req, 200, STATS.as_json(), conn_hdr, "application/json")
            elif path == "/__reset":
                STATS.reset()
                await self.send_simple(req, 200, b"reset\n", conn_hdr)
            elif path == "/__arm/drop-reused":
                STATS.drop_reused = True
                await self.send_simple(req, 200, b"armed\n", conn_hdr)
            else:
                await self.send_simple(req, 404, b"unknown control path\n", conn_hdr)
            return keep

        if path == "/unread":
            # An origin that stops reading: the body stays in the kernel's buffers (and the
            # StreamReader's, 2 * MAX_HEAD at most) until the peer gives up.
            self.count(req)
            STATS.unread += 1
            log(f"conn {self.serial}: /unread, not reading the body")
            await asyncio.sleep(60)
            return False

        if path == "/continue" and "100-continue" in (req.get("expect") or "").lower():
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await self.writer.drain()
        await self.read_body(req)
        self.count(req)

        if STATS.drop_reused and self.nreq > 1:
            STATS.drop_reused = False
            log(f"conn {self.serial}: dropping request {self.nreq} {req.method} {req.target}")
            return False
        if path == "/reset":
            log(f"conn {self.serial}: /reset, closing without an answer")
            return False

        parts = path.strip("/").split("/")
        head = req.method == "HEAD"

        if path == "/echo" or path.startswith("/echo/"):
            body = json.dumps({
                "method": req.method, "path": req.target,
                "version": f"HTTP/{req.version[0]}.{req.version[1]}",
                "headers": [[k, v] for k, v in req.headers], "body_len": len(req.body),
                "body_sha256": hashlib.sha256(req.body).hexdigest(), "chunked": req.chunked,
                "chunks": req.chunks,
                "conn": self.serial, "req": self.nreq,
            }).encode()
            await self.send_simple(req, 200, body, conn_hdr, "application/json")
            return keep

        if len(parts) == 2 and parts[0] in ("bytes", "chunked", "closedelim", "http10"):
            try:
                n = int(parts[1])
            except ValueError:
                await self.send_simple(req, 404, b"bad size\n", conn_hdr)
                return keep
            kind = parts[0]
            if kind == "bytes":
                await self.send_head(200, [("Content-Type", "application/octet-stream"),
                                           ("Content-Length", str(n)), *conn_hdr])
                if not head:
                    await self.send_pattern(n, chunked=False)
                return keep
            if kind == "chunked":
                await self.send_head(200, [("Content-Type", "application/octet-stream"),
                                           ("Transfer-Encoding", "chunked"), *conn_hdr])
                if not head:
                    await self.send_pattern(n, chunked=True)
                return keep
            if kind == "closedelim":
                await self.send_head(200, [("Content-Type", "application/octet-stream")])
                if not head:
                    await self.send_pattern(n, chunked=False)
                return False
            # http10
            await self.send_head(200, [("Content-Type", "application/octet-stream"),
                                       ("Content-Length", str(n))], version="HTTP/1.0")
            if not head:
                await self.send_pattern(n, chunked=False)
            return False

        if len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
            status = int(parts[1])
            await self.send_simple(req, status, f"status {status}\n".encode(), conn_hdr)
            return keep

        if len(parts) == 2 and parts[0] == "slow":
            await asyncio.sleep(float(parts[1]))
            await self.send_simple(req, 200, b"slow\n", conn_hdr)
            return keep

        if path == "/endless-trailer":
            await self.send_head(200, [("Content-Type", "text/plain"),
                                       ("Transfer-Encoding", "chunked")])
            self.writer.write(b"5\r\nhello\r\n0\r\nX-Trailer: ")
            piece = b"a" * 65536
            for _ in range(16384):  # 1 GiB at most
                self.writer.write(piece)
                await self.writer.drain()
                STATS.endless_trailer_bytes += len(piece)
            return False

        if len(parts) == 2 and parts[0] == "status-length" and parts[1].isdigit():
            await self.send_head(int(parts[1]), [("Content-Length", "5"), *conn_hdr])
            return keep

        if len(parts) == 2 and parts[0] == "raw-length" and parts[1].isdigit():
            n = int(parts[1])
            await self.send_head(200, [("Content-Length", parts[1]), *conn_hdr])
            if n < 1 << 20:
                self.writer.write(b"x" * n)
                return keep
            self.writer.write(b"x" * 1000)
            await self.writer.drain()
            return False

        if len(parts) == 2 and parts[0] == "many-headers" and parts[1].isdigit():
            extra = [(f"X-H{i}", str(i)) for i in range(int(parts[1]))]
            await self.send_simple(req, 200, b"many\n", [*extra, *conn_hdr])
            return keep

        if len(parts) == 2 and parts[0] == "tiny-chunks" and parts[1].isdigit():
            await self.send_head(200, [("Transfer-Encoding", "chunked"), *conn_hdr])
            self.writer.write(b"1\r\nx\r\n" * int(parts[1]) + b"0\r\n\r\n")
            await self.writer.drain()
            return keep

        if len(parts) == 2 and parts[0] == "stall" and parts[1].isdigit():
            n = int(parts[1])
            await self.send_head(200, [("Content-Type", "application/octet-stream"),
                                       ("Content-Length", str(2 * n))])
            await self.send_pattern(n, chunked=False)
            STATS.stalls += 1
            try:  # silent; whatever the peer sends, it gets nothing more
                while await asyncio.wait_for(self.reader.read(65536), 60):
                    pass
                STATS.stalls_cut += 1
            except ConnectionError:
                STATS.stalls_cut += 1
            except TimeoutError:
                pass
            return False

        if path == "/close":
            await self.send_simple(req, 200, b"closing\n", [("Connection", "close")])
            return False

        if len(parts) == 2 and parts[0] == "keepalive-timeout":
            timeout = float(parts[1])
            await self.send_simple(req, 200, b"keep-alive timeout\n",
                                   [("Keep-Alive", f"timeout={parts[1]}"), *conn_hdr])
            self.idle_timeout = timeout
            return keep

        if len(parts) == 2 and parts[0] == "page" and parts[1].isdigit():
            n = int(parts[1])
            images = "".join(f'<img src="/bytes/{100 + i}?i={i}">' for i in range(n))
            body = f"<!doctype html><html><body><p>page</p>{images}</body></html>".encode()
            await self.send_simple(req, 200, body, conn_hdr, "text/html")
            return keep

        if path == "/trailers":
            await self.send_head(200, [("Content-Type", "text/plain"),
                                       ("Transfer-Encoding", "chunked"), *conn_hdr])
            self.writer.write(b"5\r\nhello\r\n0\r\nX-Checksum: 42\r\n\r\n")
            await self.writer.drain()
            return keep

        if path == "/hop":
            await self.send_simple(req, 200, b"hop\n", [
                ("Connection", "X-Hop-Secret, Keep-Alive"),
                ("X-Hop-Secret", "leak"),
                ("Keep-Alive", "timeout=30"),
                ("Proxy-Authenticate", "Basic"),
                ("Trailer", "X-T"),
                ("Upgrade", "h2c"),
                ("X-End-To-End", "yes"),
            ])
            return keep

        if path == "/continue":
            await self.send_simple(req, 200, json.dumps({"body_len": len(req.body)}).encode(),
                                   conn_hdr, "application/json")
            return keep

        await self.send_simple(req, 404, b"not found\n", conn_hdr)
        return keep


async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await Connection(reader, writer).run()


async def main() -> None:
    global OPTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--idle-close", type=float, default=None,
                    help="close any keep-alive connection idle for that many seconds")
    ap.add_argument("--port", type=int, default=0,
                    help="the port to listen on (0: any free one, the default)")
    OPTS = ap.parse_args()
    server = await asyncio.start_server(on_connect, OPTS.host, OPTS.port, backlog=1024,
                                        limit=MAX_HEAD)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()
    log(f"listening on {OPTS.host}:{port} idle_close={OPTS.idle_close}")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
