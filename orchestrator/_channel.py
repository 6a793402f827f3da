"""``Channel``: the bounded single-consumer FIFO between two stages. Private.

Measured against ``asyncio.Queue`` and anyio memory streams (see docs/benchmarks.md): a
stage takes every item already queued without awaiting, and an await happens only when the
channel is empty (consumer) or full (producer), so a burst crosses a stage in one step.

A channel closes like an anyio memory stream: after ``close()`` producers get
``PipelineClosed`` (those waiting for room at once), and the consumer takes what is left,
then ``get`` raises ``ChannelClosed`` (``wait`` returns ``False``): the end of its input.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar, final

from orchestrator._waiters import Waiters
from orchestrator.errors import PipelineClosed, QueueFull

__all__ = ["Channel", "ChannelClosed"]

T = TypeVar("T")


class ChannelClosed(Exception):
    """The channel is closed and empty: its consumer has nothing more to take."""


@final
class Channel(Generic[T]):
    """A bounded FIFO with one consumer; producers may wait for room."""

    __slots__ = ("_closed", "_getter", "_putters", "items", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: collections.deque[T] = collections.deque()
        self._getter = Waiters()
        self._putters = Waiters()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (items may be left for the consumer)."""
        return self._closed

    def qsize(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        return len(self.items) >= self.maxsize

    def put_nowait(self, item: T) -> None:
        """Append ``item``.

        Raises:
            QueueFull: The channel is full.
            PipelineClosed: The channel is closed.
        """
        if self._closed:
            raise PipelineClosed("the pipeline is shutting down and admits no new requests")
        if len(self.items) >= self.maxsize:
            raise QueueFull(f"channel is full ({self.maxsize} items)")
        self.items.append(item)
        if self._getter:
            self._getter.wake_one()

    async def put(self, item: T) -> None:
        """Append ``item``, waiting while the channel is full.

        Raises:
            PipelineClosed: The channel is closed, or closes while this waits.
        """
        await self.wait_for_room()
        self.put_nowait(item)

    async def wait_for_room(self) -> None:
        """Wait until an item fits (another producer may take the room first).

        Raises:
            PipelineClosed: The channel is closed, or closes while this waits.
        """
        while len(self.items) >= self.maxsize and not self._closed:
            await self._putters.wait()
        if self._closed:
            raise PipelineClosed("the pipeline is shutting down and admits no new requests")

    def get_nowait(self) -> T:
        """Take the oldest item (the caller checked ``items`` is not empty)."""
        item = self.items.popleft()
        if self._putters:
            self._putters.wake_one()
        return item

    async def wait(self) -> bool:
        """Wait until an item is queued (one consumer only); ``False`` once the channel is
        closed and empty."""
        while not self.items:
            if self._closed:
                return False
            await self._getter.wait()
        return True

    async def get(self) -> T:
        """Take the oldest item, waiting for one.

        Raises:
            ChannelClosed: The channel is closed and empty.
        """
        if not self.items and not await self.wait():
            raise ChannelClosed
        return self.get_nowait()

    def close(self) -> None:
        """Refuse new items; wake the producers waiting for room (they raise
        ``PipelineClosed``) and the consumer (it takes what is left). Idempotent."""
        self._closed = True
        self._putters.wake_all()
        self._getter.wake_all()
