"""
The redis protocol plugin in memory (StringTransport, Clock): commands lent to pooled server
connections and back, pipelines in order, pinning for connection state and how a pinned
connection is cleaned (RESET) or closed, the proxy's own errors in their place, inline
commands, flow control, timeouts, the drain and the access line.

Server replies are written by hand into the upstream connections, so each test says exactly
what the server answered and checks exactly what the proxy sent.
"""

from __future__ import annotations

import io
import json
import tomllib
from typing import Any

import hiredis
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

import persistproxy_redis
from persistproxy.config import ConfigError, ListenerConfig, UpstreamConfig, parse_config
from persistproxy.interfaces import DrainAware, IProtocolPlugin, ProxyContext, TLSAware
from persistproxy.logs import AccessLog, make_event_log
from persistproxy.metrics import ListenerStats
from persistproxy.upstream.group import Server, UpstreamGroup
from persistproxy_redis import commands as C
from persistproxy_redis.commands import NOT_SUPPORTED
from persistproxy_redis.plugin import RedisProtocolPlugin
from persistproxy_redis.session import RedisSession
from persistproxy_redis.upstream import RedisConnector, RedisUpstream


def cmd(*args: str | bytes) -> bytes:
    """A command as a client sends it."""
    return bytes(hiredis.pack_command(tuple(a.encode() if isinstance(a, str) else a for a in args)))


class Transport(StringTransport):
    """Records aborts and the reading state a protocol asked for."""

    aborted = False
    reading = True

    def __init__(self, peer: Any = None) -> None:
        super().__init__(peerAddress=peer)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def take(self) -> bytes:
        data = self.value()
        self.clear()
        return data


class Harness:
    """A redis listener over an in-memory upstream group; connects by hand when asked."""

    def __init__(self, upstream: dict[str, Any] | None = None, **extra: Any) -> None:
        self.clock = Clock()
        self.out = io.StringIO()
        log = make_event_log(self.out, "debug")
        self.config = UpstreamConfig(
            name="redis", servers=(("127.0.0.1", 6379),), **(upstream or {})
        )
        self.stats = ListenerStats()
        self.connections: list[RedisUpstream] = []
        self.manual: list[tuple[Deferred[RedisUpstream], Any]] | None = None
        self.refuse = False
        self.groups: list[UpstreamGroup[Any]] = []

        def upstream_group(name: str, connector: Any) -> UpstreamGroup[Any]:
            assert name == "redis" and connector == RedisConnector(self.clock)
            group: UpstreamGroup[Any] = UpstreamGroup(
                self.clock,
                self.config,
                [Server("127.0.0.1", 6379, None)],  # type: ignore[arg-type]
                log,
                lambda server: self._dialer(connector.factory_for(server, self.config)),
            )
            self.groups.append(group)
            return group

        self.context = ProxyContext(
            reactor=self.clock,
            clock=self.clock,
            log=log,
            access_log=AccessLog(self.clock, self.out, buffer_size=0),
            _upstream=upstream_group,
            _limits={},
            _stats=lambda name: self.stats,
            _draining=lambda: False,
        )
        self.listener = ListenerConfig(
            name="cache", bind="tcp:0", protocol="redis", upstream="redis", extra=extra
        )
        RedisProtocolPlugin().validate(self.listener)
        self.factory = RedisProtocolPlugin().build_factory(self.listener, self.context)

    def _dialer(self, factory: Any) -> Any:
        def dial() -> Deferred[RedisUpstream]:
            if self.refuse:
                return fail(ConnectionRefusedError("connection refused"))
            if self.manual is not None:
                d: Deferred[RedisUpstream] = Deferred()
                self.manual.append((d, factory))
                return d
            return succeed(self._made(factory))

        return dial

    def _made(self, factory: Any) -> RedisUpstream:
        connection: RedisUpstream = factory.buildProtocol(None)
        connection.makeConnection(Transport())
        self.connections.append(connection)
        return connection

    def answer_connect(self) -> RedisUpstream:
        assert self.manual
        d, factory = self.manual.pop(0)
        connection = self._made(factory)
        d.callback(connection)
        return connection

    @property
    def pool(self) -> Any:
        return self.groups[0].pools[0]

    def client(self) -> tuple[RedisSession, Transport]:
        address = IPv4Address("TCP", "10.1.2.3", 5555)
        session = self.factory.buildProtocol(address)
        transport = Transport(address)
        session.makeConnection(transport)
        return session, transport

    def access(self) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in self.out.getvalue().splitlines())
        return [line for line in lines if line.get("event") == "access"]


