"""Redis: redis-benchmark -> {nothing, persistproxy `protocol = "redis"`, twemproxy} ->
redis-server, same machine, same run.

redis-server (no persistence) runs pinned to ORIGIN_CPU for the whole run; each proxy is started
fresh for every run, pinned to PROXY_CPU; redis-benchmark (`-P 16 -c 50` by default, the
`REDIS_TESTS` commands, `--csv`) runs pinned to CLIENT_CPU. The rounds interleave the targets.
Per run: requests/s of each test (redis-benchmark's figure), the proxy's CPU time per request
(utime+stime from /proc over the whole benchmark / requests) and the server connections opened
(delta of redis' `total_connections_received`). The report gives medians over the rounds and
persistproxy's ratios to the direct run and to twemproxy.

twemproxy is Debian's `nutcracker` with its defaults: one server connection, which every client's
commands are pipelined onto (`server_connections: 1`). persistproxy lends pooled connections per
command burst instead (a burst keeps its connection until answered), so it opens as many as
bursts were in flight at once.

Usually started by `bash bench/run.sh redis`. Environment: REDIS_REQUESTS (-n, 200000),
REDIS_CLIENTS (-c, 50), REDIS_PIPELINE (-P, 16), REDIS_TESTS (-t, comma list,
"set,get,incr,lpush,lpop,sadd,hset,mset"), REDIS_TARGETS (direct, persistproxy, nutcracker),
ROUNDS (3), PROXY_CPU (0), ORIGIN_CPU (1), CLIENT_CPU (1).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib as b

ALL_TARGETS = ["direct", "persistproxy", "nutcracker"]
DEFAULT_TESTS = "set,get,incr,lpush,lpop,sadd,hset,mset"
CLIENT_CPU = os.environ.get("CLIENT_CPU", "1")


@dataclass
class Run:
    target: str
    round: int
    rps: dict[str, float] = field(default_factory=dict)  # per test
    requests: int = 0
    seconds: float = 0.0  # sum over the tests of requests / rps
    cpu_s: float | None = None
    server_connections: int | None = None
    error: str = ""

    @property
    def overall_rps(self) -> float | None:
        return self.requests / self.seconds if self.requests and self.seconds else None

    @property
    def cpu_us(self) -> float | None:
        if self.cpu_s is None or not self.requests:
            return None
        return self.cpu_s / self.requests * 1e6


def tool(name: str) -> str:
    return shutil.which(name) or f"/usr/bin/{name}"


def redis_stat(port: int, field_name: str) -> int:
    out = subprocess.run(
        [tool("redis-cli"), "-h", "127.0.0.1", "-p", str(port), "INFO", "stats"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    for line in out.stdout.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split(":", 1)[1])
    raise b.BenchError(f"no {field_name} in INFO stats: {out.stdout[:200]!r}")


def write_nutcracker(path: Path, port: int, redis_port: int) -> None:
    path.write_text(
        f"""bench:
  listen: 127.0.0.1:{port}
  hash: fnv1a_64
  distribution: ketama
  redis: true
  auto_eject_hosts: false
  servers:
   - 127.0.0.1:{redis_port}:1
"""
    )


def write_persistproxy_redis(path: Path, port: int, redis_port: int) -> None:
    path.write_text(
        f"""[[listener]]
name = "redis"
bind = "tcp:{port}:interface=127.0.0.1"
protocol = "redis"
upstream = "redis"

