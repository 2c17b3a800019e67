"""A scriptable raw-socket origin for the end-to-end tests, for what tests/e2e/origin.py does not
do: answers chosen byte by byte (extra bytes after a response, an unsolicited 101, a response
that is not HTTP, ...), each connection run by a script in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

Script = Callable[["ScriptOrigin", socket.socket, int], None]


class ScriptOrigin:
    """Runs ``script(origin, sock, n)`` for the n-th accepted connection (1-based), each in a
    thread; ``heads`` collects the request heads the scripts read with ``read_request``."""

    def __init__(self, script: Script) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.script = script
        self.accepts = 0
        self.heads: list[bytes] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepts += 1
                n = self.accepts
                self._conns.append(conn)
            threading.Thread(target=self._run, args=(conn, n), daemon=True).start()

    def _run(self, conn: socket.socket, n: int) -> None:
        conn.settimeout(5)
        with contextlib.suppress(OSError), conn:
            self.script(self, conn, n)

    def read_request(self, conn: socket.socket, buf: bytearray) -> bytes | None:
        """Read one request head (and a Content-Length body, discarded) from conn."""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return None
            buf += data
        i = buf.index(b"\r\n\r\n")
        head = bytes(buf[:i])
        del buf[: i + 4]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(buf) < length:
            data = conn.recv(65536)
            if not data:
                break
            buf += data
        del buf[:length]
        with self._lock:
            self.heads.append(head)
        return head

    def request_lines(self) -> list[bytes]:
        with self._lock:
            return [h.split(b"\r\n", 1)[0] for h in self.heads]

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.close()


def ok_response(body: bytes = b"ok") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def serve_each(first: bytes, then: Callable[[int], bytes] = lambda k: ok_response(b"normal"),
               hold_first: threading.Event | None = None) -> Script:
    """A script answering the first request of a connection with ``first`` (raw bytes) and the
    k-th following one with ``then(k)``; the first answer waits for ``hold_first`` if given
    (the test sets it once what it wants to happen meanwhile has happened)."""

    def script(o: ScriptOrigin, conn: socket.socket, n: int) -> None:
        buf = bytearray()
        k = 0
        while o.read_request(conn, buf) is not None:
            k += 1
            if k == 1:
                if hold_first is not None and not hold_first.wait(10):
                    return  # the test gave up: close without an answer
                conn.sendall(first)
            else:
                conn.sendall(then(k))

    return script