def up(connection: RedisUpstream) -> Transport:
    transport: Transport = connection.transport  # type: ignore[assignment]
    return transport


def lost(protocol: Any, error: type[Exception] = ConnectionDone) -> None:
    protocol.connectionLost(Failure(error()))


# -- the plugin and its keys -------------------------------------------------------------------


def test_the_plugin_provides_the_interface_and_its_protocol_is_drain_and_tls_aware() -> None:
    plugin = RedisProtocolPlugin()
    verifyObject(IProtocolPlugin, plugin)
    assert plugin.name == "redis"
    assert plugin.refusal("too many connections from your address") == (
        b"-ERR persistproxy: too many connections from your address\r\n"
    )
    assert plugin.plaintext_answer.startswith(b"-ERR ")
    session, _ = Harness().client()
    assert isinstance(session, DrainAware) and isinstance(session, TLSAware)


def _parse(listener: str) -> Any:
    document = tomllib.loads(
        f"""
[[listener]]
name = "cache"
bind = "tcp:0"
protocol = "redis"
{listener}

[[upstream]]
name = "redis"
servers = ["127.0.0.1:6379"]
"""
    )
    plugin = RedisProtocolPlugin()
    return parse_config(document, "t.toml", {"redis": plugin.validate})


def test_its_keys_are_validated_with_the_file_and_key_named() -> None:
    config = _parse('upstream = "redis"\nclient_idle_timeout = 30\nmax_pipeline = 64')
    assert dict(config.listeners[0].extra) == {"client_idle_timeout": 30, "max_pipeline": 64}
    for text, message in [
        ("", r"t.toml: listener.cache.upstream: required key is missing"),
        ('upstream = "redis"\ncolour = 1', r"listener.cache.colour: unknown key"),
        ('upstream = "redis"\nclient_idle_timeout = "1"', r"cache.client_idle_timeout: expected"),
        ('upstream = "redis"\nclient_idle_timeout = -1', r"cache.client_idle_timeout: must be"),
        ('upstream = "redis"\nmax_command_size = 10', r"max_command_size: must be at least 1024"),
        ('upstream = "redis"\nmax_pipeline = true', r"max_pipeline: expected a number of"),
        ('upstream = "redis"\nmax_pipeline = 0', r"max_pipeline: must be at least 1"),
        ('upstream = "redis"\nkeepalive_timeout = 5', r"keepalive_timeout: not used by protocol"),
        ('upstream = "redis"\ntunnel_idle_timeout = 5', r"tunnel_idle_timeout: not used by"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _parse(text)


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("GET k", C.PLAIN),
        ("eval return 1 0", C.PLAIN),
        ("select 1", C.STICKY),
        ("Auth pw", C.STICKY),
        ("CLIENT setname x", C.STICKY),
        ("CLIENT ID", C.STICKY),
        ("client list", C.PLAIN),
        ("CLIENT KILL ID 1", C.UNSUPPORTED),
        ("CLIENT REPLY OFF", C.UNSUPPORTED),
        ("HELLO", C.STICKY),
        ("HELLO 2 SETNAME x", C.STICKY),
        ("hello 3", C.NOPROTO),
        ("BLPOP q 0", C.BLOCKING),
        ("xread COUNT 1 STREAMS s 0", C.PLAIN),
        ("XREADGROUP GROUP g c block 0 STREAMS s >", C.BLOCKING),
        ("MULTI", C.MULTI),
        ("discard", C.EXEC),
        ("psubscribe a*", C.PUBSUB),
        ("UNSUBSCRIBE", C.PUBSUB),
        ("RESET", C.CLIENT_RESET),
        ("QUIT", C.QUIT),
        ("MONITOR", C.UNSUPPORTED),
        ("psync ? -1", C.UNSUPPORTED),
    ],
)
def test_what_each_command_does_to_its_connection(command: str, code: int) -> None:
    assert C.classify([word.encode() for word in command.split()]) == code


