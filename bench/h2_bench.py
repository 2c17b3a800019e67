"""HTTP/2 over TLS: persistproxy vs nginx's `http2` listener, same origin, same run.

`h2load -c10 -m10 -D DURATION https://127.0.0.1:PORT/` (10 connections, 10 concurrent streams
each) against:

- nginx-h2: nginx, 1 worker, `listen ... ssl http2`, `keepalive_requests 100000000`, proxying
  with `upstream { keepalive 64; }` as in the throughput benchmark;
- persistproxy-h2: a TLS listener with `alpn = ["h2", "http/1.1"]` and `max_requests = 0`;
- persistproxy-https1.1: the same listener spoken to with `h2load --h1 -c100 -m1`: HTTPS/1.1
  keep-alive with the same 100 requests in flight.

Per run: req/s, failed requests, the server's CPU µs per request (utime+stime from /proc; nginx:
its worker) and upstream connections opened per request (the origin's stub_status `accepts`).
Same self-signed P-256 certificate for both servers; origin nginx on ORIGIN_CPU, server under
test on PROXY_CPU, h2load on H2_CLIENT_CPU (default unpinned).

Usually started by `bash bench/run.sh h2`. Environment: DURATION (10), ROUNDS (3),
H2_TARGETS (nginx-h2,persistproxy-h2,persistproxy-https1.1), H2_CLIENT_CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib as b
from tls_bench import make_cert

ALL_TARGETS = ["nginx-h2", "persistproxy-h2", "persistproxy-https1.1"]


@dataclass
class Run:
    target: str
    round: int
    requests: int = 0
    failed: int = 0
    seconds: float = 0.0
    rate: float | None = None
    cpu_us: float | None = None
    upstream_per_request: float | None = None
    error: str = ""


def h2load(server: b.Server, target: str, rnd: int, duration: int, origin: b.Server) -> Run:
    res = Run(target, rnd)
    shape = ["--h1", "-c100", "-m1"] if target.endswith("https1.1") else ["-c10", "-m10"]
    argv = [
        *b.taskset(os.environ.get("H2_CLIENT_CPU") or None),
        shutil.which("h2load") or "h2load",
        *shape,
        "-D",
        str(duration),
        f"https://127.0.0.1:{server.port}/",
    ]
    accepts0 = b.origin_accepts(origin.port)
    cpu0 = server.cpu_ticks()
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + 60, check=False
        )
    except subprocess.TimeoutExpired:
        res.error = "h2load timed out"
        return res
    res.seconds = time.monotonic() - t0
    cpu1 = server.cpu_ticks()
    accepts1 = b.origin_accepts(origin.port)
    text = out.stdout
    done = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", text
    )
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    if done and rate:
        res.requests = int(done.group(2))
        res.failed = int(done.group(3))
        res.rate = float(rate.group(1))
    if res.requests:
        res.cpu_us = (cpu1 - cpu0) * 1e6 / b.CLK_TCK / res.requests
        res.upstream_per_request = max(accepts1 - accepts0 - 1, 0) / res.requests
    if out.returncode != 0 or not res.requests:
        err = (out.stderr.strip() or text.strip()).splitlines()
        res.error = f"h2load exit {out.returncode}: " + " | ".join(err[-4:])
    if not server.alive():
        res.error = f"{server.name} died: {server.log_tail(5)}"
    return res


class H2Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = b.Processes()
        self.workdir = b.make_workdir("h2")
        self.failures: dict[str, str] = {}

    def start_nginx(self, origin: b.Server, tls: tuple[Path, Path]) -> b.Server:
        port = b.free_port()
        prefix = self.workdir / "nginx"
        b.write_proxy_nginx(prefix, port, origin.port, tls=tls, http2=True)
        server = self.procs.spawn(
            "nginx-h2",
            b.nginx_argv(prefix, b.PROXY_CPU),
            port,
            prefix / "stdout.log",
            prefix,
            workers_only=True,
        )
        b.wait_ready(server)
        return server

    def start_persistproxy(self, origin: b.Server, tls: tuple[Path, Path]) -> b.Server:
        problem = b.persistproxy_problem(self.args.twistd)
        if problem:
            raise b.BenchError(problem)
        port = b.free_port()
        d = self.workdir / "persistproxy"
        d.mkdir()
        conf = d / "persistproxy.toml"
        b.write_persistproxy(
            conf, port, origin.port, tls=tls, alpn=["h2", "http/1.1"], max_requests=0
        )
        server = self.procs.spawn(
            "persistproxy",
            b.twistd_argv(self.args.twistd, conf, b.PROXY_CPU),
            port,
            d / "stdout.log",
            d,
            env=b.twistd_env(),
        )
        b.wait_ready(server)
        return server

    def main(self) -> int:
        a = self.args
        b.log(f"work dir {self.workdir}")
        tls = make_cert(self.workdir)
        origin = b.start_origin(self.procs, self.workdir)
        servers: dict[str, b.Server] = {}
        for name, start in (("nginx", self.start_nginx), ("persistproxy", self.start_persistproxy)):
            if not any(t.startswith(name) for t in a.targets):
                continue
            try:
                servers[name] = start(origin, tls)
                b.log(f"{name}: TLS listener on 127.0.0.1:{servers[name].port}")
            except b.BenchError as e:
                self.failures[name] = f"{name} FAILED: {e}"
                b.log(self.failures[name])
        runs: list[Run] = []
        for rnd in range(1, a.rounds + 1):
            order = a.targets if rnd % 2 else list(reversed(a.targets))
            for target in order:
                server = servers.get(target.split("-")[0])
                if server is None:
                    continue
                b.log(f"round {rnd}/{a.rounds}: {target}")
                r = h2load(server, target, rnd, a.duration, origin)
                runs.append(r)
                b.log(
                    f"  {b.fmt(r.rate, 0)} req/s, {r.failed} failed, server CPU"
                    f" {b.fmt(r.cpu_us, 0)} µs/request, upstream conns/request"
                    f" {b.fmt(r.upstream_per_request, 4)}"
                    + (f" — ERROR {r.error}" if r.error else "")
                )
        report = self.report(runs)
        print(report)
        b.log(f"saved {b.save_report('h2', report)}")
        return 0

    def report(self, runs: list[Run]) -> str:
        a = self.args

        def med(target: str, attr: str) -> float | None:
            return b.median([getattr(r, attr) for r in runs if r.target == target and not r.error])

        rows = [
            [
                target,
                b.fmt(med(target, "rate"), 0),
                str(sum(r.failed for r in runs if r.target == target)),
                b.fmt(med(target, "cpu_us"), 0),
                b.fmt(med(target, "upstream_per_request"), 4),
            ]
            for target in a.targets
        ]
        ratios = [
            [
                "persistproxy-h2 / nginx-h2, req/s",
                b.ratio(med("persistproxy-h2", "rate"), med("nginx-h2", "rate")),
            ],
            [
                "persistproxy-h2 / nginx-h2, CPU µs/request",
                b.ratio(med("persistproxy-h2", "cpu_us"), med("nginx-h2", "cpu_us")),
            ],
            [
                "persistproxy h2 / its HTTPS/1.1 (100 in flight), req/s",
                b.ratio(med("persistproxy-h2", "rate"), med("persistproxy-https1.1", "rate")),
            ],
            [
                "persistproxy h2 / its HTTPS/1.1, CPU µs/request",
                b.ratio(med("persistproxy-h2", "cpu_us"), med("persistproxy-https1.1", "cpu_us")),
            ],
        ]
        raw = [
            [
                r.target,
                str(r.round),
                str(r.requests),
                str(r.failed),
                b.fmt(r.rate, 0),
                b.fmt(r.cpu_us, 0),
                b.fmt(r.upstream_per_request, 4),
                b.summary(r.error),
            ]
            for r in runs
        ]
        lines = [
            "# persistproxy HTTP/2 benchmark",
            "",
            (
                f"`h2load -c10 -m10 -D {a.duration}` over TLS (and `--h1 -c100 -m1` for"
                f" HTTPS/1.1), {a.rounds} round(s), medians shown. Server on CPU {b.PROXY_CPU},"
                f" origin nginx on CPU {b.ORIGIN_CPU}, h2load on CPU"
                f" {os.environ.get('H2_CLIENT_CPU') or 'any'}."
            ),
            "",
            *[f"**{why.splitlines()[0]}**\n" for why in self.failures.values()],
            b.markdown_table(
                ["target", "req/s", "failed", "server CPU µs/request", "upstream conns/request"],
                rows,
            ),
            "",
            "## Ratios (medians)",
            "",
            b.markdown_table(["ratio", "value"], ratios),
            "",
            "## Raw runs",
            "",
            b.markdown_table(
                ["target", "round", "requests", "failed", "req/s", "CPU µs/req", "upstream/req",
                 "errors"],
                raw,
            ),
            "",
            "## Environment",
            "",
            *b.environment_lines(a.twistd),
            f"- h2load: {b._cmd_version(['h2load', '--version'])}",
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
    p.add_argument("--duration", type=int, default=b.env_int("DURATION", 10))
    p.add_argument("--rounds", type=int, default=b.env_int("ROUNDS", 3))
    p.add_argument("--targets", default=os.environ.get("H2_TARGETS") or ",".join(ALL_TARGETS))
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad or not args.targets:
        p.error(f"H2_TARGETS: choose from {ALL_TARGETS}, got {bad or args.targets}")
    if args.duration < 2 or args.rounds < 1:
        p.error("DURATION must be >= 2 and ROUNDS >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    b.install_signal_handlers()
    bench = H2Bench(args)
    try:
        return bench.main()
    finally:
        bench.procs.stop_all()
        b.remove_workdir(bench.workdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
