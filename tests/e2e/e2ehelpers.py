"""Helpers for the end-to-end tests: a raw-socket HTTP/1.1 client, curl, and process wrappers
for the origin (tests/e2e/origin.py) and the real proxy (twistd persistproxy)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

HERE = Path(__file__).resolve().parent
ORIGIN_PY = HERE / "origin.py"
BIN_DIR = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN_DIR, "twistd")

BLOCK = bytes(range(256)) * 256


def pattern(n: int) -> bytes:
    """The body the origin sends for /bytes/N, /chunked/N, /closedelim/N, /http10/N."""
    full, rest = divmod(n, len(BLOCK))
    return BLOCK * full + BLOCK[:rest]


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    full, rest = divmod(n, len(BLOCK))
    for _ in range(full):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.hexdigest()


def free_port() -> int:
    """A port nothing listens on (bound then released; used only for 'connection refused')."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Whether pred() became true within timeout (checked every step seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


# --------------------------------------------------------------------------------------------
# The proxy's Prometheus endpoint, to wait on its state (a queued request, a closed connection)
# --------------------------------------------------------------------------------------------

METRICS_TABLE = '[metrics]\nbind = "tcp:0:interface=127.0.0.1"\n\n'


def with_metrics(config_text: str) -> str:
    """A config with the metrics endpoint on an ephemeral loopback port (before any table)."""
    return METRICS_TABLE + config_text


