"""End-to-end file descriptor budget (hardening issue, "Descriptors budgeted, so admitted
clients are served").

The real proxy runs under ``prlimit --nofile=200:200`` (a soft and hard limit of 200, so it
cannot raise it) with far more clients than fit. Before the budget, every client the proxy
accepted got 502 "Couldn't bind: 24: Too many open files": the accepted client sockets took
the descriptors their upstream connections needed. Now admissions stop at what fits, the
rest wait in the kernel's backlog, and every client that is answered gets 200."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2ehelpers import (
    LISTENER_DEFAULTS,
    TWISTD,
    ManagedProc,
    Origin,
    Proxy,
    RawConn,
    get,
    make_config,
)

NOFILE = 200
CLIENTS = 400
REQUESTS_PER_CLIENT = 2
#: Long enough that the admitted clients are all busy at once, short enough to stay fast.
ORIGIN_DELAY = 0.1


class LimitedProxy(Proxy):
    """The real proxy started through C{prlimit}: the limit is set before twistd runs, as
    C{ulimit -n} or systemd's C{LimitNOFILE=} would."""

    def __init__(self, config_path: str, cwd: str, nofile: int) -> None:
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise AssertionError("prlimit (util-linux) is not installed")
        self.config_path = config_path
        ManagedProc.__init__(
            self,
            [prlimit, f"--nofile={nofile}:{nofile}", TWISTD, "--nodaemon", "--pidfile=",
             "persistproxy", "--config", config_path],
            cwd=cwd,
        )
        ev = self.wait_event("listener.started", 20)
        if ev is None:
            self.kill()
            raise RuntimeError("proxy did not start:\n" + "\n".join(self.lines()))
        self.port = int(ev["port"])
        self.host = ev.get("host", "127.0.0.1")


@pytest.fixture
def limited_proxy(tmp_path: Path, origin: Origin) -> Iterator[LimitedProxy]:
    listener = dict(
        LISTENER_DEFAULTS,
        # Every client waits in the backlog at once instead of retrying its SYN.
        bind="tcp:0:interface=127.0.0.1:backlog=1024",
        access_log=False,
    )
    path = tmp_path / "persistproxy.toml"
    path.write_text(make_config([f"127.0.0.1:{origin.port}"], listener))
    p = LimitedProxy(str(path), str(tmp_path), NOFILE)
    yield p
    p.terminate(10)
    p.kill()


async def _client(port: int, deadline: float) -> list[int | str]:
    """One keep-alive client: REQUESTS_PER_CLIENT requests on one connection. Returns the
    status of each response, or what ended the connection instead."""
    outcome: list[int | str] = []
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), deadline - time.monotonic()
        )
    except (OSError, TimeoutError) as e:
        return [f"connect: {type(e).__name__}"]
    try:
        for _ in range(REQUESTS_PER_CLIENT):
            writer.write(
                f"GET /slow/{ORIGIN_DELAY} HTTP/1.1\r\nHost: e2e.test\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), deadline - time.monotonic()
            )
            lines = head.decode("latin-1").split("\r\n")
            outcome.append(int(lines[0].split(" ")[1]))
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await asyncio.wait_for(reader.readexactly(length), deadline - time.monotonic())
            if outcome[-1] != 200:
                break
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
        outcome.append(type(e).__name__)
    finally:
        writer.close()
    return outcome


async def _crowd(port: int, n: int, timeout: float) -> list[list[int | str]]:
    deadline = time.monotonic() + timeout
    return await asyncio.gather(*[_client(port, deadline) for _ in range(n)])