[[upstream]]
name = "redis"
servers = ["127.0.0.1:{redis_port}"]
"""
    )


class RedisBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = b.Processes()
        self.workdir = b.make_workdir("redis")
        self.failures: dict[str, str] = {}

    def start_redis(self) -> b.Server:
        d = self.workdir / "redis"
        d.mkdir()
        port = b.free_port()
        argv = [
            *b.taskset(b.ORIGIN_CPU),
            tool("redis-server"),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(d),
            "--maxclients", "4000",
        ]  # fmt: skip
        server = self.procs.spawn("redis-server", argv, port, d / "stdout.log", d)
        b.wait_ready(server)
        return server

    def start(self, target: str, redis: b.Server, tag: str) -> b.Server | None:
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
            write_persistproxy_redis(conf, port, redis.port)
            server = self.procs.spawn(
                target,
                b.twistd_argv(self.args.twistd, conf, b.PROXY_CPU),
                port,
                d / "stdout.log",
                d,
                env=b.twistd_env(),
            )
            # Without the plugin installed (make venv does it) twistd exits with
            # "unknown protocol 'redis'", which wait_ready reports with the log's tail.
            b.wait_ready(server, marker='"listener.started"')
        else:
            conf = d / "nutcracker.yml"
            write_nutcracker(conf, port, redis.port)
            argv = [
                *b.taskset(b.PROXY_CPU),
                tool("nutcracker"),
                "-c", str(conf),
                "-s", str(b.free_port()),
                "-a", "127.0.0.1",
                "-o", str(d / "nutcracker.log"),
                "-p", str(d / "nutcracker.pid"),
            ]  # fmt: skip
            server = self.procs.spawn(target, argv, port, d / "stdout.log", d)
            b.wait_ready(server)
        return server

    def run_one(self, target: str, redis: b.Server, rnd: int) -> Run:
        a = self.args
        run = Run(target, rnd)
        try:
            server = self.start(target, redis, str(rnd))
        except b.BenchError as e:
            run.error = str(e)
            self.failures[target] = str(e)
            return run
        port = server.port if server is not None else redis.port
        time.sleep(0.3)  # let a freshly started proxy settle before its CPU is read
        conns0 = redis_stat(redis.port, "total_connections_received")
        cpu0 = server.cpu_ticks() if server is not None else 0
        out = subprocess.run(
            [
                *b.taskset(CLIENT_CPU or None),
                tool("redis-benchmark"),
                "-h", "127.0.0.1",
                "-p", str(port),
                "-n", str(a.requests),
                "-c", str(a.clients),
                "-P", str(a.pipeline),
                "-t", a.tests,
                "--csv",
            ],
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        if server is not None:
            run.cpu_s = (server.cpu_ticks() - cpu0) / b.CLK_TCK
            if not server.alive():
                run.error = f"{target} died: {server.log_tail(5)}"
            self.procs.stop(server)
        # Less the INFO connection that reads the counter.
        run.server_connections = redis_stat(redis.port, "total_connections_received") - conns0 - 1
        if out.returncode != 0:
            run.error = f"redis-benchmark failed: {(out.stderr or out.stdout).strip()[-300:]}"
            return run
        rows = list(csv.reader(io.StringIO(out.stdout)))
        for row in rows[1:]:
            if len(row) >= 2:
                try:
                    run.rps[row[0]] = float(row[1])
                except ValueError:
                    continue
        if not run.rps:
            run.error = f"no results: {out.stdout.strip()[-300:]} {out.stderr.strip()[-300:]}"
        run.requests = a.requests * len(run.rps)
        run.seconds = sum(a.requests / rps for rps in run.rps.values() if rps > 0)
        if "rror" in out.stderr:
            run.error = b.summary(out.stderr)
        return run

    def main(self) -> int:
        a = self.args
        b.log(f"work dir {self.workdir}")
        redis = self.start_redis()
        runs: list[Run] = []
        for rnd in range(1, a.rounds + 1):
            order = a.targets[rnd - 1 :] + a.targets[: rnd - 1]  # rotate each round
            for target in order:
                r = self.run_one(target, redis, rnd)
                runs.append(r)
                b.log(
                    f"round {rnd}/{a.rounds} {target}: {b.fmt(r.overall_rps, 0)} req/s overall,"
                    f" proxy CPU {b.fmt(r.cpu_us, 2)} us/request,"
                    f" {r.server_connections} server connections"
                    + (f" — ERROR {r.error}" if r.error else "")
                )
        report = self.report(runs)
        print(report)
        b.log(f"saved {b.save_report('redis', report)}")
        return 0

    def report(self, runs: list[Run]) -> str:
        a = self.args
        ok = [r for r in runs if not r.error]
        tests: list[str] = []
        for r in ok:
            for name in r.rps:
                if name not in tests:
                    tests.append(name)

        def med_test(target: str, test: str) -> float | None:
            return b.median([r.rps.get(test) for r in ok if r.target == target])

        def med(target: str, attr: str) -> float | None:
            return b.median([getattr(r, attr) for r in ok if r.target == target])

        def geomean_ratio(x: str, y: str) -> str:
            ratios = []
            for test in tests:
                p, q = med_test(x, test), med_test(y, test)
                if p and q:
                    ratios.append(math.log(p / q))
            return f"{math.exp(sum(ratios) / len(ratios)):.2f}x" if ratios else "n/a"

        rows = []
        for test in tests:
            row = [test] + [b.fmt(med_test(t, test), 0) for t in a.targets]
            if "persistproxy" in a.targets:
                for other in ("direct", "nutcracker"):
                    if other in a.targets:
                        row.append(b.ratio(med_test("persistproxy", test), med_test(other, test)))
            rows.append(row)
        header = ["test", *[f"{t} req/s" for t in a.targets]]
        if "persistproxy" in a.targets:
            header += [f"persistproxy / {o}" for o in ("direct", "nutcracker") if o in a.targets]
        summary_rows = [
            [
                t,
                b.fmt(med(t, "overall_rps"), 0),
                b.fmt(med(t, "cpu_us"), 2),
                b.fmt(med(t, "server_connections"), 0),
                "FAILED (see below)" if t in self.failures else "",
            ]
            for t in a.targets
        ]
        ratios = []
        if "persistproxy" in a.targets:
            for other in ("direct", "nutcracker"):
                if other in a.targets:
                    ratios.append(
                        [
                            f"persistproxy / {other}, req/s (all tests)",
                            b.ratio(med("persistproxy", "overall_rps"), med(other, "overall_rps")),
                        ]
                    )
                    ratios.append(
                        [
                            f"persistproxy / {other}, req/s (geometric mean of the tests)",
                            geomean_ratio("persistproxy", other),
                        ]
                    )
            if "nutcracker" in a.targets:
                ratios.append(
                    [
                        "persistproxy / nutcracker, proxy CPU per request",
                        b.ratio(med("persistproxy", "cpu_us"), med("nutcracker", "cpu_us")),
                    ]
                )
        raw = [
            [
                r.target,
                str(r.round),
                b.fmt(r.overall_rps, 0),
                b.fmt(r.cpu_us, 2),
                str(r.server_connections),
                " ".join(f"{k.split()[0]}={v:.0f}" for k, v in r.rps.items()),
                b.summary(r.error),
            ]
            for r in runs
        ]
        lines = [
            "# persistproxy Redis benchmark",
            "",
            (
                f"`redis-benchmark -n {a.requests} -c {a.clients} -P {a.pipeline} -t {a.tests}`"
                f" against redis-server directly, through persistproxy (`protocol = \"redis\"`,"
                f" access log on) and through twemproxy (nutcracker, defaults), {a.rounds}"
                f" round(s), medians shown. Proxy on CPU {b.PROXY_CPU}; redis-server on CPU"
                f" {b.ORIGIN_CPU}; redis-benchmark on CPU {CLIENT_CPU or 'any'}."
            ),
            "",
            *[f"**{why.splitlines()[0]}**\n" for why in self.failures.values()],
            b.markdown_table(header, rows),
            "",
            b.markdown_table(
                [
                    "target",
                    "req/s (all tests)",
                    "proxy CPU us/request",
                    "server connections opened",
                    "notes",
                ],
                summary_rows,
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
                    "round",
                    "req/s (all)",
                    "CPU us/req",
                    "server conns",
                    "req/s per test",
                    "errors",
                ],
                raw,
            ),
            "",
            "## Environment",
            "",
            *b.environment_lines(a.twistd),
            f"- redis: {b._cmd_version([tool('redis-server'), '--version'])}",
            f"- nutcracker: {b._cmd_version([tool('nutcracker'), '--version'])}",
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
    p.add_argument("--requests", type=int, default=b.env_int("REDIS_REQUESTS", 200000))
    p.add_argument("--clients", type=int, default=b.env_int("REDIS_CLIENTS", 50))
    p.add_argument("--pipeline", type=int, default=b.env_int("REDIS_PIPELINE", 16))
    p.add_argument("--tests", default=os.environ.get("REDIS_TESTS") or DEFAULT_TESTS)
    p.add_argument("--targets", default=os.environ.get("REDIS_TARGETS") or ",".join(ALL_TARGETS))
    args = p.parse_args(argv)
    args.targets = [x.strip() for x in args.targets.split(",") if x.strip()]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad or not args.targets:
        p.error(f"REDIS_TARGETS: choose from {ALL_TARGETS}, got {args.targets}")
    if min(args.rounds, args.requests, args.clients, args.pipeline) < 1:
        p.error("ROUNDS, REDIS_REQUESTS, REDIS_CLIENTS and REDIS_PIPELINE must be >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    b.install_signal_handlers()
    bench = RedisBench(args)
    try:
        return bench.main()
    finally:
        bench.procs.stop_all()
        b.remove_workdir(bench.workdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
