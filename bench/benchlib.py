"""Shared plumbing of the benchmark scripts: free ports, process control, /proc readings,
and the configuration files of the servers the benchmarks start (nginx as origin and as
reverse proxy, haproxy, persistproxy under twistd).

Standard library only, so the scripts run with any Python 3.11 without the project's venv.
Every process is started in its own session (process group) and registered in a `Processes`
set, whose `stop_all()` kills each group (TERM, then KILL) — the callers run it in `finally`
and on SIGTERM/SIGINT/SIGHUP, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import grp
import json
import os
import platform
import pwd
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

BODY_SIZE = 1024
STATUS_PATH = "/__status"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CPU = os.environ.get("PROXY_CPU", "0")
ORIGIN_CPU = os.environ.get("ORIGIN_CPU", "1")
READY_TIMEOUT = 15.0


class BenchError(Exception):
    """A server did not start or a measurement could not be taken."""


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the result tables."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


def free_port() -> int:
    """An ephemeral port the kernel considers free right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def taskset(cpus: str | None) -> list[str]:
    if not cpus or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", cpus]


def prlimit_nofile(n: int | None) -> list[str]:
    """A `prlimit` prefix giving the child `n` file descriptors, when it needs more than ours."""
    if not n or shutil.which("prlimit") is None:
        return []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        # Beyond our hard limit needs CAP_SYS_RESOURCE (raise_nofile() has tried to get it).
        n = min(n, hard)
    if n <= soft:
        return []
    return ["prlimit", f"--nofile={n}:{n}", "--"]


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE to at least `wanted` (the hard limit too when root).

    Returns the soft limit in effect afterwards; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:  # root with CAP_SYS_RESOURCE only
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


# --------------------------------------------------------------------------- /proc readings


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        data = f.read()
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from the ppid field of every /proc/<n>/stat."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry))[1]) == pid:
                kids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def cpu_ticks(pids: Iterable[int]) -> int:
    """utime + stime, in clock ticks, summed over `pids`."""
    total = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        # After the comm field: state=0, ppid=1, ... utime=11, stime=12 (fields 14 and 15).
        total += int(fields[11]) + int(fields[12])
    return total


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------- processes


