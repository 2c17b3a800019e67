"""What `proxy_protocol = true` costs the proxy: CPU per connection (a header read, then one
request with `Connection: close`) and CPU per request over keep-alive connections (the header's
reader passes every read on), against the same listener without it, in the same run.

The origin is tests/e2e/origin.py and the proxy the real `twistd -n persistproxy` (as the
end-to-end tests start them); the client is this script, one blocking socket at a time. The
proxy's CPU time (utime + stime from /proc) around each phase, divided by the connections or
requests of the phase, is the figure: unlike wall time, it does not depend on the client's
speed or on other load on the machine. Rounds interleave the two listeners; medians are shown.

    .venv/bin/python bench/proxyproto_cost.py [--connections 2000] [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from e2ehelpers import Origin, Proxy, make_config, proc_cpu_seconds

HEADER = b"PROXY TCP4 192.0.2.7 127.0.0.1 50000 80\r\n"
GET = b"GET /echo HTTP/1.1\r\nHost: bench\r\n\r\n"
CLOSE = b"GET /echo HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def _read_response(sock: socket.socket, buf: bytearray) -> None:
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    buf[:] = rest[length:]


def connections(port: int, n: int, header: bytes) -> None:
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(header + CLOSE)
            _read_response(s, bytearray())


def requests(port: int, n: int, header: bytes, parallel: int = 10) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(parallel)]
    bufs = [bytearray() for _ in socks]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if header:
            s.sendall(header)
    for i in range(n):
        s, buf = socks[i % parallel], bufs[i % parallel]
        s.sendall(GET)
        _read_response(s, buf)
    for s in socks:
        s.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    origin = Origin()
    work = Path(tempfile.mkdtemp(prefix="pp-bench-"))
    proxies: dict[str, Proxy] = {}
    try:
        for name, extra in (("plain", {}), ("proxy_protocol", {"proxy_protocol": True})):
            path = work / f"{name}.toml"
            listener = {"access_log": False, **extra}
            path.write_text(make_config([f"127.0.0.1:{origin.port}"], listener))
            proxies[name] = Proxy(str(path), cwd=str(work))
        per_conn: dict[str, list[float]] = {name: [] for name in proxies}
        per_req: dict[str, list[float]] = {name: [] for name in proxies}
        for _ in range(args.rounds):
            for name, proxy in proxies.items():
                header = HEADER if name == "proxy_protocol" else b""
                before = proc_cpu_seconds(proxy.pid)
                connections(proxy.port, args.connections, header)
                per_conn[name].append((proc_cpu_seconds(proxy.pid) - before) / args.connections)
                before = proc_cpu_seconds(proxy.pid)
                requests(proxy.port, args.requests, header)
                per_req[name].append((proc_cpu_seconds(proxy.pid) - before) / args.requests)
        print(f"| listener | proxy CPU µs / connection ({args.connections} per round) "
              f"| proxy CPU µs / keep-alive request ({args.requests} per round) |")
        print("|---|---|---|")
        for name in proxies:
            conn = statistics.median(per_conn[name]) * 1e6
            req = statistics.median(per_req[name]) * 1e6
            print(f"| {name} | {conn:.0f} | {req:.1f} |")
    finally:
        for proxy in proxies.values():
            proxy.terminate(10)
            proxy.kill()
        origin.kill()


if __name__ == "__main__":
    main()