def scrape(proxy: Proxy) -> str:
    """The proxy's /metrics text (its config came through with_metrics)."""
    ev = proxy.wait_event("metrics.started", 10)
    assert ev is not None, "no metrics endpoint: build the config with with_metrics()"
    with urllib.request.urlopen(f"http://127.0.0.1:{ev['port']}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


def metric(text: str, name: str) -> float | None:
    """The value of one sample (name with its labels, as printed), or None if absent."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name:
            return float(value)
    return None


def wait_metric(proxy: Proxy, name: str, value: float, timeout: float = 5.0) -> None:
    """Wait until the sample `name` reads `value` (fails after timeout with the last one)."""
    last: list[float | None] = [None]

    def reached() -> bool:
        last[0] = metric(scrape(proxy), name)
        return last[0] == value

    assert wait_until(reached, timeout), f"{name} is {last[0]}, not {value}, after {timeout}s"


def upstream_waiting(origin_port: int, upstream: str = "app") -> str:
    """The sample name of the requests queued for a connection to 127.0.0.1:origin_port."""
    labels = f'server="127.0.0.1:{origin_port}",upstream="{upstream}"'
    return f"persistproxy_upstream_waiting{{{labels}}}"


def assert_no_traceback(p: ManagedProc) -> None:
    bad = [ln for ln in p.all_output() if "Traceback" in ln or "Unhandled" in ln]
    assert not bad, bad


# --------------------------------------------------------------------------------------------
# Raw HTTP client
# --------------------------------------------------------------------------------------------

class Closed(Exception):
    """The peer closed the connection (EOF or reset) before a complete message arrived."""


class Response:
    def __init__(self, version: str, status: int, reason: str,
                 headers: list[tuple[str, str]]) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = b""
        self.framing = "none"  # "length", "chunked", "close" or "none"
        self.trailers: list[tuple[str, str]] = []
        self.chunks = 0  # chunks of a chunked body

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def has(self, name: str) -> bool:
        return bool(self.get_all(name))

    def tokens(self, name: str) -> set[str]:
        out: set[str] = set()
        for v in self.get_all(name):
            out.update(t.strip().lower() for t in v.split(",") if t.strip())
        return out

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return (f"<Response {self.version} {self.status} {self.reason!r} headers={self.headers!r}"
                f" body[{len(self.body)}]={self.body[:200]!r}>")


def build_request(method: str = "GET", target: str = "/echo",
                  headers: Iterable[tuple[str, str]] | None = None, body: bytes = b"",
                  version: str = "HTTP/1.1", host: str | None = "e2e.test") -> bytes:
    hdrs = list(headers or [])
    names = {k.lower() for k, _ in hdrs}
    if host is not None and "host" not in names:
        hdrs.insert(0, ("Host", host))
    if body and "content-length" not in names and "transfer-encoding" not in names:
        hdrs.append(("Content-Length", str(len(body))))
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs)
    return head.encode("latin-1") + b"\r\n" + body


class RawConn:
    """One client TCP connection with an input buffer, so pipelined responses parse in order."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str = "GET", target: str = "/echo",
                headers: Iterable[tuple[str, str]] | None = None, body: bytes = b"",
                version: str = "HTTP/1.1", host: str | None = "e2e.test") -> None:
        self.send(build_request(method, target, headers, body, version, host))

    def roundtrip(self, method: str = "GET", target: str = "/echo",
                  headers: Iterable[tuple[str, str]] | None = None, body: bytes = b"",
                  version: str = "HTTP/1.1", timeout: float | None = None) -> Response:
        self.request(method, target, headers, body, version)
        return self.read_response(method, timeout=timeout)

    # -- low level ---------------------------------------------------------------------------
    def _fill(self, deadline: float) -> None:
        if self.eof:
            raise Closed("connection closed by peer")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out waiting for data")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(262144)
        except TimeoutError:
            raise TimeoutError("timed out waiting for data") from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            raise Closed("connection closed by peer")
        self.buf += data

    def _read_until(self, sep: bytes, deadline: float, limit: int = 1 << 20) -> bytes:
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise AssertionError(f"no {sep!r} within {limit} bytes: {bytes(self.buf[:200])!r}")
            start = max(0, len(self.buf) - len(sep) + 1)
            self._fill(deadline)

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_head(self, timeout: float | None = None) -> Response:
        deadline = time.monotonic() + (timeout or self.timeout)
        head = self._read_until(b"\r\n\r\n", deadline)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise AssertionError(f"bad status line {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or name != name.strip():
                raise AssertionError(f"bad response header line {line!r}")
            headers.append((name, value.strip()))
        return Response(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "", headers)

    def read_response(self, method: str = "GET", timeout: float | None = None,
                      interim: bool = False) -> Response:
        """Read one complete response. 1xx interim responses are skipped unless interim=True."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            resp = self.read_head(max(0.001, deadline - time.monotonic()))
            if 100 <= resp.status < 200 and resp.status != 101:
                if interim:
                    return resp
                continue
            break
        te = resp.tokens("transfer-encoding")
        cls = resp.get_all("content-length")
        if method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            resp.framing = "none"
        elif te:
            if te != {"chunked"}:
                raise AssertionError(f"unexpected response transfer-encoding {te}")
            resp.framing = "chunked"
            resp.body = self._read_chunked(deadline, resp)
        elif cls:
            if len(set(cls)) != 1:
                raise AssertionError(f"several Content-Length in response: {cls}")
            resp.framing = "length"
            resp.body = self._read_exact(int(cls[0]), deadline)
        else:
            resp.framing = "close"
            while True:
                try:
                    self._fill(deadline)
                except Closed:
                    break
            resp.body = bytes(self.buf)
            self.buf.clear()
        return resp

    def _read_chunked(self, deadline: float, resp: Response) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self._read_until(b"\r\n", deadline, 4096)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:
                    t = self._read_until(b"\r\n", deadline, 65536)
                    if not t:
                        return b"".join(parts)
                    name, _, value = t.decode("latin-1").partition(":")
                    resp.trailers.append((name, value.strip()))
            parts.append(self._read_exact(size, deadline))
            resp.chunks += 1
            crlf = self._read_exact(2, deadline)
            if crlf != b"\r\n":
                raise AssertionError(f"chunk data not followed by CRLF: {crlf!r}")

    def closed_within(self, timeout: float) -> bool:
        """True if the peer closes (EOF/RST) within timeout, False if the connection is still
        open and silent. Unexpected bytes are an assertion error."""
        if self.buf:
            raise AssertionError(f"unexpected buffered bytes: {bytes(self.buf[:200])!r}")
        try:
            self._fill(time.monotonic() + timeout)
        except Closed:
            return True
        except TimeoutError:
            return False
        raise AssertionError(f"unexpected bytes instead of close: {bytes(self.buf[:200])!r}")

    def time_to_close(self, timeout: float) -> float | None:
        """Seconds until the peer closes, or None if it did not within timeout."""
        t0 = time.monotonic()
        if self.closed_within(timeout):
            return time.monotonic() - t0
        return None


def get(port: int, target: str = "/echo", method: str = "GET",
        headers: Iterable[tuple[str, str]] | None = None, body: bytes = b"",
        version: str = "HTTP/1.1", timeout: float = 5.0) -> Response:
    """One request on a fresh connection."""
    with RawConn(port, timeout=timeout) as c:
        return c.roundtrip(method, target, headers, body, version)


# --------------------------------------------------------------------------------------------
# curl
# --------------------------------------------------------------------------------------------

def curl(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    if shutil.which("curl") is None:
        raise AssertionError("curl is not installed (scripts/system-deps.sh installs it)")
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), *args],
                          check=False, capture_output=True, timeout=timeout + 10)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

ALL_PROCS: list[ManagedProc] = []

# Run as `python -c THIS PARENT_PID PROGRAM ARGS...`: asks the kernel to SIGKILL this process
# when its parent (the pytest process) dies, then execs PROGRAM in place (same pid; the setting
# survives execve). Only used from the main thread: the signal follows the *thread* that forked.
_EXEC_WITH_PDEATHSIG = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit("parent already gone")
os.execv(sys.argv[2], sys.argv[2:])
"""


class ManagedProc:
    """A child process whose merged output lines are collected by a background thread."""

    name = "process"

    def __init__(self, argv: list[str], cwd: str | None = None,
                 merge_stderr: bool = True, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        env = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1")
        self.argv = argv
        spawn = argv
        if pass_fds:
            pass  # the exec'd program must keep its pid and descriptors: spawn it directly
        elif sys.platform == "linux" and threading.current_thread() is threading.main_thread():
            # Die with the test run even when pytest itself is killed (no teardown then).
            spawn = [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *argv]
        self.proc = subprocess.Popen(
            spawn, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            stdin=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True,
            pass_fds=pass_fds)
        self._lines: list[str] = []
        self._errlines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        assert self.proc.stdout is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines, True),
                         daemon=True).start()
        if not merge_stderr:
            assert self.proc.stderr is not None
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._errlines, False),
                             daemon=True).start()
        ALL_PROCS.append(self)

    def _pump(self, stream: Any, sink: list[str], main: bool) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                sink.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            if main:
                self._eof = True
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def errlines(self) -> list[str]:
        with self._cond:
            return list(self._errlines)

    def all_output(self) -> list[str]:
        with self._cond:
            return list(self._lines) + list(self._errlines)

    def wait_line(self, pred: Callable[[str], bool], timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self._lines)
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then wait; returns the exit status (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait(5)
        else:
            # The leader is gone; take any leftover of its session with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


class Origin(ManagedProc):
    name = "origin"

    def __init__(self, idle_close: float | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        argv = [sys.executable, str(ORIGIN_PY), "--host", host, "--port", str(port)]
        if idle_close is not None:
            argv += ["--idle-close", str(idle_close)]
        super().__init__(argv, merge_stderr=False)
        self.host = host
        line = self.wait_line(lambda s: s.startswith("{"), 10)
        if line is None:
            self.kill()
            raise RuntimeError(f"origin did not start: {self.all_output()}")
        self.port = int(json.loads(line)["port"])

    def _control(self, method: str, path: str) -> Response:
        with RawConn(self.port, self.host) as c:
            resp = c.roundtrip(method, path, [("Connection", "close")])
        assert resp.status == 200, resp
        return resp

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._control("GET", "/__stats").json()
        return result

    def reset(self) -> None:
        self._control("POST", "/__reset")

    def arm_drop_reused(self) -> None:
        """The next request that arrives on a reused connection is read and left unanswered."""
        self._control("POST", "/__arm/drop-reused")


class Proxy(ManagedProc):
    name = "proxy"

    def __init__(self, config_path: str, cwd: str, startup_timeout: float = 20.0,
                 listener: str = "web", env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        super().__init__([TWISTD, "--nodaemon", "--pidfile=", "persistproxy",
                          "--config", config_path], cwd=cwd,
                         env=dict(os.environ, **env) if env else None)
        ev = self.wait_event("listener.started", startup_timeout,
                             lambda e: e.get("listener") == listener)
        if ev is None:
            self.kill()
            out = "\n".join(self.lines())
            raise RuntimeError(f"proxy did not announce listener {listener!r} within "
                               f"{startup_timeout}s (exit={self.proc.returncode}):\n{out}")
        self.port = int(ev["port"])
        self.host = ev.get("host", "127.0.0.1")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.lines():
            ev = parse_json_line(line)
            if ev is not None and (name is None or ev.get("event") == name):
                out.append(ev)
        return out

    def wait_event(self, name: str, timeout: float,
                   pred: Callable[[dict[str, Any]], bool] = lambda e: True
                   ) -> dict[str, Any] | None:
        def match(line: str) -> bool:
            ev = parse_json_line(line)
            return ev is not None and ev.get("event") == name and pred(ev)
        line = self.wait_line(match, timeout)
        return parse_json_line(line) if line is not None else None


def parse_json_line(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    return ev if isinstance(ev, dict) else None


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

LISTENER_DEFAULTS: dict[str, Any] = {
    "name": "web",
    "bind": "tcp:0:interface=127.0.0.1",
    "upstream": "app",
    "keepalive_timeout": 75,
    "max_requests": 1000,
    "max_head_size": 16384,
    "access_log": True,
}

UPSTREAM_DEFAULTS: dict[str, Any] = {
    "name": "app",
    "pool_size": 256,
    "idle_timeout": 60,
    "max_requests": 1000,
    "connect_timeout": 5,
    "response_timeout": 60,
}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_config(listeners: list[dict[str, Any]], upstreams: list[dict[str, Any]]) -> str:
    out = []
    for table, items in (("listener", listeners), ("upstream", upstreams)):
        for item in items:
            out.append(f"[[{table}]]")
            out += [f"{k} = {toml_value(v)}" for k, v in item.items()]
            out.append("")
    return "\n".join(out)


def make_config(servers: list[str], listener: dict[str, Any] | None = None,
                upstream: dict[str, Any] | None = None) -> str:
    lst = dict(LISTENER_DEFAULTS, **(listener or {}))
    ups = dict(UPSTREAM_DEFAULTS, servers=servers)
    ups.update(upstream or {})
    return toml_config([lst], [ups])


def proc_status_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process, in KiB: VmRSS (now) or VmHWM (peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