# -- lending -----------------------------------------------------------------------------------


def test_a_command_borrows_a_pooled_connection_and_gives_it_back_after_its_reply() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("SET", "k", "v"))
    [conn] = h.connections
    assert up(conn).take() == cmd("SET", "k", "v")
    conn.dataReceived(b"+OK\r\n")
    assert a_t.take() == b"+OK\r\n"
    assert h.pool.idle == 1 and a.conn is None
    # Another client (and the first again) reuse it: no second connection is made.
    b, b_t = h.client()
    b.dataReceived(cmd("GET", "k"))
    assert up(conn).take() == cmd("GET", "k")
    conn.dataReceived(b"$1\r\nv\r\n")
    assert b_t.take() == b"$1\r\nv\r\n"
    a.dataReceived(cmd("GET", "k"))
    conn.dataReceived(b"$1\r\nv\r\n")
    assert a_t.take() == b"$1\r\nv\r\n"
    assert len(h.connections) == 1 and h.pool.connects == 1
    assert a.lends == 2 and b.lends == 1


def test_clients_in_flight_at_once_get_a_connection_each() -> None:
    h = Harness()
    a, a_t = h.client()
    b, b_t = h.client()
    a.dataReceived(cmd("GET", "a"))
    b.dataReceived(cmd("GET", "b"))
    ca, cb = h.connections
    assert up(ca).take() == cmd("GET", "a") and up(cb).take() == cmd("GET", "b")
    cb.dataReceived(b"$1\r\nB\r\n")
    ca.dataReceived(b"$1\r\nA\r\n")
    assert a_t.take() == b"$1\r\nA\r\n" and b_t.take() == b"$1\r\nB\r\n"
    assert h.pool.idle == 2


def test_a_pipeline_is_sent_as_read_and_answered_in_order_across_reads() -> None:
    h = Harness()
    a, a_t = h.client()
    pipeline = cmd("SET", "k", "v") + cmd("INCR", "n") + cmd("GET", "k")
    a.dataReceived(pipeline)
    [conn] = h.connections
    assert up(conn).take() == pipeline, "the client's bytes, as they are, in one write"
    replies = b"+OK\r\n:1\r\n$1\r\nv\r\n"
    for i in range(len(replies)):  # a byte at a time: passed on as it comes
        conn.dataReceived(replies[i : i + 1])
        assert a.conn is (None if i == len(replies) - 1 else conn)
    assert a_t.take() == replies
    assert h.pool.idle == 1


def test_a_command_split_across_reads_and_more_commands_while_in_flight() -> None:
    h = Harness()
    a, _ = h.client()
    first = cmd("SET", "k", "x" * 1000)
    a.dataReceived(first[:10])
    assert h.connections == []
    a.dataReceived(first[10:500])
    a.dataReceived(first[500:] + cmd("GET", "k")[:5])
    [conn] = h.connections
    assert up(conn).take() == first
    a.dataReceived(cmd("GET", "k")[5:])
    assert up(conn).take() == cmd("GET", "k"), "sent on the same connection, behind the first"
    conn.dataReceived(b"+OK\r\n")
    assert a.conn is conn
    conn.dataReceived(b"$1\r\nx\r\n")
    assert a.conn is None


def test_commands_read_while_the_connection_is_being_made_go_in_order_once_it_is() -> None:
    h = Harness()
    h.manual = []
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "1"))
    a.dataReceived(cmd("GET", "2"))
    conn = h.answer_connect()
    assert up(conn).take() == cmd("GET", "1") + cmd("GET", "2")
    conn.dataReceived(b"$1\r\na\r\n$1\r\nb\r\n")
    assert a_t.take() == b"$1\r\na\r\n$1\r\nb\r\n"


# -- pinning -----------------------------------------------------------------------------------