@dataclass
class Server:
    """One started server: the process we spawned (nginx master, haproxy, twistd) and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    workers_only: bool = False  # nginx: account CPU/RSS to the worker processes

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def accounted_pids(self) -> list[int]:
        """The processes whose CPU and memory count: nginx's workers, otherwise the process."""
        if self.workers_only:
            kids = children(self.pid)
            if kids:
                return kids
        return process_tree(self.pid)

    def cpu_ticks(self) -> int:
        return cpu_ticks(self.accounted_pids())

    def rss_kib(self) -> int:
        return sum(rss_kib(p) for p in self.accounted_pids())

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass
class Processes:
    """Everything started by a benchmark run, killed as a whole by stop_all()."""

    servers: list[Server] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        log_path: Path,
        cwd: Path,
        workers_only: bool = False,
        env: dict[str, str] | None = None,
    ) -> Server:
        logf = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        finally:
            logf.close()
        server = Server(name, proc, port, log_path, workers_only)
        self.servers.append(server)
        return server

    def stop(self, server: Server, grace: float = 5.0) -> None:
        if server in self.servers:
            self.servers.remove(server)
        _kill_group(server.proc, grace)

    def stop_all(self) -> None:
        while self.servers:
            self.stop(self.servers[-1])


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader (nginx workers): make sure it is gone.
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP (and SIGINT, even if ignored by a non-interactive parent shell)
    into SystemExit so `finally:` blocks stop the servers."""

    def handler(signum: int, _frame: object) -> None:
        # Only the first signal interrupts: a second one must not abort the cleanup under way.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        log(f"got signal {signum}, stopping the servers")
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, handler)


def wait_ready(server: Server, timeout: float = READY_TIMEOUT, marker: str | None = None) -> None:
    """Wait until `server` accepts TCP connections on its port (or prints `marker`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(
                f"{server.name} exited with status {server.proc.returncode} before it was ready;"
                f" log tail:\n{server.log_tail()}"
            )
        if marker is not None:
            try:
                if marker in server.log_path.read_text(errors="replace"):
                    return
            except OSError:
                pass
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(
        f"{server.name} did not accept connections on 127.0.0.1:{server.port} within"
        f" {timeout:.0f}s; log tail:\n{server.log_tail()}"
    )


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": "bench"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


def origin_accepts(port: int) -> int:
    """nginx stub_status's `accepts` counter (this very request's connection included)."""
    text = http_get(port, STATUS_PATH).decode()
    # Active connections: 1 \n server accepts handled requests \n 12 12 34 \n Reading: ...
    lines = text.splitlines()
    return int(lines[2].split()[0])


# --------------------------------------------------------------------------- configurations


def _nginx_user_line() -> str:
    """Run the workers as the current user (only meaningful, and only allowed, as root)."""
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"


def _nginx_common(prefix: Path, worker_connections: int, rlimit_nofile: int | None) -> str:
    rlimit = f"worker_rlimit_nofile {rlimit_nofile};" if rlimit_nofile else ""
    return f"""
{_nginx_user_line()}
daemon off;
master_process on;
worker_processes 1;
{rlimit}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {worker_connections}; }}
"""


def _nginx_http_common(prefix: Path) -> str:
    return f"""
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout 300s;
"""


def nginx_argv(prefix: Path, cpus: str | None, nofile: int | None = None) -> list[str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = prefix / "nginx.conf"
    return [
        *taskset(cpus),
        *prlimit_nofile(nofile),
        nginx,
        "-p",
        f"{prefix}/",
        "-e",
        str(prefix / "error.log"),
        "-c",
        str(conf),
    ]


def write_origin_nginx(prefix: Path, port: int, worker_connections: int = 4096) -> None:
    """The origin: a 1 KiB static body on `/`, stub_status on STATUS_PATH, keep-alive for ever."""
    prefix.mkdir(parents=True, exist_ok=True)
    www = prefix / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_bytes(b"x" * (BODY_SIZE - 1) + b"\n")
    (prefix / "nginx.conf").write_text(
        _nginx_common(prefix, worker_connections, worker_connections * 2 + 64)
        + f"""
http {{
{_nginx_http_common(prefix)}
    keepalive_requests 1000000;  # the origin never ends a keep-alive connection itself
    default_type text/html;
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = / {{ try_files /index.html =404; }}
        location = {STATUS_PATH} {{ stub_status; }}
    }}
}}
"""
    )


def write_proxy_nginx(
    prefix: Path,
    port: int,
    origin_port: int,
    worker_connections: int = 4096,
    rlimit_nofile: int | None = None,
    tls: tuple[Path, Path] | None = None,
    http2: bool = False,
) -> None:
    """
    nginx as a keep-alive reverse proxy in front of the origin (optionally terminating TLS,
    and then optionally offering HTTP/2 with no limit on the requests of a connection).
    """
    prefix.mkdir(parents=True, exist_ok=True)
    listen = f"listen 127.0.0.1:{port} backlog=4096"
    tls_lines = ""
    if tls is not None:
        cert, key = tls
        listen += " ssl http2" if http2 else " ssl"
        if http2:
            tls_lines = "        keepalive_requests 100000000;\n"
        tls_lines += f"""
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_timeout 1h;
        ssl_session_tickets on;
"""
    (prefix / "nginx.conf").write_text(
        _nginx_common(prefix, worker_connections, rlimit_nofile or worker_connections * 2 + 64)
        + f"""
http {{
{_nginx_http_common(prefix)}
    upstream app {{
        server 127.0.0.1:{origin_port};
        keepalive 64;
        keepalive_timeout 300s;
    }}
    server {{
        {listen};
{tls_lines}
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )


def write_haproxy(path: Path, port: int, origin_port: int, maxconn: int = 4096) -> None:
    path.write_text(
        f"""global
    nbthread 1
    maxconn {maxconn}
    # Without CAP_SYS_RESOURCE the fd limit may be below 2 x maxconn: warn, do not refuse.
    no strict-limits

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    timeout http-request 30s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server origin 127.0.0.1:{origin_port}
"""
    )


def haproxy_argv(conf: Path, cpus: str | None, nofile: int | None = None) -> list[str]:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return [*taskset(cpus), *prlimit_nofile(nofile), haproxy, "-db", "-f", str(conf)]


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_persistproxy(
    path: Path,
    port: int,
    origin_port: int,
    access_log: bool = False,
    keepalive_timeout: int | None = None,
    tls: tuple[Path, Path] | None = None,
    max_connections: int | None = None,
    alpn: Sequence[str] | None = None,
    max_requests: int | None = None,
) -> None:
    name = "tls" if tls else "web"
    lines = [
        "[[listener]]",
        f"name = {_toml_str(name)}",
        f"bind = {_toml_str(f'tcp:{port}:interface=127.0.0.1')}",
        'upstream = "app"',
        f"access_log = {'true' if access_log else 'false'}",
    ]
    if keepalive_timeout is not None:
        lines.append(f"keepalive_timeout = {keepalive_timeout}")
    if max_connections is not None:
        lines.append(f"max_connections = {max_connections}")
    if max_requests is not None:
        lines.append(f"max_requests = {max_requests}")
    if tls is not None:
        cert, key = tls
        lines += [
            "[listener.tls]",
            f"certificates = [ {{ cert = {_toml_str(str(cert))}, key = {_toml_str(str(key))} }} ]",
            "session_cache = true",
            "session_tickets = true",
        ]
        if alpn is not None:
            lines.append(f"alpn = [{', '.join(_toml_str(name) for name in alpn)}]")
    lines += [
        "",
        "[[upstream]]",
        'name = "app"',
        f"servers = [{_toml_str(f'127.0.0.1:{origin_port}')}]",
        "",
    ]
    path.write_text("\n".join(lines))


def twistd_argv(
    twistd: Path, config: Path, cpus: str | None, nofile: int | None = None
) -> list[str]:
    return [
        *taskset(cpus),
        *prlimit_nofile(nofile),
        str(twistd),
        "-n",
        "--pidfile=",
        "persistproxy",
        "--config",
        str(config),
    ]


def twistd_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)
    return env


def persistproxy_problem(twistd: Path) -> str | None:
    """Why persistproxy cannot even be tried, or None when its twistd exists."""
    if not twistd.exists():
        return f"{twistd} does not exist (`make venv` failed or was not run)"
    return None


def persistproxy_hint() -> str:
    """Added to a persistproxy start failure when the proxy obviously has not landed yet."""
    if not (REPO_DIR / "persistproxy" / "tap.py").exists():
        return " (persistproxy/tap.py does not exist: the proxy is probably not finished yet)"
    return ""


# --------------------------------------------------------------------------- origin & reports


def start_origin(procs: Processes, workdir: Path, worker_connections: int = 4096) -> Server:
    port = free_port()
    prefix = workdir / "origin"
    write_origin_nginx(prefix, port, worker_connections)
    server = procs.spawn(
        "origin",
        nginx_argv(prefix, ORIGIN_CPU, worker_connections * 2 + 64),
        port,
        prefix / "stdout.log",
        prefix,
        workers_only=True,
    )
    wait_ready(server)
    body = http_get(port, "/")
    if len(body) != BODY_SIZE:
        raise BenchError(f"origin served {len(body)} bytes instead of {BODY_SIZE}")
    origin_accepts(port)
    log(f"origin nginx on 127.0.0.1:{port} (pid {server.pid}, CPU {ORIGIN_CPU})")
    return server


def make_workdir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"persistproxy-bench-{tag}-"))


def remove_workdir(path: Path) -> None:
    """Delete the temporary configs and logs, unless KEEP_WORKDIR=1 asks to keep them."""
    if os.environ.get("KEEP_WORKDIR", "") not in ("", "0"):
        log(f"kept work dir {path}")
        return
    shutil.rmtree(path, ignore_errors=True)


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.{digits}f}x"


def _cmd_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "n/a"


_VERSION_SNIPPET = (
    "import sys, persistproxy as p;"
    " print(getattr(p, '__version__', '?'), 'on Python', sys.version.split()[0])"
)


def environment_lines(twistd: Path | None = None) -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- host: {platform.node()} — {platform.platform()}, {os.cpu_count()} CPUs ({cpu})",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- nginx: {_cmd_version(['nginx', '-v'])}",
        f"- haproxy: {_cmd_version(['haproxy', '-v'])}",
        f"- wrk: {_cmd_version(['wrk', '-v'])}",
        f"- openssl: {_cmd_version(['openssl', 'version'])}",
        f"- bench python: {sys.version.split()[0]}",
    ]
    if twistd is not None and twistd.exists():
        py = twistd.parent / "python"
        lines.append(
            "- persistproxy: "
            + _cmd_version(
                [
                    str(py),
                    "-c",
                    _VERSION_SNIPPET,
                ]
            )
        )
    rev = _cmd_version(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    lines.append(f"- git: {rev if not rev.startswith('fatal') else 'no commit yet'}")
    return lines


def save_report(tag: str, text: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = f"-{tag}" if tag else ""
    path = RESULTS_DIR / f"{stamp}{suffix}.md"
    path.write_text(text)
    return path


def summary(text: str, limit: int = 160) -> str:
    """A table-cell summary: the first line and, for a log tail, its last line."""
    lines = [" ".join(x.split()) for x in text.strip().splitlines() if x.strip()]
    if not lines:
        return ""

    def cut(x: str, n: int) -> str:
        return x if len(x) <= n else x[: n - 1] + "…"

    if len(lines) == 1:
        return cut(lines[0], limit)
    return cut(lines[0], limit // 2) + " … " + cut(lines[-1], limit // 2)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)
