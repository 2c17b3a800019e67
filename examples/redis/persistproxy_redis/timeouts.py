# -*- test-case-name: test_redis_plugin -*-
"""
One reactor timer for many timeouts of the same length.

A command burst arms a response timeout and its last reply disarms it, hundreds of thousands
of times a second under load: a reactor C{callLater} and C{cancel} for each would cost more
than proxying the burst. Items are kept in the order they were (re)armed, which is the order
they expire in, and one call aimed at the oldest handles them all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["TimeoutQueue"]

T = TypeVar("T")


class TimeoutQueue(Generic[T]):
    """
    Items that each expire C{timeout} seconds after they were last added.
    """

    __slots__ = ("_call", "_clock", "_entries", "_on_expire", "timeout")

    def __init__(
        self, clock: IReactorTime, timeout: float, on_expire: Callable[[T], object]
    ) -> None:
        self._clock = clock
        self.timeout = timeout
        self._on_expire = on_expire
        self._entries: OrderedDict[T, float] = OrderedDict()
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item: T) -> bool:
        return item in self._entries

    def add(self, item: T) -> None:
        """(Re)start C{item}'s timeout from now."""
        entries = self._entries
        if item in entries:
            entries.move_to_end(item)
        entries[item] = self._clock.seconds() + self.timeout
        if self._call is None:
            self._call = self._clock.callLater(self.timeout, self._expire)

    def discard(self, item: T) -> None:
        """Stop C{item}'s timeout (the shared call, if it fires first, finds nothing)."""
        self._entries.pop(item, None)

    def _expire(self) -> None:
        self._call = None
        entries = self._entries
        now = self._clock.seconds()
        while entries:
            item, due = next(iter(entries.items()))
            if due > now:
                self._call = self._clock.callLater(due - now, self._expire)
                return
            del entries[item]
            self._on_expire(item)