def test_select_pins_the_connection_and_it_is_reset_before_it_is_pooled_again() -> None:
    h = Harness()
    a, _ = h.client()
    a.dataReceived(cmd("SELECT", "1"))
    [conn] = h.connections
    conn.dataReceived(b"+OK\r\n")
    assert a.conn is conn and h.pool.idle == 0, "kept: db 1 lives on this connection"
    a.dataReceived(cmd("GET", "k"))
    conn.dataReceived(b"$-1\r\n")
    assert a.conn is conn
    b, _ = h.client()
    b.dataReceived(cmd("GET", "k"))
    assert len(h.connections) == 2, "another client never gets the pinned one"
    up(conn).clear()
    lost(a)
    assert up(conn).take() == b"*1\r\n$5\r\nRESET\r\n"
    assert h.pool.idle == 0, "not pooled before RESET is answered"
    conn.dataReceived(b"+RESET\r\n")
    assert h.pool.idle == 1 and conn.usable(h.clock.seconds(), 0)
    assert h.access()[0]["pinned"] == "SELECT"


def test_a_pinned_connection_whose_reset_fails_is_closed_not_pooled() -> None:
    h = Harness()
    a, _ = h.client()
    a.dataReceived(cmd("CLIENT", "SETNAME", "me") + cmd("GET", "k"))
    [conn] = h.connections
    up(conn).clear()
    lost(a)  # replies still outstanding: read (and dropped) before RESET's
    assert up(conn).take() == b"*1\r\n$5\r\nRESET\r\n"
    conn.dataReceived(b"+OK\r\n$-1\r\n")
    assert not up(conn).disconnecting
    conn.dataReceived(b"-ERR unknown command 'RESET'\r\n")  # a server before Redis 6.2
    assert up(conn).aborted and h.pool.idle == 0 and h.pool.active == 0


def test_a_pinned_connection_whose_reset_is_not_answered_is_dropped() -> None:
    h = Harness()
    a, _ = h.client()
    a.dataReceived(cmd("AUTH", "secret"))
    [conn] = h.connections
    conn.dataReceived(b"+OK\r\n")
    lost(a)
    h.clock.advance(h.config.response_timeout + 1)
    assert up(conn).aborted and h.pool.active == 0


def test_a_transaction_pins_until_exec_then_the_connection_is_pooled_as_is() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("MULTI") + cmd("INCR", "n"))
    [conn] = h.connections
    conn.dataReceived(b"+OK\r\n+QUEUED\r\n")
    assert a.conn is conn, "inside MULTI"
    a.dataReceived(cmd("EXEC"))
    conn.dataReceived(b"*1\r\n:1\r\n")
    assert a.conn is None and h.pool.idle == 1
    assert a_t.take() == b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n"
    assert up(conn).take() == cmd("MULTI") + cmd("INCR", "n") + cmd("EXEC"), "no RESET needed"


def test_watch_pins_until_unwatch() -> None:
    h = Harness()
    a, _ = h.client()
    a.dataReceived(cmd("WATCH", "k"))
    [conn] = h.connections
    conn.dataReceived(b"+OK\r\n")
    assert a.conn is conn
    a.dataReceived(cmd("UNWATCH"))
    conn.dataReceived(b"+OK\r\n")
    assert a.conn is None


def test_the_clients_own_reset_ends_the_pin() -> None:
    h = Harness()
    a, _ = h.client()
    a.dataReceived(cmd("SELECT", "2") + cmd("RESET"))
    [conn] = h.connections
    conn.dataReceived(b"+OK\r\n")
    assert a.conn is conn
    conn.dataReceived(b"+RESET\r\n")
    assert a.conn is None and h.pool.idle == 1


