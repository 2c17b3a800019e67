"""
Fixtures shared by the unit tests: the test-time certificates (made once per module), a
fresh Clock, and a memory reactor standing in for the global one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import twisted.internet
from pki import PKI, make_pki
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


class _Reactor(MemoryReactorClock):
    """Gives a TCP port asked for as 0 a number, as the kernel would."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        listening = super().listenTCP(port, factory, backlog, interface)
        if port == 0:
            listening._hostAddress = IPv4Address("TCP", interface or "0.0.0.0", 43210)
        return listening


@pytest.fixture
def memory_reactor() -> MemoryReactorClock:
    """A memory reactor whose ephemeral TCP ports get a number (43210)."""
    return _Reactor()


@pytest.fixture
def global_reactor(
    memory_reactor: MemoryReactorClock, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MemoryReactorClock]:
    """
    The memory reactor where code imports the global one (C{tap.makeService}, twisted.web's
    C{Site}): the test process never installs a real reactor.
    """
    monkeypatch.setattr(twisted.internet, "reactor", memory_reactor, raising=False)
    yield memory_reactor
