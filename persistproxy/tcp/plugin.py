# -*- test-case-name: tests.unit.test_tcp_plugin -*-
"""
C{protocol = "tcp"}: each client connection is relayed, byte for byte, to a new connection to
a server of the listener's upstream group; with C{[listener.tls]} that is TLS offload.

Written against L{persistproxy.interfaces} only, like a third-party plugin (plus the relay of
its own package): the listener admits, holds, counts, registers for the drain and terminates
TLS around its factory; the upstream group balances, dials (with the upstream's
C{connect_timeout}, and TLS when it says C{tls = true}) and caps connections per server
(C{max_connections} and its queue). A raw TCP connection is never reused: it is taken fresh
from the pool and never given back as reusable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from persistproxy.interfaces import (
    ClientAddresses,
    ConfigError,
    IProtocolPlugin,
    ListenerConfig,
    Pool,
    ProxyContext,
    Upstream,
    UpstreamConfig,
    UpstreamServer,
)
from persistproxy.relay import (
    CLIENT_FIN,
    CONNECT_FAILED,
    DRAIN,
    IDLE_TIMEOUT,
    RESET,
    Relay,
    RelaySide,
    idle_queue,
)

__all__ = ["TCPConnection", "TCPConnector", "TCPProtocolPlugin", "TCPUpstream"]

#: Listener keys that only HTTP reads: set on a tcp listener, they would be silently ignored.
_HTTP_KEYS = (
    "keepalive_timeout",
    "max_requests",
    "max_head_size",
    "max_body_size",
    "add_via",
    "add_forwarded",
    "header_timeout",
    "body_timeout",
    "send_timeout",
    "min_body_rate",
    "min_body_rate_window",
    "min_send_rate",
    "min_send_rate_window",
    "max_lifetime",
    "max_idle_per_client",
    "send_408_on_idle",
)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ListenerConfig)}


# -- the upstream side ----------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class TCPUpstream(TwistedProtocol):
    """
    The relay's connection to the server: a L{persistproxy.interfaces.PooledConnection} that
    is never usable for another client.
    """

    def __init__(self) -> None:
        self.idle_since = 0.0
        self.in_pool = False
        self.on_lost: Any = None
        self.side: RelaySide | None = None

    def connectionMade(self) -> None:
        self.side = RelaySide(self.transport, "upstream")

    def dataReceived(self, data: bytes) -> None:
        side = self.side
        assert side is not None
        side.received(data)

    def readConnectionLost(self) -> None:
        side = self.side
        assert side is not None
        side.read_finished()

    def writeConnectionLost(self) -> None:
        """Our FIN is out; the server may still send."""

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self.side is not None:
            self.side.lost(reason)
        if self.on_lost is not None:
            self.on_lost(self)

    # -- PooledConnection ---------------------------------------------------------------------

    def usable(self, now: float, margin: float) -> bool:
        """Never: a byte stream belongs to the client it was opened for."""
        return False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


@dataclass(frozen=True)
class TCPConnector:
    """
    Dials a server for a relay (an L{persistproxy.interfaces.UpstreamConnector}): every tcp
    listener's connector is equal, so listeners relaying to one upstream share its pools and
    their C{max_connections}.
    """

    def factory_for(self, server: UpstreamServer, config: UpstreamConfig) -> Factory:
        return _UpstreamFactory()


class _UpstreamFactory(Factory):
    """Makes a L{TCPUpstream}, quietly: a relay dials once per client connection."""

    noisy = False
    protocol = TCPUpstream


# -- the client side ------------------------------------------------------------------------


@dataclass
class _Listener:
    """What every connection of one tcp listener shares."""

    name: str
    clock: IReactorTime
    group: Upstream[TCPUpstream]
    context: ProxyContext
    access_log: bool
    idle: Any
    #: The upstream sends a PROXY protocol header: each connection is picked for its client.
    keyed: bool = False


# TCPConnection states.
_CONNECTING = "CONNECTING"
_RELAYING = "RELAYING"
_CLOSING = "CLOSING"
_CLOSED = "CLOSED"


@implementer(IHalfCloseableProtocol)
class TCPConnection(TwistedProtocol):
    """
    One client connection of a tcp listener: paused while its upstream connection is made,
    then joined to it by a L{Relay}. It is the pool's waiter for that connection.

    @ivar state: C{"CONNECTING"}: waiting for the upstream connection (the client is not
        read). C{"RELAYING"}: the relay runs. C{"CLOSING"}: no relay will run (the connect
        failed, the drain closed it, or the client left first); the client connection is
        closing. C{"CLOSED"}: gone, its access line written.
    """

    def __init__(self, listener: _Listener, host: str) -> None:
        self._listener = listener
        self._host = host
        self.state = _CONNECTING
        self.cancelled = False
        self.relay: Relay | None = None
        self.side: RelaySide | None = None
        self._pool: Pool[TCPUpstream] | None = None
        #: The pools whose connect failed for this connection (each server is tried once).
        self._failed: list[Pool[TCPUpstream]] = []
        self._client_host: str | None = None
        #: What upstream connections are picked for (its client, when the upstream is keyed).
        self._key: ClientAddresses | None = None
        self._upstream: TCPUpstream | None = None
        self._started = 0.0
        self._reason: str | None = None
        self._error: str | None = None
        self._tls: dict[str, Any] | None = None
        self._logged = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        # Nothing is read until there is somewhere to send it (the kernel buffers meanwhile).
        transport.pauseProducing()
        self._started = self._listener.clock.seconds()
        self.side = RelaySide(transport, "client")
        peer = transport.getPeer()
        self._client_host = getattr(peer, "host", None)
        if self._listener.keyed:
            self._key = ClientAddresses(peer, transport.getHost())
        self._pool = self._listener.group.pick(self._client_host, key=self._key)
        self._pool.acquire(self, fresh=True)

    # -- the pool's waiter --------------------------------------------------------------------

    def connection_ready(self, connection: TCPUpstream, reused: bool) -> None:
        if self.state != _CONNECTING:
            raise RuntimeError(f"an upstream connection arrived in state {self.state}")
        assert self.side is not None and connection.side is not None
        self._upstream = connection
        self.state = _RELAYING
        self.relay = Relay(self.side, connection.side, self._listener.idle, self._relay_ended)
        self.relay.start()

    def connection_failed(self, reason: str, status: int) -> None:
        if self.state != _CONNECTING:
            raise RuntimeError(f"a connect failure arrived in state {self.state}")
        pool = self._pool
        if status == 502 and pool is not None:
            # Nothing was read from the client yet, so the next server may have it (each
            # server once), as an HTTP request whose connect failed.
            self._failed.append(pool)
            group = self._listener.group
            if len(self._failed) < len(group.pools):
                self._listener.context.log.info(
                    "upstream.next_server",
                    listener=self._listener.name,
                    server=pool.address,
                    reason=reason,
                )
                self._pool = group.pick(self._client_host, self._failed, self._key)
                self._pool.acquire(self, fresh=True)
                return
        self.state = _CLOSING
        self._reason = CONNECT_FAILED
        self._error = reason
        self._listener.context.stats(self._listener.name).upstream_errors += 1
        assert self.transport is not None
        self.transport.loseConnection()

    # -- events of the client connection ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        side = self.side
        assert side is not None
        side.received(data)

    def readConnectionLost(self) -> None:
        side = self.side
        assert side is not None
        side.read_finished()

    def writeConnectionLost(self) -> None:
        """Our FIN is out (the upstream finished); the client may still send."""

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self.side is not None:
            self.side.lost(reason)  # a running relay ends through _relay_ended
        if self.state == _CONNECTING:
            # Gone before its upstream connection was made: the pool closes that one.
            self.cancelled = True
            self._reason = CLIENT_FIN if reason.check(ConnectionDone) else RESET
            self._closed()
        elif self.state == _CLOSING:
            self._closed()

    # -- DrainAware ---------------------------------------------------------------------------

    def close_if_idle(self) -> bool:
        """
        Idle only if nothing was ever sent either way: a byte stream has no boundary at which
        closing it would be safe, so a relay that carried anything finishes by itself or is
        cut at C{drain_timeout}.
        """
        if self.state == _CONNECTING:
            self.cancelled = True
            self.state = _CLOSING
            self._reason = DRAIN
            assert self.transport is not None
            self.transport.loseConnection()
            return True
        relay = self.relay
        if self.state == _RELAYING and relay is not None:
            if relay.bytes_up or relay.bytes_down:
                return False
            relay.cut(DRAIN)
        return True

    def drain_cut(self) -> None:
        """
        Abort both connections, and write the access line now: the aborts complete on the
        next reactor turn, after the drain has flushed the access log for the last time.
        """
        if self.state == _RELAYING and self.relay is not None:
            self.relay.cut(DRAIN, abort=True)
            self._reason = DRAIN
        else:
            if self.state == _CONNECTING:
                self.cancelled = True
                self.state = _CLOSING
                self._reason = DRAIN
            transport: Any = self.transport
            if transport is not None:
                transport.abortConnection()
        self._log_access()

    # -- TLSAware -----------------------------------------------------------------------------

    def tls_established(self, facts: dict[str, Any]) -> None:
        self._tls = facts

    # -- the end ------------------------------------------------------------------------------

    def _relay_ended(self, relay: Relay) -> None:
        pool, upstream = self._pool, self._upstream
        if pool is not None and upstream is not None:
            pool.release(upstream, reusable=False)
        self._reason = relay.reason
        if relay.reason == IDLE_TIMEOUT:
            self._listener.context.stats(self._listener.name).timeouts += 1
        self._closed()

    def _closed(self) -> None:
        self.state = _CLOSED
        self._log_access()

    def _log_access(self) -> None:
        """The connection's one access line (at its end, or at a drain cut)."""
        listener = self._listener
        if not listener.access_log or self._logged:
            return
        self._logged = True
        relay = self.relay
        pool = self._pool
        fields: dict[str, Any] = {
            "listener": listener.name,
            "protocol": "tcp",
            "client": self._host,
            "upstream": pool.address if pool is not None else None,
            "bytes_up": relay.bytes_up if relay is not None else 0,
            "bytes_down": relay.bytes_down if relay is not None else 0,
            "duration_ms": round((listener.clock.seconds() - self._started) * 1000, 3),
            "reason": self._reason,
        }
        if self._error is not None:
            fields["error"] = self._error
        if self._tls is not None:
            fields.update(self._tls)
        listener.context.access_log.record(fields)