def test_a_subscriber_keeps_its_connection_gets_its_pushes_and_it_is_closed_after() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "x") + cmd("SUBSCRIBE", "news", "sport"))
    [conn] = h.connections
    pushes = (
        b"$-1\r\n"
        b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
        b"*3\r\n$9\r\nsubscribe\r\n$5\r\nsport\r\n:2\r\n"
        b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
    )
    conn.dataReceived(pushes)
    conn.dataReceived(b"*3\r\n$7\r\nmessage\r\n$5\r\nsport\r\n$1\r\n0\r\n")
    assert a_t.take() == pushes + b"*3\r\n$7\r\nmessage\r\n$5\r\nsport\r\n$1\r\n0\r\n"
    assert a.conn is conn and not up(conn).aborted
    h.clock.advance(h.config.response_timeout * 3)
    assert a.conn is conn, "no response timeout for a subscriber"
    lost(a)
    assert up(conn).disconnecting and h.pool.idle == 0
    assert h.access()[0]["pinned"] == "SUBSCRIBE"


def test_a_blocking_command_has_no_response_timeout_and_its_connection_closes_if_left() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("BLPOP", "q", "0"))
    [conn] = h.connections
    h.clock.advance(h.config.response_timeout * 2)
    assert a.conn is conn and not up(conn).aborted and a_t.value() == b""
    lost(a)
    assert up(conn).disconnecting and h.pool.active == 0 and h.pool.idle == 0
    assert not up(conn).value().endswith(b"RESET\r\n")


def test_a_blocking_commands_connection_is_pooled_once_answered() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("XREAD", "BLOCK", "0", "STREAMS", "s", "$"))
    [conn] = h.connections
    h.clock.advance(h.config.response_timeout * 2)
    conn.dataReceived(b"*-1\r\n")
    assert a_t.take() == b"*-1\r\n" and a.conn is None and h.pool.idle == 1


def test_a_non_blocking_command_times_out_with_an_error_in_its_place() -> None:
    h = Harness(upstream={"response_timeout": 5.0})
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a") + cmd("GET", "b"))
    [conn] = h.connections
    h.clock.advance(4)
    assert not up(conn).aborted
    h.clock.advance(2)
    assert up(conn).aborted
    assert a_t.take() == b"-ERR persistproxy: upstream timed out\r\n" * 2
    assert h.stats.timeouts == 1 and not a_t.disconnecting, "a stateless client goes on"
    lost(conn, ConnectionLost)
    a.dataReceived(cmd("GET", "c"))
    assert up(h.connections[1]).take() == cmd("GET", "c")


def test_each_reply_restarts_the_response_timeout() -> None:
    h = Harness(upstream={"response_timeout": 5.0})
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a") + cmd("GET", "b"))
    [conn] = h.connections
    h.clock.advance(4)
    conn.dataReceived(b"$1\r\nA\r\n")
    h.clock.advance(4)
    assert not up(conn).aborted
    h.clock.advance(2)
    assert up(conn).aborted and a_t.aborted, "a reply was passed on: no error can follow it"


# -- the proxy's own answers -----------------------------------------------------------------------


def test_an_unsupported_command_gets_an_error_after_the_replies_before_it() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a") + cmd("MONITOR") + cmd("GET", "b"))
    [conn] = h.connections
    assert up(conn).take() == cmd("GET", "a"), "held back until the error is out"
    conn.dataReceived(b"$1\r\nA\r\n")
    assert a_t.take() == b"$1\r\nA\r\n" + NOT_SUPPORTED
    assert up(conn).take() == cmd("GET", "b")
    conn.dataReceived(b"$1\r\nB\r\n")
    assert a_t.take() == b"$1\r\nB\r\n"
    for unsupported in (cmd("SYNC"), cmd("client", "kill", "id", "7"), cmd("CLIENT", "REPLY")):
        a.dataReceived(unsupported)
        assert a_t.take() == NOT_SUPPORTED
    assert up(conn).value() == b"" and not a_t.disconnecting


