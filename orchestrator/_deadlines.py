"""``Deadlines``: request deadlines on one event-loop timer. Private.

A ``loop.call_at`` per request costs a timer handle and a heap push with Python-level
comparisons. Requests sharing a timeout get deadlines in submission order, so one deque
per distinct timeout stays sorted; a single timer is armed for the earliest head.
"""

from __future__ import annotations

import collections
import math
import time
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    import asyncio

    from orchestrator.ticket import Ticket

__all__ = ["Deadlines"]

# asyncio runs a timer up to one clock tick early; a deadline that close has passed.
_RESOLUTION = time.get_clock_info("monotonic").resolution


@final
class Deadlines:
    """Expires tickets whose deadline passed (``Ticket.expire``), finished ones skipped."""

    __slots__ = ("_buckets", "_loop", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[float, collections.deque[tuple[float, Ticket]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def add(self, ticket: Ticket, timeout: float, live: int) -> None:
        """Expire ``ticket`` ``timeout`` seconds from now; ``live`` is how many are in flight."""
        when = self._loop.time() + timeout
        ticket.deadline = when
        bucket = self._buckets.get(timeout)
        if bucket is None:
            bucket = self._buckets[timeout] = collections.deque()
        else:
            while bucket and bucket[0][1]._done:  # finished heads leave at once
                bucket.popleft()
            if len(bucket) > 2 * live + 64:  # a stuck head holds finished entries: compact
                kept = [entry for entry in bucket if not entry[1]._done]
                bucket.clear()
                bucket.extend(kept)
        bucket.append((when, ticket))
        if when < self._timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = self._loop.time() + _RESOLUTION
        earliest = math.inf
        for bucket in self._buckets.values():
            while bucket and (bucket[0][1]._done or bucket[0][0] <= now):
                _, ticket = bucket.popleft()
                if not ticket._done:
                    ticket.expire()
            if bucket and bucket[0][0] < earliest:
                earliest = bucket[0][0]
        if earliest < math.inf:
            self._arm(earliest)

    def close(self) -> None:
        """Stop the timer and forget every deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf
        self._buckets.clear()
