"""
The Redis plugin (examples/redis, installed into the venv as its own distribution) end to end:
the real `twistd persistproxy` with a `protocol = "redis"` listener in front of a real
redis-server, driven by redis-cli, redis-benchmark and raw sockets.

What is shown: commands and pipelines answered in order; many short-lived clients served by a
few server connections (the server's own counters); connection state (SELECT, CLIENT
SETNAME, MULTI, SUBSCRIBE, BLPOP) pinned to its client and never seen by another; the
proxy's errors for what it does not support, without a hang.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
from e2ehelpers import TWISTD, ManagedProc, Proxy, free_port
from pki import make_pki

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
REDIS_BENCHMARK = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
MORE = object()


class RedisServer(ManagedProc):
    """A throwaway redis-server on a free loopback port, persisting nothing."""

    name = "redis-server"

    def __init__(self) -> None:
        if not Path(REDIS_SERVER).exists():
            pytest.fail("redis-server is missing: `make system-deps` installs it")
        self.port = free_port()  # redis cannot listen on port 0 and tell
        super().__init__(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--loglevel", "notice",
            ]
        )  # fmt: skip
        if self.wait_line(lambda line: "Ready to accept connections" in line, 15) is None:
            self.kill()
            raise RuntimeError(f"redis-server did not start: {self.all_output()}")

    def info(self, section: str) -> dict[str, str]:
        with Resp(self.port) as r:
            text = r.call("INFO", section).decode()
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line and line[0] != "#"
        )


class Resp:
    """A raw RESP client: commands out as hiredis encodes them, replies parsed by hiredis."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = hiredis.Reader(notEnoughData=MORE)

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, *commands: tuple[Any, ...]) -> None:
        self.sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> Any:
        while True:
            reply = self.reader.gets()
            if reply is not MORE:
                return reply
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the proxy")
            self.reader.feed(data)

    def call(self, *args: Any) -> Any:
        self.send(args)
        return self.read()

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def proxy(redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    d = tmp_path_factory.mktemp("redis-proxy")
    path = d / "persistproxy.toml"
    path.write_text(
        f"""
drain_timeout = 5

[[listener]]
name = "cache"
bind = "tcp:0:interface=127.0.0.1"
protocol = "redis"
upstream = "redis"

[[upstream]]
name = "redis"
servers = ["127.0.0.1:{redis.port}"]
"""
    )
    p = Proxy(str(path), cwd=str(d), listener="cache")
    yield p
    p.terminate(10)
    p.kill()


def cli(port: int, *args: str, stdin: bytes | None = None, timeout: float = 30) -> str:
    out = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().strip()


def connections_received(redis: RedisServer) -> int:
    return int(redis.info("stats")["total_connections_received"])


def proxy_clients(redis: RedisServer) -> list[dict[str, str]]:
    """The server's view of its clients, without the connection asking."""
    with Resp(redis.port) as r:
        me = r.call("CLIENT", "ID")
        text = r.call("CLIENT", "LIST").decode()
    clients = [
        dict(f.split("=", 1) for f in line.split(" ") if "=" in f) for line in text.splitlines()
    ]
    return [c for c in clients if int(c["id"]) != me]


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- the plugin is installed as its own distribution -----------------------------------------


def test_the_redis_protocol_is_listed() -> None:
    out = subprocess.run(
        [TWISTD, "persistproxy", "--list-protocols"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = {line.split()[0] for line in out.stdout.splitlines()}
    assert "redis" in names, "make venv installs ./examples/redis into the venv"


# -- commands -----------------------------------------------------------------------------


def test_redis_cli_sets_and_gets_through_the_proxy(proxy: Proxy, redis: RedisServer) -> None:
    assert cli(proxy.port, "SET", "e2e:greeting", "hello world") == "OK"
    assert cli(proxy.port, "GET", "e2e:greeting") == "hello world"
    assert cli(redis.port, "GET", "e2e:greeting") == "hello world", "it reached the server"
    assert cli(proxy.port, "PING") == "PONG"


def test_a_pipeline_is_answered_in_order(proxy: Proxy) -> None:
    with Resp(proxy.port) as r:
        r.send(("DEL", "e2e:counter"), *[("INCR", "e2e:counter")] * 500, ("GET", "e2e:counter"))
        replies = [r.read() for _ in range(502)]
    assert replies[1:501] == list(range(1, 501)) and replies[501] == b"500"


def test_redis_cli_pipe_mode(proxy: Proxy) -> None:
    stdin = b"".join(
        hiredis.pack_command(("SET", f"e2e:pipe:{i}", f"value {i}")) for i in range(2000)
    )
    out = cli(proxy.port, "--pipe", stdin=stdin)
    assert "errors: 0, replies: 2000" in out, out
    assert cli(proxy.port, "GET", "e2e:pipe:1999") == "value 1999"


def test_inline_commands(proxy: Proxy) -> None:
    with Resp(proxy.port) as r:
        r.send_raw(b"SET e2e:inline v1\r\nGET e2e:inline\r\n")
        assert (r.read(), r.read()) == (b"OK", b"v1")
        r.send_raw(hiredis.pack_command(("APPEND", "e2e:inline", "+")) + b"GET e2e:inline\r\n")
        assert (r.read(), r.read()) == (3, b"v1+")


def test_a_transaction(proxy: Proxy) -> None:
    with Resp(proxy.port) as r, Resp(proxy.port) as other:
        r.send(("DEL", "e2e:tx"), ("MULTI",), ("INCR", "e2e:tx"), ("INCRBY", "e2e:tx", "10"))
        assert [r.read() for _ in range(4)] == [0, b"OK", b"QUEUED", b"QUEUED"]
        assert other.call("GET", "e2e:tx") is None, "not run before EXEC"
        assert r.call("EXEC") == [1, 11]
        assert other.call("GET", "e2e:tx") == b"11"


def test_unsupported_commands_get_an_error_and_no_hang(proxy: Proxy) -> None:
    with Resp(proxy.port, timeout=5) as r:
        r.send(("SET", "e2e:u", "1"), ("MONITOR",), ("GET", "e2e:u"), ("SYNC",), ("PING",))
        replies = [r.read() for _ in range(5)]
    assert replies[0] == b"OK" and replies[2] == b"1" and replies[4] == b"PONG"
    for error in (replies[1], replies[3]):
        assert isinstance(error, hiredis.ReplyError)
        assert str(error) == "ERR persistproxy: command not supported by this proxy"


def test_hello_3_is_refused_and_hello_2_answers(proxy: Proxy) -> None:
    with Resp(proxy.port) as r:
        refused = r.call("HELLO", "3")
        assert isinstance(refused, hiredis.ReplyError) and str(refused).startswith("NOPROTO")
        hello = r.call("HELLO", "2")
        assert b"proto" in hello and hello[hello.index(b"proto") + 1] == 2


# -- a few server connections for many clients -----------------------------------------------


def test_many_short_lived_clients_use_a_few_server_connections(
    proxy: Proxy, redis: RedisServer
) -> None:
    before = connections_received(redis)
    errors: list[str] = []
    per_thread, threads = 40, 8

    def work(n: int) -> None:
        for i in range(per_thread):
            try:
                with Resp(proxy.port) as r:
                    key = f"e2e:short:{n}:{i}"
                    r.send(("SET", key, str(i)), ("GET", key))
                    if (r.read(), r.read()) != (b"OK", str(i).encode()):
                        errors.append(key)
            except OSError as e:
                errors.append(repr(e))

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    used = connections_received(redis) - before - 1  # less the INFO connection itself
    clients = per_thread * threads
    print(f"\n{clients} client connections through the proxy opened {used} server connections")
    assert errors == []
    assert used <= threads + 2, f"{used} server connections for {clients} clients"
    proxied = [c for c in proxy_clients(redis) if c["cmd"] != "client|list"]
    assert len(proxied) <= threads + 2


def test_redis_benchmark_through_the_proxy(proxy: Proxy, redis: RedisServer) -> None:
    before = connections_received(redis)
    out = subprocess.run(
        [REDIS_BENCHMARK, "-h", "127.0.0.1", "-p", str(proxy.port), "-q", "-n", "2000",
         "-c", "20", "-P", "4"],
        capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    text = out.stdout.decode(errors="replace").replace("\r", "\n")
    assert out.returncode == 0, (text, out.stderr)
    results = [line for line in text.splitlines() if "requests per second" in line]
    print("\n" + "\n".join(results))
    tests = {line.split(":")[0] for line in results}
    assert {"PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "LPUSH", "MSET (10 keys)"} <= tests
    assert "rror" not in text + out.stderr.decode(errors="replace"), text
    used = connections_received(redis) - before
    print(f"redis-benchmark: {len(results)} tests x 20 clients, {used} server connections")


# -- connection state stays with its client ---------------------------------------------------


def test_a_selected_database_never_leaks_to_another_client(
    proxy: Proxy, redis: RedisServer
) -> None:
    cli(redis.port, "-n", "0", "DEL", "e2e:db")
    with Resp(proxy.port) as a:
        assert a.call("SELECT", "1") == b"OK"
        assert a.call("SET", "e2e:db", "in db 1") == b"OK"
        for _ in range(20):  # others meanwhile, on pooled connections: db 0
            with Resp(proxy.port) as other:
                assert other.call("GET", "e2e:db") is None
        assert a.call("GET", "e2e:db") == b"in db 1"
    # Gone: its connection is RESET (back to db 0) before any other client borrows it.
    for _ in range(20):
        with Resp(proxy.port) as other:
            assert other.call("GET", "e2e:db") is None
    assert cli(redis.port, "-n", "1", "GET", "e2e:db") == "in db 1"
    assert wait_for(lambda: all(c["db"] == "0" for c in proxy_clients(redis)))


def test_a_client_name_never_leaks_to_another_client(proxy: Proxy, redis: RedisServer) -> None:
    with Resp(proxy.port) as a:
        assert a.call("CLIENT", "SETNAME", "e2e-leaky") == b"OK"
        assert a.call("CLIENT", "GETNAME") == b"e2e-leaky"
        with Resp(proxy.port) as other:
            assert other.call("CLIENT", "GETNAME") is None
    assert wait_for(lambda: all(c["name"] != "e2e-leaky" for c in proxy_clients(redis)))
    for _ in range(10):
        with Resp(proxy.port) as other:
            assert other.call("CLIENT", "GETNAME") is None


def test_a_subscriber_gets_what_is_published_and_its_connection_goes_with_it(
    proxy: Proxy, redis: RedisServer
) -> None:
    with Resp(proxy.port) as sub:
        sub.send(("SUBSCRIBE", "e2e:news"))
        assert sub.read() == [b"subscribe", b"e2e:news", 1]
        assert cli(proxy.port, "PUBLISH", "e2e:news", "hello") == "1"
        assert sub.read() == [b"message", b"e2e:news", b"hello"]
        assert cli(proxy.port, "PUBLISH", "e2e:news", "again") == "1"
        assert sub.read() == [b"message", b"e2e:news", b"again"]
    assert wait_for(lambda: cli(redis.port, "PUBSUB", "NUMSUB", "e2e:news").endswith("0"))
    assert cli(proxy.port, "PUBLISH", "e2e:news", "nobody") == "0"


def test_a_blocked_client_keeps_its_connection_and_does_not_hold_up_others(
    proxy: Proxy, redis: RedisServer
) -> None:
    cli(redis.port, "DEL", "e2e:queue")
    with Resp(proxy.port) as blocked:
        blocked.send(("BLPOP", "e2e:queue", "10"))
        assert wait_for(lambda: redis.info("clients")["blocked_clients"] == "1")
        for _ in range(20):
            with Resp(proxy.port, timeout=5) as other:
                assert other.call("PING") == b"PONG"
        assert cli(proxy.port, "LPUSH", "e2e:queue", "job") == "1"
        assert blocked.read() == [b"e2e:queue", b"job"]


def test_a_blocked_client_that_leaves_takes_its_server_connection_along(
    proxy: Proxy, redis: RedisServer
) -> None:
    """Were the blocked connection pooled, its BLPOP would still take the next item."""
    cli(redis.port, "DEL", "e2e:orphan")
    with Resp(proxy.port) as blocked:
        blocked.send(("BLPOP", "e2e:orphan", "0"))
        assert wait_for(lambda: redis.info("clients")["blocked_clients"] == "1")
    assert wait_for(lambda: redis.info("clients")["blocked_clients"] == "0")
    assert cli(proxy.port, "RPUSH", "e2e:orphan", "item") == "1"
    time.sleep(0.1)
    assert cli(redis.port, "LLEN", "e2e:orphan") == "1"


def test_protocol_errors_close_the_client_after_an_error(proxy: Proxy) -> None:
    with Resp(proxy.port) as r:
        r.send_raw(hiredis.pack_command(("PING",)) + b"*1\r\n:1\r\n")
        assert r.read() == b"PONG"
        error = r.read()
        assert isinstance(error, hiredis.ReplyError) and "Protocol error" in str(error)
        assert r.closed()


def test_each_client_connection_has_an_access_line(proxy: Proxy) -> None:
    commands = [("SELECT", "2"), *[("SET", f"e2e:log:{i}", "x") for i in range(6)]]
    with Resp(proxy.port) as r:
        r.send(*commands)
        assert [r.read() for _ in commands] == [b"OK"] * 7
    line = proxy.wait_event(
        "access", 5, lambda e: e.get("protocol") == "redis" and e.get("commands") == 7
    )
    assert line is not None
    assert line["pinned"] == "SELECT" and line["reason"] == "client_closed"
    assert line["bytes_up"] == sum(len(hiredis.pack_command(c)) for c in commands)
    assert line["listener"] == "cache" and line["client"] == "127.0.0.1"


def test_tls_termination_and_the_drain(redis: RedisServer, tmp_path: Path) -> None:
    """The listener's services, as for any plugin: TLS in front, a graceful drain at SIGTERM
    (a subscriber and an idle client are closed at once, the proxy exits 0)."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    cert, key = pki.site
    path = tmp_path / "persistproxy.toml"
    path.write_text(
        f"""
[[listener]]
name = "secure"
bind = "tcp:0:interface=127.0.0.1"
protocol = "redis"
upstream = "redis"
[listener.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]

[[upstream]]
name = "redis"
servers = ["127.0.0.1:{redis.port}"]
"""
    )
    p = Proxy(str(path), cwd=str(tmp_path), listener="secure")
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
        raw = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="site.test") as s:
            s.sendall(hiredis.pack_command(("SET", "e2e:tls", "secret")) + b"GET e2e:tls\r\n")
            reader = hiredis.Reader(notEnoughData=MORE)
            replies: list[Any] = []
            while len(replies) < 2:
                reader.feed(s.recv(4096))
                while (reply := reader.gets()) is not MORE:
                    replies.append(reply)
            assert replies == [b"OK", b"secret"]
        with Resp(p.port) as plain:
            # The listener tells plain text by a first byte A-Z (an inline command here; a
            # RESP array's "*" just fails the handshake).
            plain.send_raw(b"PING\r\n")
            error = plain.read()
            assert isinstance(error, hiredis.ReplyError) and "expects TLS" in str(error)
        with Resp(p.port) as sub, Resp(p.port) as idle:
            for r in (sub, idle):
                r.sock = ctx.wrap_socket(r.sock, server_hostname="site.test")
            sub.send(("SUBSCRIBE", "e2e:drain"))
            assert sub.read() == [b"subscribe", b"e2e:drain", 1]
            assert idle.call("PING") == b"PONG"
            os.kill(p.pid, signal.SIGTERM)
            assert sub.closed() and idle.closed()
        assert p.proc.wait(10) == 0
        assert p.events("drain.finished")
    finally:
        p.terminate(5)
        p.kill()


def test_nothing_went_wrong_inside_the_proxy(proxy: Proxy) -> None:
    """Last in this module: no traceback and no error event in all the proxy logged."""
    bad = [e for e in proxy.events() if "traceback" in e or e.get("level") in ("error", "critical")]
    assert bad == []
    assert not [line for line in proxy.lines() if "Traceback" in line]