def test_hello_3_is_refused_and_hello_2_pins() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("HELLO", "3"))
    assert a_t.take().startswith(b"-NOPROTO ") and h.connections == []
    a.dataReceived(cmd("HELLO", "2", "SETNAME", "x"))
    [conn] = h.connections
    conn.dataReceived(b"*2\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    assert a.conn is conn


def test_quit_is_answered_after_the_replies_before_it_then_the_client_is_closed() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a") + cmd("QUIT") + cmd("GET", "never"))
    [conn] = h.connections
    assert not a_t.disconnecting
    conn.dataReceived(b"$1\r\nA\r\n")
    assert a_t.take() == b"$1\r\nA\r\n+OK\r\n" and a_t.disconnecting
    assert up(conn).take() == cmd("GET", "a"), "QUIT is not sent: it would close a pooled one"
    lost(a)
    assert h.pool.idle == 1 and h.access()[0]["reason"] == "quit"


def test_inline_commands_are_sent_as_resp() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(b"PING\r\nSET k  v\r\n\r\nGE")
    [conn] = h.connections
    assert up(conn).take() == cmd("PING") + cmd("SET", "k", "v")
    a.dataReceived(b"T k\n")
    assert up(conn).take() == cmd("GET", "k")
    a.dataReceived(b'SET k "a b"\r\n')
    conn.dataReceived(b"+PONG\r\n+OK\r\n$1\r\nv\r\n")
    assert a_t.take() == b"+PONG\r\n+OK\r\n$1\r\nv\r\n" + (
        b"-ERR persistproxy: quoted arguments in inline commands are not supported\r\n"
    )


def test_inline_and_resp_commands_mixed_in_one_read() -> None:
    h = Harness()
    a, _ = h.client()
    a.dataReceived(cmd("GET", "a") + b"PING\r\n" + cmd("GET", "b") + b"ECHO x\r\n")
    [conn] = h.connections
    assert up(conn).take() == cmd("GET", "a") + cmd("PING") + cmd("GET", "b") + cmd("ECHO", "x")


@pytest.mark.parametrize(
    "garbage",
    [b"*1\r\n:5\r\n", b"*2\r\n$3\r\nGET\r\n*1\r\n$1\r\nx\r\n", b"*1\r\n$x\r\n"],
    ids=["integer", "nested", "bad-length"],
)
def test_malformed_resp_gets_a_protocol_error_after_earlier_replies_then_a_close(
    garbage: bytes,
) -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a") + garbage + cmd("GET", "b"))
    [conn] = h.connections
    assert up(conn).take() == cmd("GET", "a")
    conn.dataReceived(b"$1\r\nA\r\n")
    out = a_t.take()
    assert out.startswith(b"$1\r\nA\r\n-ERR Protocol error") and a_t.disconnecting
    assert h.stats.bad_requests == 1


def test_a_command_over_max_command_size_is_refused_and_the_client_closed() -> None:
    h = Harness(max_command_size=4096)
    a, a_t = h.client()
    big = cmd("SET", "k", "x" * 8000)
    a.dataReceived(big[:3000])
    assert not a_t.disconnecting
    a.dataReceived(big[3000:6000])
    assert a_t.take().startswith(b"-ERR Protocol error: command larger than max_command_size")
    assert a_t.disconnecting and h.connections == []


def test_empty_commands_are_ignored() -> None:
    h = Harness()
    a, _ = h.client()
    a.dataReceived(b"*0\r\n" + cmd("PING") + b"*-1\r\n")
    [conn] = h.connections
    assert up(conn).take() == cmd("PING")


# -- failures ---------------------------------------------------------------------------------


def test_a_connect_failure_answers_each_waiting_command_and_the_client_goes_on() -> None:
    h = Harness()
    h.refuse = True
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a") + cmd("GET", "b"))
    error = a_t.take()
    assert error.count(b"-ERR persistproxy: cannot connect to 127.0.0.1:6379") == 2
    assert error.count(b"\r\n") == 2 and not a_t.disconnecting
    h.refuse = False
    a.dataReceived(cmd("GET", "c"))
    [conn] = h.connections
    conn.dataReceived(b"$1\r\nC\r\n")
    assert a_t.take() == b"$1\r\nC\r\n"
    assert h.stats.upstream_errors == 1


def test_a_lost_connection_answers_what_it_owed_and_a_stateless_client_goes_on() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a") + cmd("GET", "b"))
    [conn] = h.connections
    lost(conn, ConnectionLost)
    assert a_t.take() == b"-ERR persistproxy: upstream connection lost\r\n" * 2
    assert not a_t.disconnecting and h.pool.active == 0
    a.dataReceived(cmd("GET", "c"))
    assert len(h.connections) == 2


def test_a_connection_lost_after_some_replies_of_a_burst_aborts_the_client() -> None:
    """Whether the replies passed on ended inside an array, hiredis' reader cannot say."""
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a") + cmd("LRANGE", "l", "0", "-1"))
    [conn] = h.connections
    conn.dataReceived(b"$1\r\nA\r\n*2\r\n$1\r\nx\r\n")  # the array's header was read
    lost(conn, ConnectionLost)
    assert a_t.aborted and a_t.take() == b"$1\r\nA\r\n*2\r\n$1\r\nx\r\n"


def test_a_pinned_clients_connection_lost_closes_the_client_after_its_errors() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("SELECT", "3"))
    [conn] = h.connections
    conn.dataReceived(b"+OK\r\n")
    a.dataReceived(cmd("GET", "k"))
    lost(conn, ConnectionLost)
    assert a_t.take() == b"+OK\r\n-ERR persistproxy: upstream connection lost\r\n"
    assert a_t.disconnecting, "its db 3 is gone: it must not go on in db 0"


