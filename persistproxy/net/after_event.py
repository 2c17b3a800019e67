# -*- test-case-name: tests.unit.test_reactor -*-
"""
Work deferred to the end of the current I/O event, with whatever reactor runs.

Kept apart from L{persistproxy.net.reactor}, which imports the epoll reactor at module level:
a protocol that only wants "after this event" must import where epoll does not exist.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

__all__ = ["after_event_caller"]


def after_event_caller(clock: Any) -> Callable[[Callable[[], object]], object]:
    """
    How to run a function once the current I/O event is handled: C{clock.call_after_event}
    under L{ProxyReactor}; the next reactor turn (C{callLater(0)}) with any other reactor,
    a test's C{Clock} included.
    """
    after = getattr(clock, "call_after_event", None)
    if after is not None:
        return after  # type: ignore[no-any-return]
    return partial(clock.callLater, 0)
