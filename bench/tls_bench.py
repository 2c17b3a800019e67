"""Full vs resumed TLS handshakes per second: persistproxy vs nginx, same machine, same run.

Both terminate TLS with the same self-signed P-256 certificate (made at run time) and proxy to an
nginx origin. `openssl s_time -www /` (so each connection also fetches `/` and, for TLS 1.3, reads
the session tickets) measures new handshakes (-new) and resumed ones (-reuse) for -tls1_2 and
-tls1_3. Rates are connections / wall-clock time of the s_time run (its own "real seconds" are
whole seconds). Also recorded: the server's CPU time per handshake (utime+stime from /proc) and the
fraction of -reuse connections s_time reports as actually resumed ('r' vs '*').

Usually started by `bash bench/run.sh tls`. Environment: TLS_TIME (s per s_time run, 5),
ROUNDS (3), TLS_VERSIONS (tls1_2,tls1_3), TLS_TARGETS (persistproxy,nginx), PROXY_CPU (0),
TLS_CLIENT_CPU (openssl s_time's CPU, 1), ORIGIN_CPU (1).
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

ALL_TARGETS = ["persistproxy", "nginx"]
ALL_VERSIONS = ["tls1_2", "tls1_3"]
MODES = ["new", "reuse"]


@dataclass
class STime:
    target: str
    version: str
    mode: str
    round: int
    connections: int = 0
    seconds: float = 0.0
    resumed: int = 0  # connections s_time marked 'r'
    fresh: int = 0  # connections s_time marked '*'
    bytes_per_conn: int | None = None
    cpu_us: float | None = None  # server CPU per connection
    error: str = ""

    @property
    def rate(self) -> float | None:
        return self.connections / self.seconds if self.connections and self.seconds else None

    @property
    def resumed_share(self) -> float | None:
        total = self.resumed + self.fresh
        return self.resumed / total if total else None


def make_cert(workdir: Path) -> tuple[Path, Path]:
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-subj", "/CN=localhost", "-days", "2",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def s_time(server: b.Server, version: str, mode: str, rnd: int, seconds: int) -> STime:
    res = STime(server.name, version, mode, rnd)
    argv = [
        *b.taskset(os.environ.get("TLS_CLIENT_CPU", "1") or None),
        shutil.which("openssl") or "openssl",
        "s_time",
        "-connect",
        f"127.0.0.1:{server.port}",
        f"-{mode}",
        f"-{version}",
        "-time",
        str(seconds),
        "-www",
        "/",
    ]
    cpu0 = server.cpu_ticks()
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    except subprocess.TimeoutExpired:
        res.error = "openssl s_time timed out"
        return res
    res.seconds = time.monotonic() - t0
    cpu1 = server.cpu_ticks()
    text = out.stdout
    m = re.search(
        r"^(\d+) connections in \d+ real seconds, (\d+) bytes read per connection",
        text,
        re.MULTILINE,
    )
    if m:
        res.connections = int(m.group(1))
        res.bytes_per_conn = int(m.group(2))
    # The progress line(s): one character per connection, 'r' resumed, '*' full handshake.
    progress = "".join(line for line in text.splitlines() if line and set(line) <= {"r", "*"})
    res.resumed, res.fresh = progress.count("r"), progress.count("*")
    if res.connections:
        res.cpu_us = (cpu1 - cpu0) * 1e6 / b.CLK_TCK / res.connections
    if out.returncode != 0 or not res.connections:
        err = (out.stderr.strip() or text.strip()).splitlines()
        res.error = f"s_time exit {out.returncode}: " + " | ".join(err[-4:])
    if not server.alive():
        res.error = f"{server.name} died: {server.log_tail(5)}"
    return res


class TlsBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = b.Processes()
        self.workdir = b.make_workdir("tls")
        self.failures: dict[str, str] = {}

    def start_nginx(self, origin: b.Server, tls: tuple[Path, Path]) -> b.Server:
        port = b.free_port()
        prefix = self.workdir / "nginx"
        b.write_proxy_nginx(prefix, port, origin.port, tls=tls)
        server = self.procs.spawn(
            "nginx",
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
        b.write_persistproxy(conf, port, origin.port, tls=tls)
        server = self.procs.spawn(
            "persistproxy",
            b.twistd_argv(self.args.twistd, conf, b.PROXY_CPU),
            port,
            d / "stdout.log",
            d,
            env=b.twistd_env(),
        )
        b.wait_ready(server)
        # Listening is not enough: a handshake must complete.
        check = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief"],
            input="", capture_output=True, text=True, timeout=15, check=False,
        )  # fmt: skip
        if "Protocol version" not in check.stderr + check.stdout:
            client = (check.stderr.strip() or check.stdout.strip()).splitlines() or ["?"]
            raise b.BenchError(
                f"it listens but a TLS handshake fails ({client[-1].strip()})\n"
                + "openssl s_client said:\n"
                + "\n".join(client)
                + f"\nlog tail:\n{server.log_tail()}"
            )
        return server

    def main(self) -> int:
        a = self.args
        b.log(f"work dir {self.workdir}")
        tls = make_cert(self.workdir)
        origin = b.start_origin(self.procs, self.workdir)
        servers: list[b.Server] = []
        for target in a.targets:
            try:
                if target == "nginx":
                    servers.append(self.start_nginx(origin, tls))
                else:
                    servers.append(self.start_persistproxy(origin, tls))
                b.log(f"{target}: TLS listener on 127.0.0.1:{servers[-1].port}")
            except b.BenchError as e:
                first, _, rest = str(e).partition("\n")
                if target == "persistproxy":
                    first = (
                        "persistproxy FAILED with the TLS listener ([listener.tls]) config, the"
                        f" TLS feature may not be finished yet{b.persistproxy_hint()}: {first}"
                    )
                else:
                    first = f"{target} FAILED: {first}"
                self.failures[target] = f"{first}\n{rest}"
                b.log(self.failures[target])
        runs: list[STime] = []
        for rnd in range(1, a.rounds + 1):
            for version in a.versions:
                for mode in MODES:
                    order = servers if rnd % 2 else list(reversed(servers))
                    for server in order:
                        b.log(f"round {rnd}/{a.rounds}: {server.name} -{version} -{mode}")
                        r = s_time(server, version, mode, rnd, a.time)
                        runs.append(r)
                        b.log(
                            f"  {b.fmt(r.rate, 0)} handshakes/s,"
                            f" server CPU {b.fmt(r.cpu_us, 0)} µs each"
                            + (f" — ERROR {r.error}" if r.error else "")
                        )
        report = self.report(runs)
        print(report)
        b.log(f"saved {b.save_report('tls', report)}")
        return 0

    def report(self, runs: list[STime]) -> str:
        a = self.args

        def med(target: str, version: str, mode: str, attr: str) -> float | None:
            sel = [r for r in runs if (r.target, r.version, r.mode) == (target, version, mode)]
            return b.median([getattr(r, attr) for r in sel if not r.error])

        rows, ratios = [], []
        resumption: dict[tuple[str, str], float | None] = {}
        cpu_saving: dict[tuple[str, str], float | None] = {}
        for version in a.versions:
            for target in a.targets:
                full = med(target, version, "new", "rate")
                resumed = med(target, version, "reuse", "rate")
                share = med(target, version, "reuse", "resumed_share")
                r = resumed / full if full and resumed else None
                resumption[(target, version)] = r
                cpu_full = med(target, version, "new", "cpu_us")
                cpu_resumed = med(target, version, "reuse", "cpu_us")
                cpu_r = cpu_full / cpu_resumed if cpu_full and cpu_resumed else None
                cpu_saving[(target, version)] = cpu_r
                note = "FAILED (see below)" if target in self.failures else ""
                rows.append(
                    [
                        target,
                        version.replace("tls1_", "TLS 1."),
                        b.fmt(full, 0),
                        b.fmt(resumed, 0),
                        b.fmt(r, 2),
                        b.fmt(share * 100 if share is not None else None, 1),
                        b.fmt(cpu_full, 0),
                        b.fmt(cpu_resumed, 0),
                        b.fmt(cpu_r, 2),
                        note,
                    ]
                )
            pp, ng = (
                resumption.get(("persistproxy", version)),
                resumption.get(("nginx", version)),
            )
            vname = version.replace("tls1_", "TLS 1.")
            ratios += [
                [
                    f"{vname}: persistproxy resumed/full ÷ nginx resumed/full",
                    b.ratio(pp, ng),
                ],
                [
                    f"{vname}: the same from server CPU (µs full ÷ µs resumed)",
                    b.ratio(
                        cpu_saving.get(("persistproxy", version)),
                        cpu_saving.get(("nginx", version)),
                    ),
                ],
                [
                    f"{vname}: persistproxy / nginx, full handshakes/s",
                    b.ratio(
                        med("persistproxy", version, "new", "rate"),
                        med("nginx", version, "new", "rate"),
                    ),
                ],
                [
                    f"{vname}: persistproxy / nginx, resumed handshakes/s",
                    b.ratio(
                        med("persistproxy", version, "reuse", "rate"),
                        med("nginx", version, "reuse", "rate"),
                    ),
                ],
            ]
        raw = [
            [
                r.target,
                r.version,
                r.mode,
                str(r.round),
                str(r.connections),
                f"{r.seconds:.2f}",
                b.fmt(r.rate, 0),
                f"{r.resumed}/{r.resumed + r.fresh}",
                str(r.bytes_per_conn) if r.bytes_per_conn is not None else "—",
                b.fmt(r.cpu_us, 0),
                b.summary(r.error),
            ]
            for r in runs
        ]
        lines = [
            "# persistproxy TLS handshake benchmark",
            "",
            (
                f"`openssl s_time -new|-reuse -time {a.time} -www /`, {a.rounds} round(s), medians"
                f" shown. Server on CPU {b.PROXY_CPU}, s_time on CPU"
                f" {os.environ.get('TLS_CLIENT_CPU', '1') or 'any'}, origin nginx on CPU"
                f" {b.ORIGIN_CPU}. Self-signed ECDSA P-256 certificate; nginx with"
                " `ssl_session_cache shared:SSL:10m; ssl_session_tickets on;`, persistproxy with"
                " `session_cache = true, session_tickets = true`."
            ),
            "",
            *[
                f"**{why.splitlines()[0]}** (details under Failures below)\n"
                for why in self.failures.values()
            ],
            b.markdown_table(
                [
                    "server",
                    "TLS",
                    "full hs/s",
                    "resumed hs/s",
                    "resumed/full",
                    "% -reuse actually resumed",
                    "server CPU µs/full",
                    "server CPU µs/resumed",
                    "CPU full/resumed",
                    "notes",
                ],
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
                [
                    "server",
                    "TLS",
                    "mode",
                    "round",
                    "connections",
                    "wall s",
                    "conn/s",
                    "resumed",
                    "bytes/conn",
                    "server CPU µs/conn",
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


def _csv(value: str, allowed: list[str], what: str, p: argparse.ArgumentParser) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        p.error(f"{what}: choose from {allowed}, got {value!r}")
    return items


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--twistd", type=Path, default=b.REPO_DIR / ".venv" / "bin" / "twistd")
    p.add_argument("--time", type=int, default=b.env_int("TLS_TIME", 5))
    p.add_argument("--rounds", type=int, default=b.env_int("ROUNDS", 3))
    p.add_argument("--versions", default=os.environ.get("TLS_VERSIONS") or ",".join(ALL_VERSIONS))
    p.add_argument("--targets", default=os.environ.get("TLS_TARGETS") or ",".join(ALL_TARGETS))
    args = p.parse_args(argv)
    args.versions = _csv(args.versions, ALL_VERSIONS, "TLS_VERSIONS", p)
    args.targets = _csv(args.targets, ALL_TARGETS, "TLS_TARGETS", p)
    if args.time < 1 or args.rounds < 1:
        p.error("TLS_TIME and ROUNDS must be >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    b.install_signal_handlers()
    bench = TlsBench(args)
    try:
        return bench.main()
    finally:
        bench.procs.stop_all()
        b.remove_workdir(bench.workdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