def test_more_clients_than_descriptors_every_admitted_one_gets_200(
    limited_proxy: LimitedProxy,
) -> None:
    p = limited_proxy
    short = p.wait_event("descriptors.budget_short", 5)
    assert short is not None, "no start-up warning about the descriptor budget"
    budget = p.wait_event("descriptors.budget", 5)
    assert budget is not None
    print(f"\nbudget at start: {json.dumps(budget)}\nwarning: {json.dumps(short)}")
    assert short["nofile_soft"] == NOFILE and short["max_connections"] == 10000
    fits = short["fits"]
    assert 0 < fits <= (NOFILE - short["reserve"]) // 2

    peak = [0]
    done = threading.Event()

    def sample() -> None:  # the proxy's open descriptors, while the crowd is served
        while not done.wait(0.01):
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], len(os.listdir(f"/proc/{p.pid}/fd")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        outcomes = asyncio.run(_crowd(p.port, CLIENTS, timeout=40))
    finally:
        done.set()
        sampler.join(5)
    elapsed = time.monotonic() - t0
    tally = Counter(o for outcome in outcomes for o in outcome)
    print(f"{CLIENTS} clients x {REQUESTS_PER_CLIENT} requests, {fits} admitted at a time: "
          f"{dict(tally)} in {elapsed:.1f} s; peak descriptors {peak[0]} of {NOFILE}")
    # Every client was answered (the rest of the crowd waited in the backlog, not refused),
    # and every answer is a 200: no 502 "Too many open files", no 503.
    assert tally == {200: CLIENTS * REQUESTS_PER_CLIENT}, tally
    exhausted = [
        e for e in p.events("upstream.connect_failed") if "open files" in str(e.get("reason"))
    ]
    assert exhausted == [], exhausted[:3]
    full = p.events("listener.full")
    assert full and {e["reason"] for e in full} == {"descriptors"}, full[:3]
    print(f"listener.full lines: {len(full)}, open at each: {sorted({e['open'] for e in full})}")

    # The crowd is gone: service goes on without a restart.
    for _ in range(3):
        r = get(p.port, "/echo")
        assert r.status == 200, r


def _wait_events(p: Proxy, name: str, n: int, timeout: float = 5) -> list[dict[str, Any]]:
    """The proxy's C{name} events once there are C{n} (its output is read by a thread)."""
    deadline = time.monotonic() + timeout
    while len(p.events(name)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return p.events(name)


def _lowest_free_descriptor(pid: int) -> int:
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_exhausted_anyway_admitted_clients_get_503_and_service_recovers(
    limited_proxy: LimitedProxy,
) -> None:
    """
    Descriptors run out behind the budget's back (the soft limit is lowered while the proxy
    runs, to the lowest free descriptor: the next socket() fails with EMFILE). Admitted
    clients whose request needs a new upstream connection get 503 with Retry-After and keep
    their connection; a new client waits in the backlog while the port backs off (no busy
    loop); once some clients leave, everything is served again, with nothing restarted.
    """
    p = limited_proxy
    clients = [RawConn(p.port) for _ in range(10)]
    try:
        for c in clients:  # one after the other: one upstream connection, idle in the pool
            assert c.roundtrip("GET", "/echo").status == 200
        limit = _lowest_free_descriptor(p.pid)
        prlimit = shutil.which("prlimit")
        assert prlimit is not None
        subprocess.run([prlimit, "--pid", str(p.pid), f"--nofile={limit}:{NOFILE}"], check=True)

        for c in clients:
            c.request("GET", "/slow/0.2")
        answers = [c.read_response(timeout=5) for c in clients]
        statuses = Counter(r.status for r in answers)
        assert statuses == {200: 1, 503: 9}, statuses  # the idle connection served one
        for r in answers:
            if r.status == 503:
                assert r.get("Retry-After") == "1", r
                assert "close" not in r.tokens("Connection"), "the client may retry on it"
        failed = _wait_events(p, "upstream.connect_failed", 9)
        assert len(failed) == 9 and all(e["out_of_descriptors"] for e in failed), failed[:2]

        late = RawConn(p.port)  # the kernel completes the handshake: it waits in the backlog
        clients.append(late)
        late.request("GET", "/echo")
        cpu0 = _cpu_seconds(p.pid)
        # Neither answered nor dropped (Twisted's own recovery accepts and closes every
        # waiting client): it waits.
        with pytest.raises(TimeoutError):
            late.read_response(timeout=1.0)
        cpu = _cpu_seconds(p.pid) - cpu0
        print(f"\nproxy CPU while accept() fails with EMFILE: {cpu:.2f} s in 1 s")
        assert cpu < 0.5, "accept() is retried in a busy loop"
        assert p.wait_line(lambda s: "EMFILE" in s and "accept()" in s, 5), "no accept warning"

        for c in clients[:5]:  # some clients leave: their descriptors free
            c.close()
        r = late.read_response(timeout=5)
        assert r.status == 200, r
        for c in clients[5:10]:  # those answered 503 retry, on the same connection
            r = c.roundtrip("GET", "/echo")
            assert r.status == 200, r
        assert p.wait_line(lambda s: "accept()" in s and "works again" in s, 5)
    finally:
        for c in clients:
            c.close()
