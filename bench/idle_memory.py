"""Memory per idle keep-alive client connection: persistproxy vs nginx (and haproxy).

For each server: start it in front of an nginx origin, warm it up, read its RSS (VmRSS of
/proc/<pid>/status; nginx: its worker), then open IDLE_CONNECTIONS client connections, send one
complete `GET / HTTP/1.1` on each and read the whole response — so every connection is a real
kept-alive idle connection, not a half-open one — let it settle, read the RSS again and report
(after - before) / connections still open, in KiB.

Usually started by `bash bench/run.sh idle`. Environment: IDLE_CONNECTIONS (10000),
IDLE_TARGETS (persistproxy,nginx-proxy,haproxy), IDLE_CONCURRENCY (256 connections being set up
at once), IDLE_TIMEOUT (s per server, 180), IDLE_SETTLE (s, 2), PROXY_CPU (0), ORIGIN_CPU (1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib as b

ALL_TARGETS = ["persistproxy", "nginx-proxy", "haproxy"]
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Result:
    target: str
    wanted: int
    opened: int = 0
    still_open: int = 0
    rss_before: int | None = None
    rss_after: int | None = None
    seconds: float | None = None
    error: str = ""

    @property
    def kib_per_conn(self) -> float | None:
        if self.rss_before is None or self.rss_after is None or self.still_open == 0:
            return None
        return (self.rss_after - self.rss_before) / self.still_open


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one complete HTTP/1.1 response; return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip().lower()
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                break
            await reader.readexactly(size + 2)
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    return status


async def open_one(port: int, sem: asyncio.Semaphore) -> Conn:
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(REQUEST)
            status = await read_response(reader)
            if status != 200:
                raise b.BenchError(f"status {status}")
        except BaseException:
            writer.close()
            raise
        return reader, writer


async def open_idle(port: int, n: int, concurrency: int, timeout: float) -> tuple[list[Conn], str]:
    sem = asyncio.Semaphore(concurrency)
    tasks = [asyncio.ensure_future(open_one(port, sem)) for _ in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    conns: list[Conn] = []
    errors: dict[str, int] = {}
    for t in done:
        exc = t.exception()
        if exc is None:
            conns.append(t.result())
        else:
            key = f"{type(exc).__name__}: {exc}"[:100]
            errors[key] = errors.get(key, 0) + 1
    problems = [f"{count} x {what}" for what, count in sorted(errors.items(), key=lambda x: -x[1])]
    if pending:
        problems.insert(0, f"{len(pending)} not set up within {timeout:.0f}s")
    return conns, "; ".join(problems[:4])


async def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()
    await asyncio.sleep(0)


async def warm_up(port: int) -> None:
    """A few requests first, so lazily-initialised state does not count as per-connection."""
    sem = asyncio.Semaphore(8)
    conns = await asyncio.gather(*(open_one(port, sem) for _ in range(16)))
    for reader, writer in conns:
        for _ in range(4):
            writer.write(REQUEST)
            await read_response(reader)
    await close_all(list(conns))


class IdleBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = b.Processes()
        self.workdir = b.make_workdir("idle")
        self.origin: b.Server | None = None
        n = args.connections
        self.server_nofile = 2 * n + 4096
        self.worker_connections = n + 2048

    def start(self, target: str) -> b.Server:
        assert self.origin is not None
        port = b.free_port()
        d = self.workdir / target
        d.mkdir(exist_ok=True)
        if target == "persistproxy":
            problem = b.persistproxy_problem(self.args.twistd)
            if problem:
                raise b.BenchError(problem)
            conf = d / "persistproxy.toml"
            b.write_persistproxy(
                conf,
                port,
                self.origin.port,
                keepalive_timeout=300,
                max_connections=self.args.connections + 1000,
            )
            argv = b.twistd_argv(self.args.twistd, conf, b.PROXY_CPU, self.server_nofile)
            server = self.procs.spawn(target, argv, port, d / "stdout.log", d, env=b.twistd_env())
        elif target == "nginx-proxy":
            b.write_proxy_nginx(
                d, port, self.origin.port, self.worker_connections, self.server_nofile
            )
            argv = b.nginx_argv(d, b.PROXY_CPU, self.server_nofile)
            server = self.procs.spawn(target, argv, port, d / "stdout.log", d, workers_only=True)
        elif target == "haproxy":
            conf = d / "haproxy.cfg"
            b.write_haproxy(conf, port, self.origin.port, maxconn=self.worker_connections)
            argv = b.haproxy_argv(conf, b.PROXY_CPU, self.server_nofile)
            server = self.procs.spawn(target, argv, port, d / "stdout.log", d)
        else:
            raise ValueError(target)
        try:
            b.wait_ready(server)
        except b.BenchError as e:
            hint = b.persistproxy_hint() if target == "persistproxy" else ""
            raise b.BenchError(f"did not start{hint}: {e}") from e
        return server

    def measure(self, target: str) -> Result:
        a = self.args
        res = Result(target, a.connections)
        server: b.Server | None = None
        try:
            server = self.start(target)
            asyncio.run(warm_up(server.port))
            time.sleep(a.settle)
            res.rss_before = server.rss_kib()
            b.log(f"{target}: RSS {res.rss_before} KiB; opening {a.connections} connections")
            t0 = time.monotonic()
            res.rss_after, res.opened, res.still_open, res.error = asyncio.run(
                self._hold(server, a.connections)
            )
            res.seconds = time.monotonic() - t0
            if not server.alive():
                raise b.BenchError(f"{target} died; log:\n{server.log_tail()}")
            b.log(
                f"{target}: {res.still_open}/{a.connections} idle connections open,"
                f" RSS {res.rss_after} KiB → {b.fmt(res.kib_per_conn, 2)} KiB/connection"
                + (f" ({res.error})" if res.error else "")
            )
        except (b.BenchError, OSError) as e:
            res.error = str(e).strip()
            b.log(f"{target}: FAILED — {b.summary(res.error)}")
        finally:
            if server is not None:
                self.procs.stop(server)
        return res

    async def _hold(self, server: b.Server, n: int) -> tuple[int, int, int, str]:
        conns, problems = await open_idle(server.port, n, self.args.concurrency, self.args.timeout)
        try:
            await asyncio.sleep(self.args.settle)
            still_open = sum(1 for reader, _ in conns if not reader.at_eof())
            rss = server.rss_kib()
            return rss, len(conns), still_open, problems
        finally:
            await close_all(conns)

    def main(self) -> int:
        a = self.args
        # Raise our own limit (children inherit it; the hard one too when we may) for the clients
        # and, through prlimit, for the servers.
        limit = b.raise_nofile(max(a.connections + 1024, self.server_nofile))
        if limit < a.connections + 1024:
            b.log(
                f"WARNING: only {limit} file descriptors (hard limit, no CAP_SYS_RESOURCE) for"
                f" {a.connections} connections: some will fail"
            )
        b.log(f"work dir {self.workdir}; RLIMIT_NOFILE {limit}")
        self.origin = b.start_origin(self.procs, self.workdir)
        results = [self.measure(t) for t in a.targets]
        report = self.report(results)
        print(report)
        b.log(f"saved {b.save_report('idle', report)}")
        return 0

    def report(self, results: list[Result]) -> str:
        a = self.args
        rows = [
            [
                r.target,
                f"{r.still_open}/{r.wanted}",
                b.fmt(r.rss_before, 0),
                b.fmt(r.rss_after, 0),
                b.fmt(r.kib_per_conn, 2),
                b.fmt(r.seconds, 1),
                b.summary(r.error),
            ]
            for r in results
        ]
        per = {r.target: r.kib_per_conn for r in results}
        lines = [
            "# persistproxy idle keep-alive connection memory",
            "",
            (
                f"{a.connections} client connections, each after one complete `GET /` and its"
                f" response, held idle {a.settle:g}s; server RSS (VmRSS; nginx: worker) before and"
                f" after. Server on CPU {b.PROXY_CPU}, origin nginx on CPU {b.ORIGIN_CPU}."
            ),
            "",
            b.markdown_table(
                [
                    "server",
                    "idle conns open",
                    "RSS before KiB",
                    "RSS after KiB",
                    "KiB per idle conn",
                    "setup s",
                    "errors",
                ],
                rows,
            ),
            "",
            (
                f"- persistproxy / nginx-proxy, KiB per idle connection:"
                f" {b.ratio(per.get('persistproxy'), per.get('nginx-proxy'))}"
            ),
            (
                f"- persistproxy / haproxy, KiB per idle connection:"
                f" {b.ratio(per.get('persistproxy'), per.get('haproxy'))}"
            ),
            "",
            "## Environment",
            "",
            *b.environment_lines(a.twistd),
            "",
        ]
        failed = [r for r in results if r.error]
        if failed:
            lines += ["## Errors", ""]
            for r in failed:
                lines += [f"### {r.target}", "", "```", r.error, "```", ""]
        return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--twistd", type=Path, default=b.REPO_DIR / ".venv" / "bin" / "twistd")
    p.add_argument("--connections", type=int, default=b.env_int("IDLE_CONNECTIONS", 10000))
    p.add_argument("--concurrency", type=int, default=b.env_int("IDLE_CONCURRENCY", 256))
    p.add_argument("--timeout", type=float, default=float(b.env_int("IDLE_TIMEOUT", 180)))
    p.add_argument("--settle", type=float, default=float(b.env_int("IDLE_SETTLE", 2)))
    p.add_argument(
        "--targets",
        default=os.environ.get("IDLE_TARGETS") or ",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}",
    )
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; choose from {ALL_TARGETS}")
    if args.connections < 1:
        p.error("IDLE_CONNECTIONS must be >= 1")
    args.targets = targets
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    b.install_signal_handlers()
    bench = IdleBench(args)
    try:
        return bench.main()
    finally:
        bench.procs.stop_all()
        b.remove_workdir(bench.workdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
