"""
A 1 GB response and a 1 GB request body pass through the real proxy with bounded memory:
flow control pauses the fast side while the slow side drains.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import ProxyFactory
from e2ehelpers import Origin, proc_status_kib

GIB = 1_000_000_000
MEMORY_BOUND_KIB = 100 * 1024  # the proxy's peak RSS may grow by at most this much


def test_one_gigabyte_response_streams_with_bounded_memory(
    origin: Origin, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(origin)
    before = proc_status_kib(proxy.pid)
    out = _download(proxy.port, GIB)
    assert out == f"200 {GIB}"
    grown = proc_status_kib(proxy.pid, "VmHWM") - before
    assert grown < MEMORY_BOUND_KIB, f"peak RSS grew by {grown} KiB for a 1 GB response"


def test_slow_reader_pauses_the_origin_instead_of_buffering(
    origin: Origin, proxy_factory: ProxyFactory
) -> None:
    """A client reading at 40 MB/s from an origin that sends far faster: memory stays flat."""
    proxy = proxy_factory(origin)
    before = proc_status_kib(proxy.pid)
    size = 200_000_000
    started = time.monotonic()
    assert _download(proxy.port, size, "--limit-rate", "40M") == f"200 {size}"
    assert time.monotonic() - started > 3, "the client really was the slow side"
    grown = proc_status_kib(proxy.pid, "VmHWM") - before
    assert grown < 20 * 1024, f"peak RSS grew by {grown} KiB behind a slow reader"


def _download(port: int, size: int, *options: str) -> str:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            *options,
            "-w",
            "%{http_code} %{size_download}",
            f"http://127.0.0.1:{port}/bytes/{size}",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    return out.stdout.decode()


def test_one_gigabyte_request_body_streams_with_bounded_memory(
    origin: Origin, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = proxy_factory(origin)
    before = proc_status_kib(proxy.pid)
    # curl reads the body from a pipe fed by head -c: nothing is held in a file.
    feeder = subprocess.Popen(["head", "-c", str(GIB), "/dev/zero"], stdout=subprocess.PIPE)
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/octet-stream",
            "-H",
            "Expect:",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "@-",
            f"http://127.0.0.1:{proxy.port}/echo",
        ],
        stdin=feeder.stdout,
        capture_output=True,
        timeout=180,
        check=False,
    )
    feeder.wait(timeout=10)
    assert json.loads(out.stdout)["body_len"] == GIB, out.stdout[:500]
    grown = proc_status_kib(proxy.pid, "VmHWM") - before
    assert grown < MEMORY_BOUND_KIB, f"peak RSS grew by {grown} KiB for a 1 GB request body"
