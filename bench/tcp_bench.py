"""Raw TCP relay throughput: client → {nothing, persistproxy tcp, nginx stream, haproxy mode tcp}
→ origin, 1 connection and N parallel connections, same machine, same run.

The origin is nginx (one worker, pinned to ORIGIN_CPU) serving a sparse file with sendfile, so
sending costs it almost nothing; the client is a single-threaded Python reader (recv_into a
1 MiB buffer, discarded; pinned to CLIENT_CPU) that asks each connection for its share of
TCP_BYTES with a Range request and reads until the origin closes. The proxies see only bytes:
HTTP is just what the endpoints speak. Each proxy is pinned to PROXY_CPU and started fresh for
every run; the rounds interleave the proxies. Per run: GiB/s (bytes the client read / wall
time from the first connect to the last EOF) and the proxy's CPU seconds per GiB (utime+stime
of its processes from /proc; nginx: its worker). The report gives medians over the rounds and
persistproxy's ratios to nginx and haproxy.

Usually started by `bash bench/run.sh tcp`. Environment: TCP_BYTES (bytes per run, 1 GiB),
TCP_PARALLEL (comma list of connection counts, "1,50"), ROUNDS (3), TCP_TARGETS (comma list of
direct, persistproxy, nginx-stream, nginx-stream-256k, haproxy; default all), PROXY_CPU (0),
ORIGIN_CPU (1), CLIENT_CPU (1).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib as b

ALL_TARGETS = ["direct", "persistproxy", "nginx-stream", "nginx-stream-256k", "haproxy"]
GIB = 1 << 30
CLIENT_CPU = os.environ.get("CLIENT_CPU", "1")
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


@dataclass
class Run:
    target: str
    parallel: int
    round: int
    nbytes: int = 0
    seconds: float = 0.0
    cpu_s: float | None = None  # proxy CPU seconds for the run
    error: str = ""

    @property
    def gib_s(self) -> float | None:
        return self.nbytes / GIB / self.seconds if self.nbytes and self.seconds else None

    @property
    def cpu_per_gib(self) -> float | None:
        return self.cpu_s / (self.nbytes / GIB) if self.cpu_s is not None and self.nbytes else None


# --------------------------------------------------------------------------- the client


def client(port: int, total: int, parallel: int) -> dict[str, object]:
    """Read `total` bytes of body through `parallel` connections; runs in its own process."""
    share = total // parallel
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    for i in range(parallel):
        size = share if i < parallel - 1 else total - share * (parallel - 1)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(
            f"GET /big HTTP/1.1\r\nHost: bench\r\nRange: bytes=0-{size - 1}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ, [size, b""])
    buf = bytearray(1 << 20)
    body = 0
    errors = []
    while selector.get_map():
        for key, _ in selector.select(30):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            state = key.data
            try:
                n = s.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError as e:
                errors.append(repr(e))
                n = 0
            if n and state[1] is not None:
                # Until the end of the response head: count only the body after it.
                head = state[1] + bytes(buf[:n])
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    state[1] = head
                    continue
                if not head.startswith(b"HTTP/1.1 206"):
                    errors.append(head[:40].decode("latin-1"))
                state[1] = None
                body += len(head) - end - 4
                state[0] -= len(head) - end - 4
            elif n:
                body += n
                state[0] -= n
            if not n:
                if state[0]:
                    errors.append(f"short by {state[0]} bytes")
                selector.unregister(s)
                s.close()
    return {"bytes": body, "seconds": time.monotonic() - started, "errors": errors}


# --------------------------------------------------------------------------- configurations


def write_origin(prefix: Path, port: int, size: int) -> None:
    prefix.mkdir(parents=True, exist_ok=True)
    www = prefix / "www"
    www.mkdir(exist_ok=True)
    with open(www / "big", "wb") as f:
        f.truncate(size)  # sparse: nothing on disk, zeros from the page cache
    (prefix / "nginx.conf").write_text(
        b._nginx_common(prefix, 1024, 4096)
        + f"""
http {{
{b._nginx_http_common(prefix)}
    default_type application/octet-stream;
    sendfile on;
    sendfile_max_chunk 0;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
    }}
}}
"""
    )


def write_nginx_stream(prefix: Path, port: int, origin_port: int, buffer: str = "") -> None:
    """nginx's stream proxy; C{buffer} sets C{proxy_buffer_size} (16k by default)."""
    prefix.mkdir(parents=True, exist_ok=True)
    buffer_line = f"proxy_buffer_size {buffer};" if buffer else ""
    (prefix / "nginx.conf").write_text(
        f"load_module {NGINX_STREAM_MODULE};\n"
        + b._nginx_common(prefix, 1024, 4096)
        + f"""
stream {{
    upstream origin {{ server 127.0.0.1:{origin_port}; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_pass origin;
        {buffer_line}
    }}
}}
"""
    )


