"""``Waiters``: the one way the core waits for something to happen. Private.

Tasks wait for a turn (an item, room in a queue) or for an outcome (a request finished, a
token arrived, a call unwound). ``wake_one`` hands the turn to the longest waiting task,
``wake_all`` wakes every one. A plain future per waiter, which is what ``asyncio.Event``
and ``asyncio.Queue`` use underneath, without their per-object overhead.

It is a ``deque`` of those futures, so that "is anyone waiting?" (``if waiters:``), asked
on every hand-off between stages, costs no Python-level call.
"""

from __future__ import annotations

import asyncio
import collections
from typing import final

__all__ = ["Waiters"]


@final
class Waiters(collections.deque[asyncio.Future[None]]):
    """Tasks waiting, woken one at a time in order (``wake_one``) or all at once.

    Truthy while a waiter may be left (a waiter that left may still count until the next
    wake-up skips it).
    """

    __slots__ = ()

    async def wait(self) -> None:
        """Wait until woken. A waiter cancelled after ``wake_one`` picked it passes its turn
        on, so no wake-up is lost."""
        fut = asyncio.get_running_loop().create_future()
        self.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():  # woken, then cancelled
                self.wake_one()
            else:  # left while waiting: the wake-ups skip it (no O(n) removal)
                fut.cancel()
            raise

    def wake_one(self) -> None:
        """Wake the longest-waiting task still waiting, if any."""
        while self:
            fut = self.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def wake_all(self) -> None:
        """Wake every task waiting."""
        while self:
            fut = self.popleft()
            if not fut.done():
                fut.set_result(None)
