"""A bounded four-level priority queue: CRITICAL before HIGH before NORMAL before LOW.

Within a level items leave in arrival order (one deque per level, so items are never
compared). At capacity, an arrival of higher priority than the lowest level present
displaces the newest item of that level instead of being refused; optional aging lets old
low-priority items climb so they cannot starve under sustained high-priority load.

It is the pipeline's inference channel, beside ``_channel`` (the other stages' channels),
hence here in the core; users import it from ``orchestrator.enhanced`` (also
``orchestrator.enhanced.priority``), which re-exports it.
"""

from __future__ import annotations

import collections
import enum
import time
from typing import TYPE_CHECKING, Generic, TypeVar, final

import attrs

from orchestrator._waiters import Waiters
from orchestrator.errors import PipelineClosed, QueueFull

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Priority", "PriorityQueue", "QueueStats"]

T = TypeVar("T")


class Priority(enum.IntEnum):
    """Priority levels; a larger value is served first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, value: str | Priority | None) -> Priority:
        """Parse ``"critical"``, ``"high"``, ``"normal"`` or ``"low"``, in any case.

        ``None`` means NORMAL.

        Raises:
            ValueError: For any other value.
        """
        if value is None:
            return cls.NORMAL
        if isinstance(value, Priority):
            return value
        level = _BY_NAME.get(value.lower()) if isinstance(value, str) else None
        if level is None:
            raise ValueError(
                f"unknown priority {value!r}: expected one of critical, high, normal, low"
            )
        return level

    def __str__(self) -> str:
        return self.name.lower()


_BY_NAME = {p.name.lower(): p for p in Priority}
_LEVELS = (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)  # serving order


@attrs.frozen
class QueueStats:
    """A snapshot of a ``PriorityQueue``: the total and the count per level."""

    total: int
    by_priority: dict[Priority, int]


@final
class PriorityQueue(Generic[T]):
    """An asyncio priority queue with four levels, FIFO within a level, optionally bounded.

    Args:
        capacity: Most items held at once; ``None`` means unbounded.
        aging: Seconds of waiting after which an item counts one level higher (so a LOW
            item waiting ``3 * aging`` competes as CRITICAL, FIFO with it by arrival).
            ``None`` (the default) disables aging: strict priority.
        clock: Monotonic time source in seconds, for tests.

    Example:
        >>> async def demo() -> None:
        ...     q: PriorityQueue[str] = PriorityQueue(capacity=100)
        ...     await q.push(Priority.LOW, "later")
        ...     await q.push(Priority.HIGH, "first")
        ...     assert await q.pop() == (Priority.HIGH, "first")
    """

    __slots__ = (
        "_aging",
        "_capacity",
        "_clock",
        "_closed",
        "_getters",
        "_levels",
        "_putters",
        "_seq",
        "_size",
    )

    def __init__(
        self,
        capacity: int | None = None,
        *,
        aging: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 or None, got {capacity}")
        if aging is not None and not aging > 0:
            raise ValueError(f"aging must be > 0 seconds or None, got {aging}")
        self._capacity = capacity
        self._aging = aging
        self._clock = clock
        # Indexed by Priority value; entries are (enqueue time, sequence, item).
        self._levels: tuple[collections.deque[tuple[float, int, T]], ...] = tuple(
            collections.deque() for _ in Priority
        )
        self._size = 0
        self._seq = 0
        self._getters = Waiters()
        self._putters = Waiters()
        self._closed = False

    # -- inspection ------------------------------------------------------------------------

    @property
    def capacity(self) -> int | None:
        """The bound given at construction (``None``: unbounded)."""
        return self._capacity

    def __len__(self) -> int:
        return self._size

    def qsize(self) -> int:
        """Number of items queued."""
        return self._size

    def full(self) -> bool:
        """Whether a push of the lowest level present would be refused."""
        return self._capacity is not None and self._size >= self._capacity

    def empty(self) -> bool:
        """Whether no item is queued."""
        return self._size == 0

    async def stats(self) -> QueueStats:
        """Return the total and the count per level."""
        return self.stats_nowait()

    def stats_nowait(self) -> QueueStats:
        """``stats()`` without awaiting."""
        return QueueStats(total=self._size, by_priority={p: len(self._levels[p]) for p in _LEVELS})

    # -- producers -------------------------------------------------------------------------

    def push_nowait(self, priority: Priority, item: T) -> tuple[Priority, T] | None:
        """Queue ``item`` at ``priority`` without waiting.

        Returns:
            ``None``, or the ``(priority, item)`` displaced to make room when the queue
            was full and ``priority`` is above the lowest level present: the newest item
            of that lowest level. The caller owns the displaced item (fail it, retry it).

        Raises:
            QueueFull: The queue is full and nothing of lower priority can be displaced.
            PipelineClosed: The queue is closed.
        """
        if self._closed:
            raise PipelineClosed("the queue is closed")
        displaced: tuple[Priority, T] | None = None
        if self._capacity is not None and self._size >= self._capacity:
            displaced = self._displace_below(priority)
            if displaced is None:
                raise QueueFull(f"priority queue is full ({self._capacity} items)")
        self._append(priority, item)
        return displaced

    async def push(self, priority: Priority, item: T) -> tuple[Priority, T] | None:
        """Queue ``item`` at ``priority``; see ``push_nowait`` (this never waits)."""
        return self.push_nowait(priority, item)

    async def put(self, priority: Priority, item: T) -> None:
        """Queue ``item``, waiting for room when the queue is full (no displacement).

        Raises:
            PipelineClosed: The queue is closed, or closes while this waits.
        """
        while self._capacity is not None and self._size >= self._capacity and not self._closed:
            await self._putters.wait()
        if self._closed:
            raise PipelineClosed("the queue is closed")
        self._append(priority, item)

    def close(self) -> None:
        """Refuse new items (``push``/``put`` raise ``PipelineClosed``); ``get`` returns
        what is left, then ``None``. Idempotent."""
        self._closed = True
        self._putters.wake_all()
        self._getters.wake_all()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def _append(self, priority: Priority, item: T) -> None:
        self._seq += 1
        now = self._clock() if self._aging is not None else 0.0
        self._levels[priority].append((now, self._seq, item))
        self._size += 1
        if self._getters:
            self._getters.wake_one()

    def _displace_below(self, priority: Priority) -> tuple[Priority, T] | None:
        for level in reversed(_LEVELS):  # LOW first
            if level >= priority:
                return None
            queue = self._levels[level]
            if queue:
                _, _, item = queue.pop()  # the newest of the lowest level present
                self._size -= 1
                return level, item
        return None

    # -- consumers -------------------------------------------------------------------------

    def pop_nowait(self) -> tuple[Priority, T] | None:
        """Take the next item without waiting, or ``None`` when empty."""
        if not self._size:
            return None
        levels = self._levels
        if self._aging is None:
            for level in _LEVELS:
                queue = levels[level]
                if queue:
                    break
        else:
            level = self._aged_choice()
            queue = levels[level]
        _, _, item = queue.popleft()
        self._size -= 1
        if self._putters:
            self._putters.wake_one()
        return level, item

    def _aged_choice(self) -> Priority:
        assert self._aging is not None
        now = self._clock()
        best: tuple[int, int] | None = None
        chosen = Priority.NORMAL
        for level in _LEVELS:
            queue = self._levels[level]
            if queue:
                enqueued, seq, _ = queue[0]
                effective = min(
                    int(level) + int((now - enqueued) / self._aging), int(Priority.CRITICAL)
                )
                key = (-effective, seq)
                if best is None or key < best:
                    best, chosen = key, level
        return chosen

    async def pop(self) -> tuple[Priority, T] | None:
        """Take the next item, or ``None`` when the queue is empty (never waits)."""
        return self.pop_nowait()

    async def get(self) -> tuple[Priority, T] | None:
        """Take the next item, waiting until there is one; ``None`` once the queue is
        closed and empty."""
        while not self._size:
            if self._closed:
                return None
            await self._getters.wait()
        return self.pop_nowait()

    def remove(self, predicate: Callable[[T], bool]) -> list[tuple[Priority, T]]:
        """Remove and return every queued item for which ``predicate`` is true."""
        removed: list[tuple[Priority, T]] = []
        for level in _LEVELS:
            queue = self._levels[level]
            kept = [entry for entry in queue if not predicate(entry[2])]
            if len(kept) != len(queue):
                removed.extend((level, e[2]) for e in queue if predicate(e[2]))
                queue.clear()
                queue.extend(kept)
        self._size -= len(removed)
        for _ in removed:
            if not self._putters:
                break
            self._putters.wake_one()
        return removed