def write_haproxy_tcp(path: Path, port: int, origin_port: int) -> None:
    path.write_text(
        f"""global
    nbthread 1
    maxconn 4096
    no strict-limits

defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server origin 127.0.0.1:{origin_port}
"""
    )


def write_persistproxy_tcp(path: Path, port: int, origin_port: int) -> None:
    path.write_text(
        f"""[[listener]]
name = "tcp"
bind = "tcp:{port}:interface=127.0.0.1"
protocol = "tcp"
upstream = "origin"

[[upstream]]
name = "origin"
servers = ["127.0.0.1:{origin_port}"]
"""
    )


# --------------------------------------------------------------------------- the benchmark


class TcpBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = b.Processes()
        self.workdir = b.make_workdir("tcp")
        self.failures: dict[str, str] = {}

    def start(self, target: str, origin: b.Server, tag: str) -> b.Server | None:
        if target == "direct":
            return None
        port = b.free_port()
        d = self.workdir / f"{target}-{tag}"
        d.mkdir(parents=True)
        if target == "persistproxy":
            problem = b.persistproxy_problem(self.args.twistd)
            if problem:
                raise b.BenchError(problem)
            conf = d / "persistproxy.toml"
            write_persistproxy_tcp(conf, port, origin.port)
            server = self.procs.spawn(
                target,
                b.twistd_argv(self.args.twistd, conf, b.PROXY_CPU),
                port,
                d / "stdout.log",
                d,
                env=b.twistd_env(),
            )
            b.wait_ready(server, marker='"listener.started"')
        elif target.startswith("nginx-stream"):
            write_nginx_stream(d, port, origin.port, "256k" if target.endswith("256k") else "")
            server = self.procs.spawn(
                target, b.nginx_argv(d, b.PROXY_CPU), port, d / "stdout.log", d, workers_only=True
            )
            b.wait_ready(server)
        else:
            conf = d / "haproxy.cfg"
            write_haproxy_tcp(conf, port, origin.port)
            server = self.procs.spawn(
                target, b.haproxy_argv(conf, b.PROXY_CPU), port, d / "stdout.log", d
            )
            b.wait_ready(server)
        return server

    def run_one(self, target: str, origin: b.Server, parallel: int, rnd: int) -> Run:
        run = Run(target, parallel, rnd)
        try:
            server = self.start(target, origin, f"{parallel}-{rnd}")
        except b.BenchError as e:
            run.error = str(e)
            self.failures[target] = str(e)
            return run
        port = server.port if server is not None else origin.port
        time.sleep(0.3)  # let a freshly started proxy settle before its CPU is read
        cpu0 = server.cpu_ticks() if server is not None else 0
        out = subprocess.run(
            [
                *b.taskset(CLIENT_CPU or None),
                sys.executable,
                __file__,
                "--client",
                str(port),
                str(self.args.bytes),
                str(parallel),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if server is not None:
            run.cpu_s = (server.cpu_ticks() - cpu0) / b.CLK_TCK
            if not server.alive():
                run.error = f"{target} died: {server.log_tail(5)}"
            self.procs.stop(server)
        if out.returncode != 0:
            run.error = f"client failed: {out.stderr.strip()[-300:]}"
            return run
        result = json.loads(out.stdout)
        run.nbytes = int(result["bytes"])
        run.seconds = float(result["seconds"])
        if result["errors"]:
            run.error = "; ".join(result["errors"])[:300]
        return run

    def main(self) -> int:
        a = self.args
        b.log(f"work dir {self.workdir}")
        prefix = self.workdir / "origin"
        port = b.free_port()
        write_origin(prefix, port, a.bytes)
        origin = self.procs.spawn(
            "origin", b.nginx_argv(prefix, b.ORIGIN_CPU), port, prefix / "stdout.log", prefix,
            workers_only=True,
        )  # fmt: skip
        b.wait_ready(origin)
        # The first read of the sparse file fills the page cache: not part of any run.
        self.run_one("direct", origin, 1, 0)
        runs: list[Run] = []
        for rnd in range(1, a.rounds + 1):
            order = a.targets[rnd - 1 :] + a.targets[: rnd - 1]  # rotate each round
            for parallel in a.parallel:
                for target in order:
                    r = self.run_one(target, origin, parallel, rnd)
                    runs.append(r)
                    b.log(
                        f"round {rnd}/{a.rounds} {target} x{parallel}: {b.fmt(r.gib_s, 2)} GiB/s,"
                        f" proxy CPU {b.fmt(r.cpu_per_gib, 2)} s/GiB"
                        + (f" — ERROR {r.error}" if r.error else "")
                    )
        report = self.report(runs)
        print(report)
        b.log(f"saved {b.save_report('tcp', report)}")
        return 0

    def report(self, runs: list[Run]) -> str:
        a = self.args

        def med(target: str, parallel: int, attr: str) -> float | None:
            sel = [r for r in runs if (r.target, r.parallel) == (target, parallel) and not r.error]
            return b.median([getattr(r, attr) for r in sel])

        rows, ratios = [], []
        for parallel in a.parallel:
            for target in a.targets:
                rows.append(
                    [
                        f"{parallel}",
                        target,
                        b.fmt(med(target, parallel, "gib_s"), 2),
                        b.fmt(med(target, parallel, "cpu_per_gib"), 2),
                        "FAILED (see below)" if target in self.failures else "",
                    ]
                )
            for other in ("nginx-stream", "nginx-stream-256k", "haproxy"):
                if other in a.targets and "persistproxy" in a.targets:
                    ratios.append(
                        [
                            f"x{parallel}: persistproxy / {other}, GiB/s",
                            b.ratio(
                                med("persistproxy", parallel, "gib_s"),
                                med(other, parallel, "gib_s"),
                            ),
                        ]
                    )
                    ratios.append(
                        [
                            f"x{parallel}: persistproxy / {other}, CPU s/GiB",
                            b.ratio(
                                med("persistproxy", parallel, "cpu_per_gib"),
                                med(other, parallel, "cpu_per_gib"),
                            ),
                        ]
                    )
        raw = [
            [
                r.target,
                str(r.parallel),
                str(r.round),
                str(r.nbytes),
                f"{r.seconds:.2f}",
                b.fmt(r.gib_s, 2),
                b.fmt(r.cpu_s, 2),
                b.fmt(r.cpu_per_gib, 2),
                b.summary(r.error),
            ]
            for r in runs
        ]
        lines = [
            "# persistproxy raw TCP relay benchmark",
            "",
            (
                f"{a.bytes / GIB:g} GiB per run through 1 connection or split over N parallel"
                f" ones, {a.rounds} round(s), medians shown. Proxy on CPU {b.PROXY_CPU}; origin"
                f" (nginx, sendfile of a sparse file) on CPU {b.ORIGIN_CPU}; client (Python,"
                f" recv_into 1 MiB) on CPU {CLIENT_CPU or 'any'}. nginx `stream` and HAProxy"
                " `mode tcp` with their default buffers (16 KiB), and nginx with"
                " `proxy_buffer_size 256k` (persistproxy's read size); persistproxy"
                ' `protocol = "tcp"` with its access log on.'
            ),
            "",
            *[f"**{why.splitlines()[0]}**\n" for why in self.failures.values()],
            b.markdown_table(
                ["connections", "target", "GiB/s", "proxy CPU s/GiB", "notes"], rows
            ),
            "",
            "## Ratios (medians)",
            "",
            b.markdown_table(["ratio", "value"], ratios),
            "",
            "## Raw runs",
            "",
            b.markdown_table(
                [
                    "target",
                    "connections",
                    "round",
                    "bytes",
                    "wall s",
                    "GiB/s",
                    "proxy CPU s",
                    "CPU s/GiB",
                    "errors",
                ],
                raw,
            ),
            "",
            "## Environment",
            "",
            *b.environment_lines(a.twistd),
            "",
        ]
        if self.failures:
            lines += ["## Failures", ""]
            for target, why in self.failures.items():
                lines += [f"### {target}", "", "```", why.strip(), "```", ""]
        return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--twistd", type=Path, default=b.REPO_DIR / ".venv" / "bin" / "twistd")
    p.add_argument("--rounds", type=int, default=b.env_int("ROUNDS", 3))
    p.add_argument("--bytes", type=int, default=b.env_int("TCP_BYTES", GIB))
    p.add_argument("--parallel", default=os.environ.get("TCP_PARALLEL") or "1,50")
    p.add_argument("--targets", default=os.environ.get("TCP_TARGETS") or ",".join(ALL_TARGETS))
    args = p.parse_args(argv)
    try:
        args.parallel = [int(x) for x in args.parallel.split(",") if x.strip()]
    except ValueError:
        p.error(f"TCP_PARALLEL: a comma list of integers, got {args.parallel!r}")
    args.targets = [x.strip() for x in args.targets.split(",") if x.strip()]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad or not args.targets:
        p.error(f"TCP_TARGETS: choose from {ALL_TARGETS}, got {args.targets}")
    if args.rounds < 1 or args.bytes < 1 or not args.parallel or min(args.parallel) < 1:
        p.error("ROUNDS, TCP_BYTES and TCP_PARALLEL must be >= 1")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["--client"]:
        print(json.dumps(client(int(argv[1]), int(argv[2]), int(argv[3]))))
        return 0
    args = parse_args(argv)
    b.install_signal_handlers()
    bench = TcpBench(args)
    try:
        return bench.main()
    finally:
        bench.procs.stop_all()
        b.remove_workdir(bench.workdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