class TCPFactory(Factory):
    """Builds a L{TCPConnection} for each admitted connection."""

    noisy = False

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: Any) -> TCPConnection:
        return TCPConnection(self.listener, getattr(addr, "host", None) or "")


# -- the plugin -----------------------------------------------------------------------------


@implementer(IPlugin, IProtocolPlugin)
class TCPProtocolPlugin:
    """
    C{protocol = "tcp"}: a byte relay to an upstream group.
    """

    name = "tcp"
    description = "raw TCP relay to an upstream group (TLS offload with [listener.tls])"
    #: A byte stream has nothing to say to a client that skipped TLS: close.
    plaintext_answer = b""

    def validate(self, listener: ListenerConfig) -> None:
        if not listener.upstream:
            raise ConfigError("upstream: required key is missing")
        for key in listener.extra:
            raise ConfigError(f"{key}: unknown key")
        for key in _HTTP_KEYS:
            if key == "header_timeout" and listener.proxy_protocol:
                continue  # the PROXY protocol header's wait
            if getattr(listener, key) != _DEFAULTS[key]:
                raise ConfigError(f"{key}: an HTTP setting, not used by protocol tcp")

    def build_factory(self, listener: ListenerConfig, context: ProxyContext) -> TCPFactory:
        group: Upstream[TCPUpstream] = context.upstream(listener.upstream, TCPConnector())
        return TCPFactory(
            _Listener(
                name=listener.name,
                clock=context.clock,
                group=group,
                context=context,
                access_log=listener.access_log,
                idle=idle_queue(context.clock, listener.tunnel_idle_timeout),
                keyed=bool(group.config.send_proxy_protocol),
            )
        )

    def refusal(self, reason: str) -> bytes:
        """A refused client is closed without a word: a byte stream has no error message."""
        return b""
