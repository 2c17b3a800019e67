"""The keep-alive race: errors per method through persistproxy, nginx and haproxy.

The origin is the end-to-end tests' origin (tests/e2e/origin.py) with `--idle-close`: it closes
a keep-alive connection idle for that long and never says so (no `Keep-Alive: timeout=`). The
client is tests/e2e/soak.py: bursts of GET and POST on 32 keep-alive connections, each burst
timed a few milliseconds around the moment the origin closes the connections the last burst
used, so that a proxy lends some of them just as they are being closed. A GET that meets a
closed connection may be retried; a POST must not be (it would reach the origin twice), so a
proxy that lends it such a connection can only answer 502.

Each target gets a fresh origin and runs the soak for RACE_SECONDS; RACE_ROUNDS rounds
interleave the targets. Reported per run: requests and errors per method (by kind), POSTs the
origin saw twice, and the connections the origin accepted.

Usually started by `bash bench/run.sh race`. Environment: RACE_SECONDS (60), RACE_ROUNDS (1),
RACE_IDLE_CLOSE (1.0 s), RACE_CLIENTS (32), RACE_TARGETS (persistproxy,nginx-proxy,haproxy),
PROXY_CPU (0), ORIGIN_CPU (1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib as b

ALL_TARGETS = ["persistproxy", "nginx-proxy", "haproxy"]
ORIGIN_PY = b.REPO_DIR / "tests" / "e2e" / "origin.py"
SOAK_PY = b.REPO_DIR / "tests" / "e2e" / "soak.py"


@dataclass
class Run:
    target: str
    result: dict[str, object] | None = None
    error: str = ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--twistd", type=Path, default=b.REPO_DIR / ".venv" / "bin" / "twistd")
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("RACE_SECONDS", 60)))
    ap.add_argument("--rounds", type=int, default=b.env_int("RACE_ROUNDS", 1))
    ap.add_argument(
        "--idle-close", type=float, default=float(os.environ.get("RACE_IDLE_CLOSE", 1.0))
    )
    ap.add_argument("--clients", type=int, default=b.env_int("RACE_CLIENTS", 32))
    ap.add_argument(
        "--targets",
        default=os.environ.get("RACE_TARGETS", ",".join(ALL_TARGETS)),
        help="comma-separated: " + ",".join(ALL_TARGETS),
    )
    args = ap.parse_args(argv)
    args.twistd = args.twistd.absolute()
    args.targets = [t for t in args.targets.split(",") if t]
    for t in args.targets:
        if t not in ALL_TARGETS:
            ap.error(f"unknown target {t!r}")
    return args


class RaceBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = b.Processes()
        self.workdir = b.make_workdir("race")

    def start_origin(self, tag: str) -> b.Server:
        log_path = self.workdir / f"origin-{tag}.log"
        argv = [
            *b.taskset(b.ORIGIN_CPU),
            sys.executable,
            str(ORIGIN_PY),
            "--idle-close",
            f"{self.args.idle_close:g}",
        ]
        server = self.procs.spawn("origin", argv, 0, log_path, self.workdir)
        deadline = time.monotonic() + b.READY_TIMEOUT
        while time.monotonic() < deadline:
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    server.port = int(json.loads(line)["port"])
                    return server
            if not server.alive():
                break
            time.sleep(0.05)
        raise b.BenchError(f"the origin did not start:\n{server.log_tail()}")

    def start_proxy(self, target: str, origin_port: int, tag: str) -> b.Server:
        port = b.free_port()
        if target == "persistproxy":
            problem = b.persistproxy_problem(self.args.twistd)
            if problem:
                raise b.BenchError(problem + b.persistproxy_hint())
            config = self.workdir / f"persistproxy-{tag}.toml"
            b.write_persistproxy(config, port, origin_port)
            server = self.procs.spawn(
                target,
                b.twistd_argv(self.args.twistd, config, b.PROXY_CPU),
                port,
                self.workdir / f"persistproxy-{tag}.log",
                self.workdir,
                env=b.twistd_env(),
            )
        elif target == "nginx-proxy":
            prefix = self.workdir / f"nginx-{tag}"
            b.write_proxy_nginx(prefix, port, origin_port)
            server = self.procs.spawn(
                target,
                b.nginx_argv(prefix, b.PROXY_CPU),
                port,
                prefix / "stdout.log",
                prefix,
                workers_only=True,
            )
        else:
            conf = self.workdir / f"haproxy-{tag}.cfg"
            b.write_haproxy(conf, port, origin_port)
            server = self.procs.spawn(
                target,
                b.haproxy_argv(conf, b.PROXY_CPU),
                port,
                self.workdir / f"haproxy-{tag}.log",
                self.workdir,
            )
        b.wait_ready(server)
        return server

    def run_one(self, target: str, tag: str) -> Run:
        run = Run(target)
        origin = proxy = None
        try:
            origin = self.start_origin(tag)
            proxy = self.start_proxy(target, origin.port, tag)
            a = self.args
            b.log(f"{target}: soak {a.seconds:g}s, origin idle close {a.idle_close:g}s")
            out = subprocess.run(
                [
                    sys.executable,
                    str(SOAK_PY),
                    "--port",
                    str(proxy.port),
                    "--idle-close",
                    f"{a.idle_close:g}",
                    "--seconds",
                    f"{a.seconds:g}",
                    "--clients",
                    str(a.clients),
                    "--origin-port",
                    str(origin.port),
                ],
                capture_output=True,
                text=True,
                timeout=a.seconds + 120,
                check=False,
            )
            if out.returncode != 0 or not out.stdout.strip():
                raise b.BenchError(f"soak failed: {out.stderr.strip()[-400:]}")
            run.result = json.loads(out.stdout)
            b.log(f"{target}: {out.stdout.strip()}")
        except (b.BenchError, subprocess.TimeoutExpired, ValueError) as e:
            run.error = str(e)
            b.log(f"{target}: FAILED: {b.summary(run.error)}")
        finally:
            for server in (proxy, origin):
                if server is not None:
                    self.procs.stop(server)
        return run

    def main(self) -> int:
        a = self.args
        b.log(f"work dir {self.workdir}")
        runs: list[Run] = []
        for r in range(a.rounds):
            order = a.targets[r % len(a.targets) :] + a.targets[: r % len(a.targets)]
            for target in order:
                runs.append(self.run_one(target, f"{target}-{r}"))
        report = self.report(runs)
        print(report)
        b.log(f"saved {b.save_report('race', report)}")
        return 0

    def report(self, runs: list[Run]) -> str:
        a = self.args
        rows = []
        for run in runs:
            res = run.result
            if res is None:
                rows.append([run.target, "—", "—", "—", "—", "—", "—", b.summary(run.error)])
                continue
            methods: dict[str, dict[str, object]] = res["methods"]  # type: ignore[assignment]

            def cell(method: str, m: dict[str, dict[str, object]] = methods) -> str:
                c = m[method]
                kinds = c["failures"]
                detail = ", ".join(f"{k}: {v}" for k, v in kinds.items())  # type: ignore[attr-defined]
                return f"{c['errors']} / {c['sent']}" + (f" ({detail})" if detail else "")

            rows.append(
                [
                    run.target,
                    f"{res['seconds']}",
                    f"{res['rounds']}",
                    cell("GET"),
                    cell("POST"),
                    f"{res['duplicated_posts']}",
                    f"{res['origin_accepts']}",
                    "",
                ]
            )
        lines = [
            "# The keep-alive race: errors per method",
            "",
            (
                f"Origin: tests/e2e/origin.py closing idle connections after {a.idle_close:g}s"
                " without `Keep-Alive: timeout=`. Client: tests/e2e/soak.py, bursts of GET and"
                f" POST on {a.clients} keep-alive connections, each burst timed a few ms around"
                " the origin's idle close of the connections the previous burst used. Proxy on"
                f" CPU {b.PROXY_CPU}, origin on CPU {b.ORIGIN_CPU}; a fresh origin per run."
            ),
            "",
            b.markdown_table(
                [
                    "proxy",
                    "seconds",
                    "bursts",
                    "GET errors / sent",
                    "POST errors / sent",
                    "POSTs seen twice",
                    "origin accepts",
                    "problem",
                ],
                rows,
            ),
            "",
            "Environment:",
            "",
            *b.environment_lines(a.twistd),
            "",
        ]
        return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    b.install_signal_handlers()
    bench = RaceBench(args)
    try:
        return bench.main()
    finally:
        bench.procs.stop_all()
        b.remove_workdir(bench.workdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