def test_a_reply_cut_in_the_middle_aborts_the_client() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a"))
    [conn] = h.connections
    conn.dataReceived(b"$10\r\nabc")
    lost(conn, ConnectionLost)
    assert a_t.aborted


def test_a_server_that_answers_more_than_asked_is_dropped_and_its_bytes_never_passed() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a"))
    [conn] = h.connections
    conn.dataReceived(b"$1\r\nA\r\n+EXTRA\r\n")
    assert up(conn).aborted
    assert a_t.take() == b"-ERR persistproxy: upstream broke the protocol\r\n"
    idle_talker = Harness()
    b, _ = idle_talker.client()
    b.dataReceived(cmd("PING"))
    [conn] = idle_talker.connections
    conn.dataReceived(b"+PONG\r\n")
    assert idle_talker.pool.idle == 1
    conn.dataReceived(b"-ERR out of the blue\r\n")
    assert up(conn).aborted


# -- flow control --------------------------------------------------------------------------------


def test_reading_pauses_at_max_pipeline_commands_in_flight_and_resumes_as_they_are_answered() -> (
    None
):
    h = Harness(max_pipeline=4)
    a, a_t = h.client()
    a.dataReceived(cmd("INCR", "n") * 3)
    assert a_t.reading
    a.dataReceived(cmd("INCR", "n") * 2)
    assert not a_t.reading
    [conn] = h.connections
    conn.dataReceived(b":1\r\n:2\r\n")
    assert a_t.reading


def test_a_client_that_does_not_read_stops_reading_of_its_server_connection() -> None:
    h = Harness()
    a, _ = h.client()
    a.dataReceived(cmd("GET", "big"))
    [conn] = h.connections
    a.pauseProducing()  # the client's transport buffer is full
    assert not up(conn).reading
    a.resumeProducing()
    assert up(conn).reading
    a.pauseProducing()
    conn.dataReceived(b"$1\r\nx\r\n")
    assert a.conn is None and up(conn).reading, "resumed before it goes back to the pool"


def test_a_server_that_does_not_read_stops_reading_of_the_client() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("SET", "k", "x" * 100))
    [conn] = h.connections
    conn.pauseProducing()  # our commands back up in its transport
    assert not a_t.reading
    conn.resumeProducing()
    assert a_t.reading


# -- the client's end --------------------------------------------------------------------------


def test_a_half_closed_client_gets_its_replies_then_is_closed() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("GET", "a"))
    a.readConnectionLost()
    assert not a_t.disconnecting
    [conn] = h.connections
    conn.dataReceived(b"$1\r\nA\r\n")
    assert a_t.take() == b"$1\r\nA\r\n" and a_t.disconnecting


def test_a_client_that_leaves_with_replies_outstanding_lets_its_connection_finish() -> None:
    h = Harness()
    a, _ = h.client()
    a.dataReceived(cmd("GET", "a") + cmd("GET", "b"))
    [conn] = h.connections
    lost(a, ConnectionLost)
    assert h.pool.idle == 0
    conn.dataReceived(b"$1\r\nA\r\n$1\r\nB\r\n")
    assert h.pool.idle == 1 and h.pool.active == 0 and up(conn).value() == cmd("GET", "a") + cmd(
        "GET", "b"
    ), "read to the end, no RESET: it held no state"
    assert h.access()[0]["reason"] == "client_reset"


