"""Throughput benchmark: wrk → {nothing, persistproxy, nginx, haproxy} → nginx origin.

Each scenario is started fresh in every round (rounds interleave the scenarios), the proxy pinned
to one CPU (PROXY_CPU, default 0) and the origin to another (ORIGIN_CPU, default 1). Per run it
records wrk's requests/s and p99 latency, the proxy's CPU time per request (utime+stime of its
processes from /proc, delta over the run / requests completed) and upstream connections per
request (delta of the origin's stub_status `accepts` / requests). The report gives medians over
the rounds, ratios against the other proxies, and every raw run.

Usually started by bench/run.sh, which installs the tools and the venv first.
Environment: DURATION (s, 10), ROUNDS (3), CONNECTIONS (50), THREADS (2), SCENARIOS (comma list,
default all), WRK_CPUS (pin wrk, default unpinned), PROXY_CPU (0), ORIGIN_CPU (1).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import benchlib as b

ALL_SCENARIOS = [
    "direct",
    "persistproxy",
    "persistproxy+accesslog",
    "nginx-proxy",
    "haproxy",
]

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


@dataclass
class WrkResult:
    requests: int
    rps: float
    p99_ms: float | None
    errors: str  # "" when wrk saw no socket errors and no non-2xx/3xx


@dataclass
class Run:
    scenario: str
    round: int
    wrk: WrkResult | None = None
    proxy_cpu_us: float | None = None  # per request
    origin_cpu_us: float | None = None  # per request
    upstream_conns: float | None = None  # per request
    accepts: int | None = None
    error: str = ""


def parse_wrk(text: str) -> WrkResult:
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(\w+)", text, re.MULTILINE)
    if not m:
        raise b.BenchError(f"cannot parse wrk output:\n{text}")
    requests = int(m.group(1))
    m = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.MULTILINE)
    rps = float(m.group(1)) if m else 0.0
    p99 = None
    m = re.search(r"^\s*99(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    if m:
        p99 = float(m.group(1)) * _UNITS[m.group(2)]
    errors = []
    m = re.search(r"Socket errors: (.*)$", text, re.MULTILINE)
    if m:
        errors.append("socket errors: " + m.group(1).strip())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors.append(f"non-2xx/3xx: {m.group(1)}")
    return WrkResult(requests, rps, p99, "; ".join(errors))


def run_wrk(port: int, duration: int, connections: int, threads: int) -> WrkResult:
    wrk = shutil.which("wrk") or "wrk"
    argv = [
        *b.taskset(os.environ.get("WRK_CPUS") or None),
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        f"http://127.0.0.1:{port}/",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if out.returncode != 0:
        raise b.BenchError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    return parse_wrk(out.stdout)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.twistd: Path = args.twistd
        self.procs = b.Processes()
        self.workdir = b.make_workdir("rps")
        self.origin: b.Server | None = None
        self.broken: dict[str, str] = {}  # scenario -> why it is skipped from now on
        self.runs: list[Run] = []

    # ---------------------------------------------------------------- proxies

    def _start_persistproxy(self, tag: str, access_log: bool) -> b.Server:
        assert self.origin is not None
        problem = b.persistproxy_problem(self.twistd)
        if problem:
            raise b.BenchError(problem)
        port = b.free_port()
        d = self.workdir / tag
        d.mkdir(exist_ok=True)
        conf = d / "persistproxy.toml"
        b.write_persistproxy(conf, port, self.origin.port, access_log=access_log)
        server = self.procs.spawn(
            tag,
            b.twistd_argv(self.twistd, conf, b.PROXY_CPU),
            port,
            d / "stdout.log",
            d,
            env=b.twistd_env(),
        )
        b.wait_ready(server)
        return server

    def _start_nginx(self, tag: str) -> b.Server:
        assert self.origin is not None
        port = b.free_port()
        prefix = self.workdir / tag
        b.write_proxy_nginx(prefix, port, self.origin.port)
        server = self.procs.spawn(
            tag,
            b.nginx_argv(prefix, b.PROXY_CPU),
            port,
            prefix / "stdout.log",
            prefix,
            workers_only=True,
        )
        b.wait_ready(server)
        return server

    def _start_haproxy(self, tag: str) -> b.Server:
        assert self.origin is not None
        port = b.free_port()
        d = self.workdir / tag
        d.mkdir(exist_ok=True)
        conf = d / "haproxy.cfg"
        b.write_haproxy(conf, port, self.origin.port)
        server = self.procs.spawn(tag, b.haproxy_argv(conf, b.PROXY_CPU), port, d / "stdout.log", d)
        b.wait_ready(server)
        return server

    def starter(self, scenario: str) -> Callable[[], b.Server] | None:
        return {
            "direct": None,
            "persistproxy": lambda: self._start_persistproxy("persistproxy", False),
            "persistproxy+accesslog": lambda: self._start_persistproxy(
                "persistproxy-accesslog", True
            ),
            "nginx-proxy": lambda: self._start_nginx("nginx-proxy"),
            "haproxy": lambda: self._start_haproxy("haproxy"),
        }[scenario]

    # ---------------------------------------------------------------- one run

    def run_one(self, scenario: str, rnd: int) -> Run:
        assert self.origin is not None
        run = Run(scenario, rnd)
        start = self.starter(scenario)
        server: b.Server | None = None
        try:
            if start is not None:
                try:
                    server = start()
                except b.BenchError as e:
                    hint = b.persistproxy_hint() if scenario.startswith("persistproxy") else ""
                    self.broken[scenario] = f"did not start{hint}: {e}"
                    raise b.BenchError(self.broken[scenario]) from e
            port = server.port if server else self.origin.port
            body = b.http_get(port, "/")
            if len(body) != b.BODY_SIZE:
                raise b.BenchError(f"GET / returned {len(body)} bytes, expected {b.BODY_SIZE}")
            time.sleep(0.2)
            accepts0 = b.origin_accepts(self.origin.port)
            origin0 = self.origin.cpu_ticks()
            cpu0 = server.cpu_ticks() if server else 0
            run.wrk = run_wrk(port, self.args.duration, self.args.connections, self.args.threads)
            cpu1 = server.cpu_ticks() if server else 0
            origin1 = self.origin.cpu_ticks()
            # -1: the stub_status request of this second reading opened a connection too.
            run.accepts = b.origin_accepts(self.origin.port) - accepts0 - 1
            if server is not None and not server.alive():
                raise b.BenchError(f"{scenario} died during the run; log:\n{server.log_tail()}")
            n = run.wrk.requests
            if n > 0:
                us_per_tick = 1e6 / b.CLK_TCK
                if server is not None:
                    run.proxy_cpu_us = (cpu1 - cpu0) * us_per_tick / n
                run.origin_cpu_us = (origin1 - origin0) * us_per_tick / n
                run.upstream_conns = run.accepts / n
            if run.wrk.errors:
                run.error = run.wrk.errors
        except (b.BenchError, OSError, subprocess.SubprocessError) as e:
            run.error = str(e).strip()
            b.log(f"  {scenario} round {rnd}: FAILED — {b.summary(run.error)}")
        finally:
            if server is not None:
                self.procs.stop(server)
        return run

    # ---------------------------------------------------------------- the whole thing

    def main(self) -> int:
        scenarios = self.args.scenarios
        b.log(f"work dir {self.workdir}")
        problem = b.persistproxy_problem(self.twistd)
        if problem:
            for s in scenarios:
                if s.startswith("persistproxy"):
                    self.broken[s] = problem
                    b.log(f"{s}: SKIPPED — {problem}")
        self.origin = b.start_origin(self.procs, self.workdir)
        rounds = self.args.rounds
        for rnd in range(1, rounds + 1):
            # Rotate the order each round so no scenario always runs first or last.
            k = (rnd - 1) % len(scenarios)
            for scenario in scenarios[k:] + scenarios[:k]:
                if scenario in self.broken:
                    continue
                b.log(f"round {rnd}/{rounds}: {scenario} ({self.args.duration}s)")
                run = self.run_one(scenario, rnd)
                self.runs.append(run)
                if run.wrk:
                    b.log(
                        f"  {run.wrk.rps:,.0f} req/s, p99 {b.fmt(run.wrk.p99_ms, 2)} ms,"
                        f" proxy CPU {b.fmt(run.proxy_cpu_us)} µs/req,"
                        f" upstream conns/req {b.fmt(run.upstream_conns, 5)}"
                    )
        report = self.report(scenarios)
        print(report)
        path = b.save_report("", report)
        b.log(f"saved {path}")
        return 0

    def report(self, scenarios: list[str]) -> str:
        a = self.args
        med: dict[str, dict[str, float | None]] = {}
        rows = []
        for s in scenarios:
            runs = [r for r in self.runs if r.scenario == s and r.wrk and r.wrk.requests > 0]
            m = {
                "rps": b.median([r.wrk.rps for r in runs if r.wrk]),
                "p99": b.median([r.wrk.p99_ms for r in runs if r.wrk]),
                "cpu": b.median([r.proxy_cpu_us for r in runs]),
                "conns": b.median([r.upstream_conns for r in runs]),
            }
            med[s] = m
            failed = [r for r in self.runs if r.scenario == s and r.error]
            if s in self.broken and not runs:
                note = "FAILED: " + b.summary(self.broken[s])
            elif failed:
                note = f"{len(failed)} run(s) with errors (see raw runs)"
            else:
                note = ""
            rows.append(
                [
                    s,
                    b.fmt(m["rps"], 0),
                    b.fmt(m["p99"], 2),
                    b.fmt(m["cpu"], 1) if s != "direct" else "n/a",
                    b.fmt(m["conns"], 5),
                    str(len(runs)),
                    note,
                ]
            )
        pp = med.get("persistproxy", {})
        ratios = [
            (
                "persistproxy / direct, req/s",
                b.ratio(pp.get("rps"), med.get("direct", {}).get("rps")),
            ),
            (
                "persistproxy / nginx-proxy, req/s",
                b.ratio(pp.get("rps"), med.get("nginx-proxy", {}).get("rps")),
            ),
            (
                "persistproxy / haproxy, req/s",
                b.ratio(pp.get("rps"), med.get("haproxy", {}).get("rps")),
            ),
            (
                "persistproxy / nginx-proxy, CPU µs per request",
                b.ratio(pp.get("cpu"), med.get("nginx-proxy", {}).get("cpu")),
            ),
            (
                "persistproxy / haproxy, CPU µs per request",
                b.ratio(pp.get("cpu"), med.get("haproxy", {}).get("cpu")),
            ),
            (
                "persistproxy+accesslog / persistproxy, CPU µs per request",
                b.ratio(med.get("persistproxy+accesslog", {}).get("cpu"), pp.get("cpu")),
            ),
        ]
        wrk_cpus = os.environ.get("WRK_CPUS")
        wrk_cpu = f"on CPU {wrk_cpus}" if wrk_cpus else "unpinned"
        raw_rows = []
        for r in self.runs:
            w = r.wrk
            raw_rows.append(
                [
                    r.scenario,
                    str(r.round),
                    str(w.requests) if w else "—",
                    b.fmt(w.rps if w else None, 0),
                    b.fmt(w.p99_ms if w else None, 2),
                    b.fmt(r.proxy_cpu_us, 2),
                    b.fmt(r.origin_cpu_us, 2),
                    str(r.accepts) if r.accepts is not None else "—",
                    b.fmt(r.upstream_conns, 6),
                    b.summary(r.error) or "",
                ]
            )
        parts = [
            "# persistproxy throughput benchmark",
            "",
            (
                f"wrk -t{a.threads} -c{a.connections} -d{a.duration}s --latency, keep-alive,"
                f" 1 KiB body; {a.rounds} interleaved round(s), medians shown. Proxy on CPU"
                f" {b.PROXY_CPU}, origin nginx (1 worker) on CPU {b.ORIGIN_CPU}, wrk {wrk_cpu}."
            ),
            "",
            b.markdown_table(
                [
                    "scenario",
                    "req/s",
                    "p99 ms",
                    "proxy CPU µs/req",
                    "upstream conns/req",
                    "runs",
                    "notes",
                ],
                rows,
            ),
            "",
            "## Ratios (medians)",
            "",
            b.markdown_table(["ratio", "value"], [[k, v] for k, v in ratios]),
            "",
            "## Raw runs",
            "",
            b.markdown_table(
                [
                    "scenario",
                    "round",
                    "requests",
                    "req/s",
                    "p99 ms",
                    "proxy CPU µs/req",
                    "origin CPU µs/req",
                    "origin accepts",
                    "upstream conns/req",
                    "errors",
                ],
                raw_rows,
            ),
            "",
            "## Environment",
            "",
            *b.environment_lines(self.twistd),
            "",
        ]
        if self.broken:
            parts += ["## Failures", ""]
            for s, why in self.broken.items():
                parts += [f"### {s}", "", "```", why.strip(), "```", ""]
        return "\n".join(parts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--twistd", type=Path, default=b.REPO_DIR / ".venv" / "bin" / "twistd")
    p.add_argument("--duration", type=int, default=b.env_int("DURATION", 10))
    p.add_argument("--rounds", type=int, default=b.env_int("ROUNDS", 3))
    p.add_argument("--connections", type=int, default=b.env_int("CONNECTIONS", 50))
    p.add_argument("--threads", type=int, default=b.env_int("THREADS", 2))
    p.add_argument(
        "--scenarios",
        default=os.environ.get("SCENARIOS") or ",".join(ALL_SCENARIOS),
        help=f"comma-separated subset of {','.join(ALL_SCENARIOS)}",
    )
    args = p.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in ALL_SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {ALL_SCENARIOS}")
    args.scenarios = scenarios
    if args.rounds < 1 or args.duration < 1:
        p.error("ROUNDS and DURATION must be >= 1")
    args.threads = min(args.threads, args.connections)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    b.install_signal_handlers()
    bench = Bench(args)
    try:
        return bench.main()
    finally:
        bench.procs.stop_all()
        b.remove_workdir(bench.workdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
