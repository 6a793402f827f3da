"""``Deadlines``: request deadlines on one event-loop timer and one reaper task. Private.

A ``loop.call_at`` per request costs a timer handle and a heap push with Python-level
comparisons. Requests sharing a timeout get deadlines in submission order, so one deque
per distinct timeout stays sorted; a single timer is armed for the earliest head, and when
it rings the reaper (``run``, a task the runtime owns) ends every request whose deadline
passed, through the request store like any other ending.
"""

from __future__ import annotations

import collections
import math
import time
from typing import TYPE_CHECKING, final

from orchestrator._waiters import Waiters

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Awaitable, Callable

    from orchestrator._seams import RequestRecord

__all__ = ["Deadlines"]

# asyncio runs a timer up to one clock tick early; a deadline that close has passed.
_RESOLUTION = time.get_clock_info("monotonic").resolution


@final
class Deadlines:
    """The deadlines of the requests in flight; ``run`` expires them (finished ones
    skipped)."""

    __slots__ = ("_buckets", "_due", "_loop", "_ring", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[float, collections.deque[tuple[float, RequestRecord]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._due = False
        self._ring = Waiters()

    def add(self, record: RequestRecord, deadline: float, timeout: float, live: int) -> None:
        """Expire ``record`` at ``deadline`` (loop time), ``timeout`` seconds after now;
        ``live`` is how many are in flight (it bounds the finished entries kept)."""
        bucket = self._buckets.get(timeout)
        if bucket is None:
            bucket = self._buckets[timeout] = collections.deque()
        else:
            while bucket and bucket[0][1].finished_at is not None:  # finished heads leave
                bucket.popleft()
            if len(bucket) > 2 * live + 64:  # a stuck head holds finished entries: compact
                kept = [entry for entry in bucket if entry[1].finished_at is None]
                bucket.clear()
                bucket.extend(kept)
        bucket.append((deadline, record))
        if deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._rang)

    def _rang(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._due = True
        self._ring.wake_all()

    def _take_due(self) -> list[str]:
        now = self._loop.time() + _RESOLUTION
        due: list[str] = []
        earliest = math.inf
        for bucket in self._buckets.values():
            while bucket and (bucket[0][1].finished_at is not None or bucket[0][0] <= now):
                _, record = bucket.popleft()
                if record.finished_at is None:
                    due.append(record.id)
            if bucket and bucket[0][0] < earliest:
                earliest = bucket[0][0]
        if earliest < self._timer_at:
            self._arm(earliest)
        return due

    async def run(self, expire: Callable[[str], Awaitable[object]]) -> None:
        """Expire requests as their deadlines pass, until cancelled (the reaper)."""
        try:
            while True:
                if not self._due:
                    await self._ring.wait()
                self._due = False
                for request_id in self._take_due():
                    await expire(request_id)
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = math.inf
            self._buckets.clear()