def test_a_client_gone_before_its_connection_was_made() -> None:
    h = Harness()
    h.manual = []
    a, _ = h.client()
    a.dataReceived(cmd("GET", "a"))
    lost(a)
    h.answer_connect()
    assert h.pool.idle == 1 and h.pool.active == 0


def test_idle_timeout_closes_a_client_with_nothing_in_flight_but_not_a_subscriber() -> None:
    h = Harness(client_idle_timeout=10)
    a, a_t = h.client()
    b, b_t = h.client()
    b.dataReceived(cmd("SUBSCRIBE", "c"))
    h.clock.advance(5)
    a.dataReceived(cmd("GET", "k"))
    h.clock.advance(20)
    assert not a_t.disconnecting, "in flight"
    h.connections[1].dataReceived(b"$-1\r\n")
    h.clock.advance(9)
    assert not a_t.disconnecting
    h.clock.advance(2)
    assert a_t.disconnecting and not b_t.disconnecting
    lost(a)
    assert h.access()[0]["reason"] == "idle_timeout"


def test_drain_closes_idle_clients_at_once_and_busy_ones_after_their_replies() -> None:
    h = Harness()
    idle, idle_t = h.client()
    busy, busy_t = h.client()
    busy.dataReceived(cmd("GET", "a"))
    assert idle.close_if_idle() and idle_t.disconnecting
    assert not busy.close_if_idle() and not busy_t.disconnecting
    h.connections[0].dataReceived(b"$1\r\nA\r\n")
    assert busy_t.take() == b"$1\r\nA\r\n" and busy_t.disconnecting


def test_drain_cut_aborts_and_writes_the_access_line_at_once() -> None:
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("BLPOP", "q", "0"))
    a.drain_cut()
    assert a_t.aborted
    [line] = h.access()
    assert line["reason"] == "drain"


def test_the_access_line() -> None:
    h = Harness()
    a, _ = h.client()
    a.tls_established({"tls_version": "TLSv1.3"})
    a.dataReceived(cmd("GET", "a") + cmd("GET", "b"))
    h.connections[0].dataReceived(b"$1\r\nA\r\n$1\r\nB\r\n")
    lost(a)
    [line] = h.access()
    assert line["listener"] == "cache" and line["protocol"] == "redis"
    assert line["client"] == "10.1.2.3" and line["upstream"] == "127.0.0.1:6379"
    assert line["commands"] == 2 and line["lends"] == 1 and line["pinned"] is None
    assert line["bytes_up"] == len(cmd("GET", "a") + cmd("GET", "b"))
    assert line["bytes_down"] == 14 and line["reason"] == "client_closed"
    assert line["tls_version"] == "TLSv1.3"
    assert h.stats.requests_total == 2


def test_a_client_that_half_closes_during_a_blocking_command_is_closed_at_once() -> None:
    """As Redis does on EOF: a BLPOP left running would pop an item for nobody."""
    h = Harness()
    a, a_t = h.client()
    a.dataReceived(cmd("BLPOP", "q", "0"))
    [conn] = h.connections
    a.readConnectionLost()
    assert a_t.disconnecting
    lost(a)
    assert up(conn).disconnecting and h.pool.active == 0
    b, b_t = h.client()
    b.dataReceived(cmd("GET", "a") + cmd("MONITOR") + cmd("BLPOP", "q", "0"))
    b.readConnectionLost()
    assert not b_t.disconnecting, "GET is still answered"
    h.connections[1].dataReceived(b"$-1\r\n")
    assert b_t.disconnecting, "closed once the BLPOP behind the error is sent"


def test_these_tests_run_against_the_source_tree() -> None:
    assert persistproxy_redis.__file__ is not None
    assert "site-packages" not in persistproxy_redis.__file__, persistproxy_redis.__file__
