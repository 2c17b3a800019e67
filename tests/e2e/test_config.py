"""End-to-end configuration checks: ``twistd persistproxy --check`` (like ``nginx -t``) and a
proxy that refuses to start on a bad configuration, each with one line naming the file, the key
and the problem, and the shipped example configuration being valid."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from e2ehelpers import TWISTD, make_config


def test_twistd_help_lists_plugin() -> None:
    cp = subprocess.run([TWISTD, "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert re.search(r"^\s+persistproxy\s", cp.stdout, re.MULTILINE), cp.stdout


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "persistproxy", "--check",
                           "--config", str(path)], check=False, capture_output=True, text=True,
                          timeout=60, cwd=path.parent)


def test_check_valid_config(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(make_config(["127.0.0.1:8000", "127.0.0.1:8001"]))
    cp = run_check(path)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)


def test_check_does_not_bind(tmp_path: Path) -> None:
    """--check only validates: it succeeds even when the configured port is taken."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        port = held.getsockname()[1]
        path = tmp_path / "ok.toml"
        path.write_text(make_config(["127.0.0.1:8000"],
                                    listener={"bind": f"tcp:{port}:interface=127.0.0.1"}))
        cp = run_check(path)
        assert cp.returncode == 0, (cp.stdout, cp.stderr)
    finally:
        held.close()


BAD_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # id: (listener overrides, upstream overrides, key that must be named)
    "unknown-listener-key": ({"keepalive_timout": 5}, {}, "keepalive_timout"),
    "unknown-upstream-key": ({}, {"pool_sise": 3}, "pool_sise"),
    "wrong-type": ({"keepalive_timeout": "abc"}, {}, "keepalive_timeout"),
    "wrong-type-servers": ({}, {"servers": "127.0.0.1:80"}, "servers"),
    "undefined-upstream": ({"upstream": "nope"}, {}, "upstream"),
    "bad-endpoint": ({"bind": "tcp:notaport"}, {}, "bind"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_check_bad_config_one_line(tmp_path: Path, case: str) -> None:
    listener, upstream, key = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(make_config(["127.0.0.1:8000"], listener, upstream))
    cp = run_check(path)
    assert cp.returncode != 0
    lines = [ln for ln in (cp.stdout + cp.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one line, got {lines!r}"
    assert str(path) in lines[0], lines[0]
    assert key in lines[0], lines[0]
    assert "listener.started" not in lines[0]


@pytest.mark.parametrize("case", ["undefined-upstream", "bad-endpoint"])
def test_bad_config_run_refuses_to_start(tmp_path: Path, case: str) -> None:
    """Without --check a bad config stops twistd before anything is bound."""
    listener, upstream, key = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(make_config(["127.0.0.1:8000"], listener, upstream))
    cp = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "persistproxy", "--config",
                         str(path)], check=False, capture_output=True, text=True, timeout=30,
                        cwd=tmp_path)
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0, out
    assert key in out and str(path) in out, out
    assert "listener.started" not in out, out


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_check_rejects_non_finite_timeouts(tmp_path: Path, value: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(make_config(["127.0.0.1:8000"]).replace(
        "keepalive_timeout = 75", f"keepalive_timeout = {value}"))
    assert f"keepalive_timeout = {value}" in path.read_text()
    cp = run_check(path)
    assert cp.returncode != 0, cp.stdout + cp.stderr
    assert "keepalive_timeout" in cp.stdout + cp.stderr


def test_check_rejects_missing_upstream_tls_ca(tmp_path: Path) -> None:
    """Found in review on an earlier snapshot (exit 0, then a traceback at startup); fixed in the
    working tree during the review: kept as a regression test."""
    path = tmp_path / "bad.toml"
    path.write_text(make_config(["127.0.0.1:8000"], upstream={
        "tls": True, "tls_ca": str(tmp_path / "missing-ca.pem")}))
    cp = run_check(path)
    assert cp.returncode != 0, cp.stdout + cp.stderr
    assert "tls_ca" in cp.stdout + cp.stderr


@pytest.mark.parametrize(("text", "key"), [
    ("[listener]\nbind = \"tcp:0\"\nupstream = \"app\"\n"
     "[[upstream]]\nname = \"app\"\nservers = [\"127.0.0.1:9\"]\n", "listener"),
    ("[[listener]]\nbind = \"tcp:0\"\nupstream = \"app\"\n"
     "[upstream]\nname = \"app\"\nservers = [\"127.0.0.1:9\"]\n", "upstream"),
    ("[[listener]]\nbind = \"tcp:0\"\nupstream = \"app\"\ntcp_keepalive = { idle = 1.5, "
     "interval = 1, count = 1 }\n[[upstream]]\nname = \"app\"\nservers = [\"127.0.0.1:9\"]\n",
     "tcp_keepalive.idle"),
    ("[[listener]]\nbind = \"tcp:0\"\nupstream = \"app\"\n"
     "[[upstream]]\nname = \"app\"\nservers = [\"127.0.0.1:70000\"]\n", "servers"),
    ("[[listener]]\nbind = \"tcp:0\"\nupstream = \"app\"\n"
     "[[upstream]]\nname = \"app\"\nservers = []\n", "servers"),
])
def test_check_bad_structure_one_line(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    cp = run_check(path)
    out = [ln for ln in (cp.stdout + cp.stderr).splitlines() if ln.strip()]
    assert cp.returncode == 2 and len(out) == 1 and key in out[0], out


@pytest.mark.parametrize("where", ["missing", "directory"])
def test_check_unreadable_config_path(tmp_path: Path, where: str) -> None:
    path = tmp_path / "nope.toml" if where == "missing" else tmp_path
    cp = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "persistproxy", "--check",
                         "--config", str(path)], check=False, capture_output=True, text=True,
                        timeout=30)
    out = [ln for ln in (cp.stdout + cp.stderr).splitlines() if ln.strip()]
    assert cp.returncode == 2 and len(out) == 1 and "cannot read" in out[0], out


def test_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "etc" / "persistproxy.toml"
    cp = run_check(example)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
