"""FIFO waiting for a turn, shared by the bounded queues (``Channel``, ``PriorityQueue``).
Private."""

from __future__ import annotations

import asyncio
import collections

__all__ = ["Waiters"]


class Waiters:
    """Tasks waiting for a turn (an item, or room), woken one at a time, in order."""

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: collections.deque[asyncio.Future[None]] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._futures)

    async def wait(self) -> None:
        """Wait until ``wake_one`` picks this waiter; a waiter cancelled after it was picked
        passes its turn on, so no wake-up is lost."""
        fut = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        try:
            await fut
        except BaseException:
            fut.cancel()
            if not fut.cancelled():  # woken, then cancelled
                self.wake_one()
            raise

    def wake_one(self) -> None:
        """Wake the longest-waiting task still waiting, if any."""
        futures = self._futures
        while futures:
            fut = futures.popleft()
            if not fut.done():
                fut.set_result(None)
                return
