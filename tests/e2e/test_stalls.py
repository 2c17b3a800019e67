"""End-to-end stalls and minimum rates: an origin that goes silent in the middle of its
response (upstream ``read_timeout``) or stops reading a request body (``write_timeout``), and
slowhttptest's slow-body (``-B``) and slow-read (``-X``) attacks against ``min_body_rate`` and
``min_send_rate``, while a normal client keeps getting 200s.

The real proxy (``twistd -n persistproxy``) runs in front of the real test origin
(tests/e2e/origin.py). Every timeout that should not be the one acting is set far beyond the
test's length, so that the test fails if the new limit does not act; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2ehelpers import Closed, Origin, Proxy, RawConn, build_request

ProxyFactory = Callable[..., Proxy]


def _events(p: Proxy, name: str, at_least: int = 1, timeout: float = 5.0,
            pred: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[dict[str, Any]]:
    """The proxy's events called C{name}, waiting (bounded) for C{at_least} of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in p.events(name) if pred(e)]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _access(p: Proxy, path: str) -> list[dict[str, Any]]:
    return _events(p, "access", 1, 3, lambda e: e.get("path") == path)


# ==============================================================================================
# An origin that stalls
# ==============================================================================================

def test_an_origin_silent_mid_response_is_cut_at_read_timeout(
        origin_factory: Callable[..., Origin], proxy_factory: ProxyFactory) -> None:
    """The origin sends its head and half its body, then nothing: without read_timeout the
    client would wait as long as the origin likes (response_timeout covers the head only)."""
    origin = origin_factory()
    p = proxy_factory(origin, upstream={"read_timeout": 1, "response_timeout": 30})
    with RawConn(p.port, timeout=10) as c:
        t0 = time.monotonic()
        c.request("GET", "/stall/100000")
        head = c.read_head()
        assert head.status == 200 and head.get("content-length") == "200000"
        got = 0
        with pytest.raises(Closed):
            while True:  # the half that comes, then the cut
                got += len(c.buf)
                c.buf.clear()
                c._fill(time.monotonic() + 10)
        cut_after = time.monotonic() - t0
    print(f"\nclient cut {cut_after:.2f} s after its request (read_timeout = 1 s), "
          f"having received {got} of 200000 body bytes")
    assert got == 100000
    [event] = _events(p, "upstream.read_timeout")
    assert (event["timeout"], event["status"]) == (1, None)
    assert event["received"] > 100000 and event["sent"] > 100000
    [line] = _access(p, "/stall/100000")
    assert (line["status"], line["aborted"]) == (200, "timeout")
    deadline = time.monotonic() + 5
    while origin.stats()["stalls_cut"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert origin.stats()["stalls_cut"] == 1, "the upstream connection was let go"
    with RawConn(p.port) as c:
        assert c.roundtrip("GET", "/echo").status == 200


def test_an_origin_that_stops_reading_the_body_gets_a_504_at_write_timeout(
        origin_factory: Callable[..., Origin], proxy_factory: ProxyFactory) -> None:
    """The origin reads the head of a 64 MiB upload and then nothing: the buffers between
    fill, the proxy stops reading the client, and write_timeout answers 504."""
    origin = origin_factory()
    p = proxy_factory(origin, upstream={"write_timeout": 1, "response_timeout": 30},
                      listener={"body_timeout": 30})
    size = 64 << 20
    with RawConn(p.port, timeout=10) as c:
        c.send(build_request("POST", "/unread", [("Content-Length", str(size))]))
        sent = [0]

        def upload() -> None:
            piece = b"u" * 65536
            with contextlib.suppress(OSError):
                while sent[0] < size:
                    c.sock.sendall(piece)
                    sent[0] += len(piece)

        uploader = threading.Thread(target=upload, daemon=True)
        t0 = time.monotonic()
        uploader.start()
        resp = c.read_response("POST", timeout=10)
        answered = time.monotonic() - t0
        c.close()
        uploader.join(10)
    print(f"\n504 after {answered:.2f} s (write_timeout = 1 s), the client had sent "
          f"{sent[0] >> 20} MiB of {size >> 20} MiB")
    assert resp.status == 504 and "close" in resp.tokens("connection")
    assert sent[0] < size, "the proxy stopped reading the client"
    [event] = _events(p, "upstream.write_timeout")
    assert (event["timeout"], event["status"], event["received"]) == (1, 504, 0)
    [line] = _access(p, "/unread")
    assert line["status"] == 504
    assert origin.stats()["unread"] == 1
    with RawConn(p.port) as c:
        assert c.roundtrip("GET", "/echo").status == 200


# ==============================================================================================
# slowhttptest: slow body (-B) and slow read (-X) against the minimum rates
# ==============================================================================================

def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed (scripts/system-deps.sh installs it)")


class NormalClient:
    """Sequential GETs in a thread, alternately on a kept-alive and on a new connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NormalClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        kept: RawConn | None = None
        n = 0
        while not self._stop.is_set():
            n += 1
            t0 = time.monotonic()
            try:
                if n % 2:
                    with RawConn(self.port, timeout=5) as c:
                        r = c.roundtrip("GET", f"/echo?n={n}")
                else:
                    if kept is None:
                        kept = RawConn(self.port, timeout=5)
                    r = kept.roundtrip("GET", f"/echo?n={n}")
                self.latencies.append(time.monotonic() - t0)
                if r.status != 200:
                    self.failures.append(f"#{n}: {r.status}")
            except Exception as e:  # any failure of a normal request is a test failure
                self.failures.append(f"#{n}: {e!r}")
                if kept is not None:
                    kept.close()
                    kept = None
            self._stop.wait(0.02)
        if kept is not None:
            kept.close()

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        if not lat:
            return {"requests": 0}
        return {"requests": len(lat), "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
                "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2),
                "max_ms": round(lat[-1] * 1000, 2)}


def _run_slowhttptest(argv: list[str], out: Path, seconds: float,
                      origin: Origin) -> tuple[str, list[tuple[float, int]]]:
    """Run slowhttptest to its end (C{seconds} at most); meanwhile sample every 0.5 s how
    many connections the origin has open: the upstream connections the attack holds."""
    proc = subprocess.Popen(["slowhttptest", *argv, "-g", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    try:
        while True:
            try:
                output, _ = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() - t0 > seconds:
                    raise
                samples.append((round(time.monotonic() - t0, 1), origin.stats()["open"]))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 0, f"slowhttptest: {output[-2000:]}"
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output), samples


def _held(samples: list[tuple[float, int]], after: float) -> tuple[int, int]:
    """The most upstream connections open at any sample, and at any sample after C{after} s
    (0 if the attack was over by then: slowhttptest stops when none of its connections is
    left)."""
    return max(n for _, n in samples), max([n for t, n in samples if t >= after], default=0)


def _csv_rows(path: Path) -> list[dict[str, int]]:
    with path.open() as f:
        return [{k.strip(): int(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture
def rate_proxy(origin: Origin, proxy_factory: ProxyFactory) -> Iterator[Proxy]:
    """A proxy with both minimum rates at 1 KiB/s over 2 s, every silence timeout at 30 s."""
    yield proxy_factory(origin, listener={
        "min_body_rate": 1024, "min_body_rate_window": 2,
        "min_send_rate": 1024, "min_send_rate_window": 2,
        "header_timeout": 30, "body_timeout": 30, "send_timeout": 30,
    })


def test_slow_body_below_min_body_rate_gets_408_while_normal_clients_are_served(
        origin: Origin, rate_proxy: Proxy, tmp_path: Path) -> None:
    """slowhttptest -B: 200 POSTs announcing 64 KiB and sending ~24 bytes a second. Each
    upload holds an upstream connection; body_timeout (30 s, silence) would never cut them
    within the test; min_body_rate does, after its 2 s window."""
    _require("slowhttptest")
    p = rate_proxy
    with NormalClient(p.port) as client:
        time.sleep(0.3)
        text, samples = _run_slowhttptest(
            ["-B", "-c", "200", "-r", "100", "-i", "1", "-l", "6", "-x", "24", "-s", "65536",
             "-p", "3", "-u", f"http://127.0.0.1:{p.port}/echo"],
            tmp_path / "slowbody", 30, origin)
        time.sleep(0.3)
    print(f"\nnormal client under slow body: {client.summary()}")
    print(f"upstream connections open at the origin during the attack (s, open): {samples}")
    peak, late = _held(samples, 5.5)
    print(f"peak {peak}, from 5.5 s on at most {late}")
    assert peak >= 100, "the slow uploads did reach the origin"
    assert late <= 30, "uploads below min_body_rate let their upstream connections go"
    assert not client.failures, client.failures[:10]
    assert len(client.latencies) >= 50
    assert re.search(r"service available:\s*YES", text) and not re.search(
        r"service available:\s*NO", text), text[-1500:]
    rows = _csv_rows(tmp_path / "slowbody.csv")
    assert max(row["Closed"] for row in rows) >= 150, rows
    events = _events(p, "client.min_body_rate", 150)
    assert len(events) >= 150, f"only {len(events)} client.min_body_rate events"
    rates = sorted(e["rate"] for e in events)
    print(f"client.min_body_rate: {len(events)} events, measured rates {rates[0]}.."
          f"{rates[-1]} B/s over {min(e['seconds'] for e in events)}.."
          f"{max(e['seconds'] for e in events)} s")
    assert all(e["rate"] < 1024 and e["seconds"] >= 2 for e in events)
    assert not [e for e in p.events("client.timeout") if e.get("phase") == "body"], (
        "body_timeout acted, not min_body_rate")
    cut = [a for a in p.events("access") if a.get("status") == 408 and a.get("path") == "/echo"]
    assert len(cut) >= 150


def test_slow_read_below_min_send_rate_is_cut_while_normal_clients_are_served(
        origin: Origin, rate_proxy: Proxy, tmp_path: Path) -> None:
    """slowhttptest -X: 100 connections each asking for 1 MiB three times over, advertising a
    receive window of 512 to 1024 bytes and reading 32 bytes a second. Each holds an
    upstream connection paused mid-response; send_timeout (30 s) would not cut them within
    the test, min_send_rate does after 2 s of stalls."""
    _require("slowhttptest")
    p = rate_proxy
    with NormalClient(p.port) as client:
        time.sleep(0.3)
        text, samples = _run_slowhttptest(
            ["-X", "-c", "100", "-r", "50", "-l", "6", "-w", "512", "-y", "1024", "-n", "1",
             "-z", "32", "-k", "3", "-p", "3",
             "-u", f"http://127.0.0.1:{p.port}/bytes/1048576"],
            tmp_path / "slowread", 30, origin)
        time.sleep(0.3)
    peak, late = _held(samples, 5.5)
    print(f"\nnormal client under slow read: {client.summary()}")
    print(f"upstream connections open at the origin during the attack (s, open): {samples}")
    print(f"peak {peak}, from 5.5 s on at most {late}")
    assert not client.failures, client.failures[:10]
    assert len(client.latencies) >= 50
    assert not re.search(r"service available:\s*NO", text), text[-1500:]
    # slowhttptest itself does not see these resets while it has bytes left to read slowly;
    # the origin does: the connections the attack held are let go.
    assert peak >= 50, "the slow reads did hold upstream connections"
    assert late <= 30, "readers below min_send_rate let their upstream connections go"
    events = _events(p, "client.min_send_rate", 80)
    assert len(events) >= 80, f"only {len(events)} client.min_send_rate events"
    print(f"client.min_send_rate: {len(events)} events, measured rates "
          f"{min(e['rate'] for e in events)}..{max(e['rate'] for e in events)} B/s")
    assert all(e["rate"] < 1024 and e["seconds"] >= 2 for e in events)
    assert not p.events("client.send_timeout"), "send_timeout acted, not min_send_rate"
    cut = [a for a in p.events("access")
           if a.get("path") == "/bytes/1048576" and a.get("aborted") == "timeout"]
    assert len(cut) >= 80


def test_clients_at_a_decent_rate_are_not_cut(
        origin: Origin, rate_proxy: Proxy) -> None:
    """Under the same limits, an upload at 64 KiB/s in bursts and a download read at
    128 KiB/s through a small receive buffer complete, window after window."""
    p = rate_proxy
    body = b"b" * (192 << 10)
    with RawConn(p.port, timeout=15) as c:
        c.send(build_request("POST", "/echo", [("Content-Length", str(len(body)))]))
        for i in range(0, len(body), 16384):
            c.send(body[i:i + 16384])
            time.sleep(0.25)
        resp = c.read_response("POST")
        assert resp.status == 200 and resp.json()["body_len"] == len(body)
    size = 512 << 10
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(15)
    sock.connect(("127.0.0.1", p.port))
    try:
        sock.sendall(build_request("GET", f"/bytes/{size}"))
        got = 0
        t0 = time.monotonic()
        while got < size + 100:  # the body and a head
            data = sock.recv(16384)
            if not data:
                break
            got += len(data)
            time.sleep(0.125 * len(data) / 16384)  # 128 KiB/s
        took = time.monotonic() - t0
    finally:
        sock.close()
    print(f"\n{size >> 10} KiB read at ~128 KiB/s in {took:.1f} s: {got} bytes with the head")
    assert got > size, "the download completed"
    # A reader at 4 KiB/s, 4 times the minimum, for 5 s: the kernel's send buffer holds far
    # more than that (about a megabyte on loopback) and wakes us only now and then, so what
    # it took must be measured at its TCP, not at our buffer.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(15)
    sock.connect(("127.0.0.1", p.port))
    try:
        sock.sendall(build_request("GET", "/bytes/8388608"))
        slow = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            data = sock.recv(512)
            assert data, f"cut after {time.monotonic() - t0:.1f} s reading at 4 KiB/s"
            slow += len(data)
            time.sleep(0.125)
    finally:
        sock.close()
    print(f"read {slow} bytes at ~4 KiB/s for 5 s, not cut")
    assert not p.events("client.min_send_rate") and not p.events("client.min_body_rate")
    assert all("aborted" not in a for a in _access(p, "/echo"))
