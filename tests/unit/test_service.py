"""
Graceful drain with a Clock: stop accepting, close idle connections at once, give busy ones
drain_timeout (and not a moment less), then cut what is left.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure

from persistproxy.config import parse_config
from persistproxy.logs import make_event_log
from persistproxy.service import ProxyService
from persistproxy.tap import protocol_plugins


class _Transport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class _Connection:
    def __init__(self, idle: bool) -> None:
        self.idle = idle
        self.closed = False
        self.transport = _Transport()

    def close_if_idle(self) -> bool:
        if self.idle:
            self.closed = True
        return self.idle

    def drain_cut(self) -> None:
        self.transport.abortConnection()


def _service(clock: Clock) -> ProxyService:
    doc = {
        "drain_timeout": 5,
        "listener": [{"name": "web", "bind": "tcp:0", "upstream": "app"}],
        "upstream": [{"name": "app", "servers": ["127.0.0.1:1"]}],
    }
    config = parse_config(doc, "<test>", {n: p.validate for n, p in protocol_plugins().items()})
    return ProxyService(clock, config, protocol_plugins(), make_event_log(io.StringIO()))


def test_drain_closes_idle_at_once_and_waits_for_busy_ones_up_to_the_timeout() -> None:
    clock = Clock()
    service = _service(clock)
    idle, busy = _Connection(idle=True), _Connection(idle=False)
    service.connections.add(idle)
    service.connections.add(busy)
    done: list[Any] = []
    service.stopService().addBoth(done.append)
    assert service.draining()
    assert idle.closed and not busy.closed
    service.connections.discard(idle)
    clock.advance(4.9)
    assert not done and not busy.transport.aborted
    clock.advance(0.2)
    assert busy.transport.aborted
    assert len(done) == 1 and not isinstance(done[0], Failure), done


def test_drain_ends_as_soon_as_the_last_connection_closes() -> None:
    clock = Clock()
    service = _service(clock)
    busy = _Connection(idle=False)
    service.connections.add(busy)
    done: list[Any] = []
    service.stopService().addBoth(done.append)
    clock.advance(1)
    assert not done
    service.connections.discard(busy)
    assert len(done) == 1 and not isinstance(done[0], Failure), done
    assert not busy.transport.aborted
    assert not clock.getDelayedCalls(), "the drain timer was cancelled"
