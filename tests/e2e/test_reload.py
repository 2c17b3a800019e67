"""Reload in place (SIGHUP) on the real proxy: wrk runs through several reloads that move the
upstream back and forth and change the listener, with no failed request; an invalid file is
kept out with the line --check prints; a valid one adds a listener, moves an upstream (also
for a connection opened before it), and a later one removes the listener again."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2ehelpers import TWISTD, Origin, Proxy, RawConn, get, toml_config

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d connect=%d read=%d write=%d status=%d timeout=%d\\n",
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def config_text(servers: list[int], extra_listener: dict[str, Any] | None = None,
                **web: Any) -> str:
    listeners = [{"name": "web", "bind": "tcp:0:interface=127.0.0.1", "upstream": "app", **web}]
    if extra_listener is not None:
        listeners.append({"upstream": "app", **extra_listener})
    upstream = {"name": "app", "servers": [f"127.0.0.1:{port}" for port in servers]}
    return toml_config(listeners, [upstream])


def rewrite(path: str, text: str) -> None:
    """Replace the file at once, as an editor or a deployment tool does: a reload never
    reads half of it."""
    tmp = Path(path).with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def reload(proxy: Proxy, outcome: str = "config.reloaded", timeout: float = 10
           ) -> dict[str, Any]:
    """SIGHUP, and the outcome event of that reload (not an earlier one)."""
    before = len(proxy.events(outcome))
    os.kill(proxy.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = proxy.events(outcome)
        if len(events) > before:
            return events[before]
        time.sleep(0.02)
    raise AssertionError(f"no {outcome} within {timeout}s:\n" + "\n".join(proxy.lines()[-30:]))


def requests_seen(origin: Origin) -> int:
    return int(origin.stats()["requests"])


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_no_request_fails_while_wrk_runs_through_reloads(
        origin_factory: Callable[..., Origin], proxy_factory: Callable[..., Proxy],
        tmp_path: Path) -> None:
    a, b = origin_factory(), origin_factory()
    proxy = proxy_factory(config_text=config_text([a.port]))
    script = tmp_path / "result.lua"
    script.write_text(WRK_SCRIPT)
    duration = 8
    wrk = subprocess.Popen(["wrk", "-t2", "-c16", f"-d{duration}s", "-s", str(script),
                            f"http://127.0.0.1:{proxy.port}/echo"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reloads: list[dict[str, Any]] = []
    try:
        time.sleep(1)
        started = time.monotonic()
        flip = False
        # Each reload moves the upstream to the other origin and changes the listener's
        # settings, so pools are replaced under load and new connections get a new factory.
        while time.monotonic() - started < duration - 2.5:
            flip = not flip
            rewrite(proxy.config_path, config_text([b.port if flip else a.port],
                                                   keepalive_timeout=70 if flip else 75))
            reloads.append(reload(proxy))
            time.sleep(0.3)
        output, _ = wrk.communicate(timeout=duration + 30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
    print(output)
    print(f"reloads during the run: {len(reloads)}")
    result = re.search(r"RESULT requests=(\d+) connect=(\d+) read=(\d+) write=(\d+) "
                       r"status=(\d+) timeout=(\d+)", output)
    assert result is not None, output
    requests, *errors = (int(g) for g in result.groups())
    assert len(reloads) >= 4
    assert all(r["upstreams_changed"] == ["app"] and r["listeners_changed"] == ["web"]
               for r in reloads), reloads
    assert requests > 0
    assert errors == [0, 0, 0, 0, 0], f"connect, read, write, non-2xx, timeout: {errors}"
    assert "Non-2xx" not in output and "Socket errors" not in output
    assert requests_seen(a) > 0 and requests_seen(b) > 0
    assert proxy.events("config.reload_failed") == []
    aborted = [e for e in proxy.events("access") if e.get("aborted") or e["status"] >= 500]
    assert aborted == []


def test_an_invalid_file_is_kept_out_with_the_line_check_prints(
        origin_factory: Callable[..., Origin], proxy_factory: Callable[..., Proxy]) -> None:
    a, b = origin_factory(), origin_factory()
    proxy = proxy_factory(config_text=config_text([a.port]))
    with RawConn(proxy.port) as kept:
        assert kept.roundtrip().status == 200
        # Valid TOML, invalid configuration: the upstream would move, but must not.
        rewrite(proxy.config_path, config_text([b.port], keepalive_timeout=-1))
        failed = reload(proxy, "config.reload_failed")
        check = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "persistproxy", "--check",
                                "--config", proxy.config_path],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode != 0
        assert failed["error"] == check.stderr.strip(), (failed, check.stderr)
        assert "listener.web.keepalive_timeout: must be >= 0" in failed["error"]
        assert failed["level"] == "error"
        # The old configuration goes on, untouched: same origin, same connection.
        assert kept.roundtrip().status == 200
        assert get(proxy.port).status == 200
        assert requests_seen(b) == 0 and requests_seen(a) == 3
        # Not even TOML: the same.
        rewrite(proxy.config_path, "[[listener]\n")
        failed = reload(proxy, "config.reload_failed")
        assert "not valid TOML" in failed["error"]
        assert kept.roundtrip().status == 200 and requests_seen(b) == 0
    assert proxy.events("config.reloaded") == []
    assert proxy.alive()


def test_a_valid_file_adds_a_listener_and_moves_the_upstream_then_removes_the_listener(
        origin_factory: Callable[..., Origin], proxy_factory: Callable[..., Proxy]) -> None:
    a, b = origin_factory(), origin_factory()
    proxy = proxy_factory(config_text=config_text([a.port]))
    extra = {"name": "extra", "bind": "tcp:0:interface=127.0.0.1", "add_via": False}
    with RawConn(proxy.port) as kept:
        r = kept.roundtrip()
        assert r.status == 200 and requests_seen(a) == 1
        rewrite(proxy.config_path, config_text([b.port], extra_listener=extra))
        reloaded = reload(proxy)
        assert reloaded["listeners_added"] == ["extra"], reloaded
        assert reloaded["upstreams_changed"] == ["app"], reloaded
        [started] = proxy.events("listener.started")[1:]
        assert started["listener"] == "extra"
        # The new listener answers, with its own settings, from the moved upstream.
        r = get(started["port"])
        assert r.status == 200
        assert "Via" not in dict(r.json()["headers"])
        # A connection opened before the reload sends its next request to the new origin.
        r = kept.roundtrip()
        assert r.status == 200 and "Via" in dict(r.json()["headers"])
        assert get(proxy.port).status == 200
        assert requests_seen(a) == 1 and requests_seen(b) == 3
        assert a.stats()["open"] == 0, "the old pool closed its connection"
        # Removing it again: the port stops accepting, its connections drain.
        with RawConn(started["port"]) as on_extra:
            assert on_extra.roundtrip().status == 200
            rewrite(proxy.config_path, config_text([b.port]))
            reloaded = reload(proxy)
            assert reloaded["listeners_removed"] == ["extra"], reloaded
            assert on_extra.closed_within(5), "an idle connection of a removed listener closes"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", started["port"]), timeout=5).close()
        assert proxy.wait_event("listener.drained", 5, lambda e: e["listener"] == "extra")
        assert kept.roundtrip().status == 200
    assert proxy.events("config.reload_failed") == []
    print(json.dumps(reloaded))


def test_a_port_in_use_keeps_the_old_configuration(
        origin_factory: Callable[..., Origin], proxy_factory: Callable[..., Proxy]) -> None:
    a, b = origin_factory(), origin_factory()
    proxy = proxy_factory(config_text=config_text([a.port]))
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        extra = {"name": "extra", "bind": f"tcp:{port}:interface=127.0.0.1"}
        rewrite(proxy.config_path, config_text([b.port], extra_listener=extra))
        failed = reload(proxy, "config.reload_failed")
        assert f"listener.extra.bind: cannot listen on 'tcp:{port}:interface=127.0.0.1'" in (
            failed["error"])
        assert get(proxy.port).status == 200
        assert requests_seen(a) == 1 and requests_seen(b) == 0
    finally:
        taken.close()
    # Once the port is free, the same file applies.
    reloaded = reload(proxy)
    assert reloaded["listeners_added"] == ["extra"]
    assert get(port).status == 200 and requests_seen(b) == 1
