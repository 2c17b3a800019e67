#!/usr/bin/env python3
"""A raw TCP origin for the end-to-end tests of the tcp protocol (stdlib only, a thread per
connection).

Run as ``python tests/e2e/tcp_origin.py``. It listens on 127.0.0.1, port 0, prints one line
``{"port": N}`` to stdout, then serves. Each connection starts with one command line:

=======================  ===================================================================
``echo``                 echoes every byte until the client's FIN, then sends its own FIN
``source N TAG``         sends N bytes (byte i == i % 256) then its FIN (a half-close), then
                         reads until the client's FIN and prints
                         ``{"event": "after_fin", "tag": TAG, "bytes": n}`` (what still came
                         from the client after the origin's FIN)
``sink TAG [PAUSE_MS]``  reads until the client's FIN (pausing PAUSE_MS every 32 MiB: a slow
                         reader), then answers ``<bytes> <sha256 or ->\\n`` and closes; the
                         hash only under 64 MiB
``hold``                 sends nothing and waits for the client to close
=======================  ===================================================================

Everything else it prints (diagnostics) goes to stderr.
"""

from __future__ import annotations

import hashlib
import json
import socket
import socketserver
import sys
import time

BLOCK = bytes(range(256)) * 4096  # 1 MiB; byte i of a source stream is i % 256
HASH_LIMIT = 64 * 1024 * 1024
PAUSE_EVERY = 32 * 1024 * 1024


def say(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


class Handler(socketserver.BaseRequestHandler):
    request: socket.socket

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(120)
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                return
            line += chunk
        words = line.decode().split()
        try:
            getattr(self, "do_" + words[0])(sock, *words[1:])
        except (OSError, TimeoutError) as e:
            print(f"tcp_origin: {words}: {e!r}", file=sys.stderr, flush=True)

    def do_echo(self, sock: socket.socket) -> None:
        while data := sock.recv(262144):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        sock.close()

    def do_source(self, sock: socket.socket, size: str, tag: str) -> None:
        left = int(size)
        view = memoryview(BLOCK)
        while left:
            n = min(left, len(BLOCK))
            sock.sendall(view[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        received = 0
        while data := sock.recv(262144):
            received += len(data)
        say({"event": "after_fin", "tag": tag, "bytes": received})
        sock.close()

    def do_sink(self, sock: socket.socket, tag: str, pause_ms: str = "0") -> None:
        pause = int(pause_ms) / 1000
        digest = hashlib.sha256()
        received = 0
        next_pause = PAUSE_EVERY
        buf = bytearray(1 << 20)
        while n := sock.recv_into(buf):
            if received < HASH_LIMIT:
                digest.update(memoryview(buf)[:n])
            received += n
            if pause and received >= next_pause:
                next_pause += PAUSE_EVERY
                time.sleep(pause)
        answer = digest.hexdigest() if received <= HASH_LIMIT else "-"
        say({"event": "sink", "tag": tag, "bytes": received})
        sock.sendall(f"{received} {answer}\n".encode())
        sock.close()

    def do_hold(self, sock: socket.socket) -> None:
        while sock.recv(65536):
            pass
        sock.close()


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main() -> None:
    server = Server(("127.0.0.1", 0), Handler)
    say({"port": server.server_address[1]})
    server.serve_forever()


if __name__ == "__main__":
    main()
