"""
What a listener does for every accepted connection, whatever its protocol
(listener/admission.py): admission with the plugin's refusal, holding past
C{max_connections}, the counters, registration for the drain, half-closes passed on or
turned into a close, and the drain's close and cut.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from fakes import OK_RESPONSE, FakePort, connect_from, limited_listener, parse_response
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.listener.admission import Admitted, ConnectionRegistry, ListenerFactory
from persistproxy.listener.limits import ConnectionLimits, Rejection
from persistproxy.logs import make_event_log
from persistproxy.metrics import ListenerStats

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
_LOST = Failure(ConnectionError("lost"))


# -- with the HTTP plugin ----------------------------------------------------------------------


def test_per_client_limit_answers_503_and_keeps_existing_connections() -> None:
    h, factory, _limits = limited_listener(max_connections_per_client=2)
    first, t1 = connect_from(factory, "10.0.0.1")
    connect_from(factory, "10.0.0.1")
    refused, t3 = connect_from(factory, "10.0.0.1")
    assert isinstance(refused, Rejection)
    status, headers, _ = parse_response(t3.value())
    assert status == 503 and headers[b"retry-after"] == [b"5"]
    other, _ = connect_from(factory, "10.0.0.2")
    assert not isinstance(other, Rejection), "the limit is per client address"
    first.dataReceived(GET)
    h.origin.respond(OK_RESPONSE)
    assert parse_response(t1.value())[0] == 200
    refusal = h.events("client.refused")
    assert refusal and refusal[0]["client"] == "10.0.0.1"
    first.connectionLost(None)
    again, _ = connect_from(factory, "10.0.0.1")
    assert not isinstance(again, Rejection), "a closed connection frees its slot"


def test_listener_limit_stops_accepting_until_a_connection_closes() -> None:
    _, factory, limits = limited_listener(max_connections=2)
    port = FakePort()
    limits.port = port
    a, _ = connect_from(factory, "10.0.0.1")
    assert port.reading
    connect_from(factory, "10.0.0.2")
    assert not port.reading, "further clients wait in the backlog"
    # Accepted in the same burst, before reading stopped: held unread, not refused.
    late, late_transport = connect_from(factory, "10.0.0.3")
    assert not isinstance(late, Rejection) and late.held
    assert late_transport.producerState == "paused"
    a.connectionLost(None)
    assert not late.held and late_transport.producerState == "producing"
    assert not port.reading, "the held connection took the freed slot"
    late.connectionLost(None)
    assert port.reading


# -- with any protocol -------------------------------------------------------------------------


class Plain(Protocol):
    """A plugin's protocol that knows nothing of half-closes, drains or TLS."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = _LOST) -> None:
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class Aware(Plain):
    """One that hears half-closes, knows when it is idle and wants its TLS facts."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Any] = []
        self.idle = True

    def readConnectionLost(self) -> None:
        self.calls.append("readConnectionLost")

    def writeConnectionLost(self) -> None:
        self.calls.append("writeConnectionLost")

    def close_if_idle(self) -> bool:
        self.calls.append("close_if_idle")
        return self.idle

    def drain_cut(self) -> None:
        self.calls.append("drain_cut")

    def tls_established(self, facts: dict[str, Any]) -> None:
        self.calls.append(("tls", facts))


class _Listener:
    def __init__(self, protocol: type[Protocol] | None, total: int = 0, per_client: int = 0):
        self.clock = Clock()
        self.stats = ListenerStats()
        self.registry = ConnectionRegistry()
        self.limits = ConnectionLimits(
            "raw", total, per_client, 0, make_event_log(io.StringIO()), self.stats
        )
        wrapped: Any = Factory.forProtocol(protocol) if protocol else _NoProtocol()
        self.factory = ListenerFactory(
            wrapped,
            self.clock,
            self.limits,
            self.stats,
            self.registry,
            lambda reason: f"refused: {reason}\r\n".encode(),
        )

    def connect(self, host: str = "10.0.0.1") -> tuple[Any, StringTransport]:
        return connect_from(self.factory, host)


class _NoProtocol(Factory):
    def buildProtocol(self, addr: Any) -> None:
        return None


def test_the_plugins_protocol_gets_the_transport_itself_and_every_byte() -> None:
    listener = _Listener(Plain)
    admitted, transport = listener.connect()
    assert isinstance(admitted, Admitted)
    inner = admitted.inner
    assert isinstance(inner, Plain) and inner.transport is transport, "no wrapper in between"
    admitted.dataReceived(b"hello")
    assert inner.received == b"hello"
    assert (listener.stats.connections_total, listener.stats.connections_open) == (1, 1)
    assert len(listener.registry) == 1 and listener.registry.snapshot() == [admitted]
    admitted.connectionLost(_LOST)
    assert inner.lost is _LOST
    assert (listener.stats.connections_total, listener.stats.connections_open) == (1, 0)
    assert len(listener.registry) == 0 and listener.limits.total == 0
    assert admitted.transport is None


def test_a_refused_connection_gets_the_plugins_refusal_and_is_not_counted() -> None:
    listener = _Listener(Plain, per_client=1)
    listener.connect()
    refused, transport = listener.connect()
    assert isinstance(refused, Rejection)
    assert transport.value() == b"refused: too many connections from your address\r\n"
    assert listener.stats.connections_rejected == 1
    assert listener.stats.connections_open == 1 and len(listener.registry) == 1


def test_a_factory_that_builds_nothing_gives_back_the_slot() -> None:
    listener = _Listener(None, total=1)
    assert listener.factory.buildProtocol(None) is None
    assert listener.limits.total == 0, "the slot counted for it is released"


def test_half_closes_reach_a_protocol_that_can_hear_them_and_close_one_that_cannot() -> None:
    aware, aware_transport = _Listener(Aware).connect()
    aware.readConnectionLost()
    aware.writeConnectionLost()
    assert aware.inner.calls == ["readConnectionLost", "writeConnectionLost"]
    assert not aware_transport.disconnecting
    plain, plain_transport = _Listener(Plain).connect()
    plain.writeConnectionLost()
    assert not plain_transport.disconnecting
    plain.readConnectionLost()
    assert plain_transport.disconnecting, "what Twisted does for a protocol that cannot"


def test_a_held_connection_is_never_shown_to_the_plugin_until_served() -> None:
    listener = _Listener(Aware, total=1)
    first, _ = listener.connect("10.0.0.1")
    held, transport = listener.connect("10.0.0.2")
    assert held.held and transport.producerState == "paused"
    assert held.inner.transport is None, "the plugin's protocol has no connection yet"
    assert listener.stats.connections_open == 2 and len(listener.registry) == 2
    held.readConnectionLost()  # the client gave up waiting
    assert transport.disconnecting and held.inner.calls == []
    held.connectionLost(_LOST)
    assert held.inner.lost is None, "never made, never lost"
    assert listener.limits.total == 1, "a held connection held no slot"
    first.connectionLost(_LOST)
    assert listener.limits.total == 0


def test_the_drain_closes_held_connections_and_asks_the_others() -> None:
    listener = _Listener(Aware, total=1)
    busy, _ = listener.connect("10.0.0.1")
    held, held_transport = listener.connect("10.0.0.2")
    busy.inner.idle = False
    assert held.close_if_idle() is True and held_transport.disconnecting
    assert held.inner.calls == [], "nothing was read, nothing is owed"
    assert busy.close_if_idle() is False
    busy.drain_cut()
    assert busy.inner.calls == ["close_if_idle", "drain_cut"]


def test_a_protocol_that_knows_no_drain_is_left_to_finish_then_aborted() -> None:
    admitted, transport = _Listener(Plain).connect()
    assert admitted.close_if_idle() is False
    aborted: list[bool] = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    admitted.drain_cut()
    assert aborted == [True]


def test_tls_facts_reach_only_a_protocol_that_wants_them() -> None:
    aware, _ = _Listener(Aware).connect()
    aware.tls_established({"tls_version": "TLSv1.3"})
    assert aware.inner.calls == [("tls", {"tls_version": "TLSv1.3"})]
    plain, _ = _Listener(Plain).connect()
    plain.tls_established({"tls_version": "TLSv1.3"})  # ignored, not an error


def test_the_registry_says_once_when_it_empties() -> None:
    listener = _Listener(Plain)
    a, _ = listener.connect()
    b, _ = listener.connect()
    emptied: list[int] = []
    listener.registry.on_empty = lambda: emptied.append(len(listener.registry))
    a.connectionLost(_LOST)
    assert emptied == []
    b.connectionLost(_LOST)
    assert emptied == [0]
    assert listener.registry.on_empty is None, "called once, then forgotten"


@pytest.mark.parametrize("protocol", [Plain, Aware])
def test_log_prefix_names_the_plugins_protocol(protocol: type[Protocol]) -> None:
    listener = _Listener(protocol)
    admitted, _ = listener.connect()
    assert admitted.logPrefix() == protocol.__name__
    assert listener.factory.logPrefix() == "Factory"
