"""``Channel``: the bounded single-consumer FIFO between two stages. Private.

Measured against ``asyncio.Queue`` and anyio memory streams (see docs/benchmarks.md): a
stage takes every item already queued without awaiting, and an await happens only when the
channel is empty (consumer) or full (producer), so a burst crosses a stage in one step.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Generic, TypeVar, final

from orchestrator._waiters import Waiters
from orchestrator.errors import QueueFull

__all__ = ["Channel"]

T = TypeVar("T")


@final
class Channel(Generic[T]):
    """A bounded FIFO with one consumer; producers may wait for room."""

    __slots__ = ("_getter", "_putters", "items", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: collections.deque[T] = collections.deque()
        self._getter: asyncio.Future[None] | None = None
        self._putters = Waiters()

    def qsize(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        return len(self.items) >= self.maxsize

    def put_nowait(self, item: T) -> None:
        """Append ``item`` or raise ``QueueFull``."""
        if len(self.items) >= self.maxsize:
            raise QueueFull(f"channel is full ({self.maxsize} items)")
        self.items.append(item)
        getter = self._getter
        if getter is not None:
            self._getter = None
            if not getter.done():
                getter.set_result(None)

    async def put(self, item: T) -> None:
        """Append ``item``, waiting while the channel is full."""
        while len(self.items) >= self.maxsize:
            await self._putters.wait()
        self.put_nowait(item)

    def get_nowait(self) -> T:
        """Take the oldest item (the caller checked ``items`` is not empty)."""
        item = self.items.popleft()
        if self._putters:
            self._putters.wake_one()
        return item

    async def wait(self) -> None:
        """Wait until an item is queued (one consumer only)."""
        while not self.items:
            fut = asyncio.get_running_loop().create_future()
            self._getter = fut
            try:
                await fut
            finally:
                self._getter = None

    async def get(self) -> T:
        """Take the oldest item, waiting for one."""
        if not self.items:
            await self.wait()
        return self.get_nowait()
