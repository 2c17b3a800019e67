"""Socket activation as systemd does it, and the shipped unit files.

The test plays systemd: it creates and binds the listening socket itself, hands it to
``twistd -n persistproxy`` as file descriptor 3 with LISTEN_FDS=1, LISTEN_FDNAMES=web and
LISTEN_PID equal to the proxy's pid (a ``bash -c 'LISTEN_PID=$$ exec ...'`` wrapper; bash, as
dash cannot redirect descriptors above 9), and the listener binds with
``systemd:domain=INET:name=web``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from e2ehelpers import (
    TWISTD,
    UPSTREAM_DEFAULTS,
    ManagedProc,
    Origin,
    RawConn,
    parse_json_line,
    toml_config,
)

REPO = Path(__file__).resolve().parents[2]
UNITS = [REPO / "systemd" / "persistproxy.socket", REPO / "systemd" / "persistproxy.service"]


class ActivatedProxy(ManagedProc):
    """twistd started the way systemd starts a socket-activated service."""

    name = "proxy (socket-activated)"

    def __init__(self, config: Path, listen_fd: int) -> None:
        # fd `listen_fd` becomes fd 3 of the exec'd twistd; bash is replaced by twistd
        # (exec), so $$ is twistd's pid, as LISTEN_PID must be.
        redirect = f"3<&{listen_fd}" + (f" {listen_fd}<&-" if listen_fd != 3 else "")
        argv = ["bash", "-c", f'LISTEN_PID=$$ exec "$0" "$@" {redirect}',
                TWISTD, "--nodaemon", "--pidfile=", "persistproxy", "--config", str(config)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", LISTEN_FDS="1", LISTEN_FDNAMES="web")
        env.pop("LISTEN_PID", None)
        super().__init__(argv, cwd=str(config.parent), env=env, pass_fds=(listen_fd,))


def test_socket_activation_serves_through_inherited_socket(origin: Origin,
                                                           tmp_path: Path) -> None:
    if not Path(TWISTD).exists():
        pytest.fail(f"{TWISTD} does not exist: run `make venv`")
    listener = {"name": "web", "bind": "systemd:domain=INET:name=web", "upstream": "app"}
    upstream = dict(UPSTREAM_DEFAULTS, servers=[f"127.0.0.1:{origin.port}"])
    config = tmp_path / "persistproxy.toml"
    config.write_text(toml_config([listener], [upstream]))

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    p = ActivatedProxy(config, sock.fileno())
    try:
        sock.close()  # from now on only the proxy holds the listening socket
        line = p.wait_line(lambda s: (parse_json_line(s) or {}).get("event") == "listener.started",
                           20)
        assert line is not None, f"proxy did not start (exit={p.proc.poll()}): {p.lines()}"
        ev = parse_json_line(line)
        assert ev is not None and ev["listener"] == "web" and ev.get("port") == port, ev
        for _ in range(2):
            with RawConn(port) as c:
                r = c.roundtrip("GET", "/echo")
                assert r.status == 200, r
                assert r.json()["path"] == "/echo", r
                assert r.get("Server") == "e2e-origin", r
        assert p.alive()
    finally:
        p.terminate(5)
        p.kill()


def test_socket_activation_ignores_fds_meant_for_another_pid(origin: Origin,
                                                             tmp_path: Path) -> None:
    """Control for the test above: with LISTEN_PID naming another process, the systemd
    endpoint must find no socket, so the proxy cannot have started by binding one itself."""
    listener = {"name": "web", "bind": "systemd:domain=INET:name=web", "upstream": "app"}
    upstream = dict(UPSTREAM_DEFAULTS, servers=[f"127.0.0.1:{origin.port}"])
    config = tmp_path / "persistproxy.toml"
    config.write_text(toml_config([listener], [upstream]))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="web", LISTEN_PID="1")
    try:
        cp = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "persistproxy", "--config",
                             str(config)], env=env, pass_fds=(sock.fileno(),),
                            capture_output=True, text=True, timeout=20, cwd=str(tmp_path))
    finally:
        sock.close()
    assert cp.returncode != 0, f"started without its socket: {cp.stdout[-2000:]}"
    assert "web" in cp.stdout + cp.stderr, "the failure does not name the missing socket"


def _verify(units: list[Path]) -> list[str]:
    """systemd-analyze verify's complaints, minus the one a build machine cannot satisfy:
    the installed twistd at /opt/persistproxy/bin does not exist here."""
    cp = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                        capture_output=True, text=True, timeout=60)
    lines = (cp.stdout + cp.stderr).splitlines()
    unavoidable = "/opt/persistproxy/bin/twistd is not executable"
    return [s for s in lines if s.strip() and unavoidable not in s]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_unit_files_parse(tmp_path: Path) -> None:
    assert _verify(UNITS) == []
    # Control: the same check does report a misspelt key, an unknown section and a bad value.
    broken = []
    for unit in UNITS:
        text = unit.read_text().replace("[Install]", "[Instal]")
        text = text.replace("Backlog=", "Backlogg=").replace("TimeoutStopSec=40",
                                                            "TimeoutStopSec=forty")
        copy = tmp_path / unit.name
        copy.write_text(text)
        broken.append(copy)
    complaints = "\n".join(_verify(broken))
    for needle in ("Backlogg", "Instal", "forty"):
        assert needle in complaints, complaints
