"""``spawn``: a task that starts at once where Python allows it. Private.

On Python 3.12+ a task can start eagerly: it runs until its first real suspension before
``spawn`` returns, so a call that completes synchronously costs no trip through the event
loop (and a call that does suspend behaves exactly like any task: it is the current task
from its first line). On 3.11 this is ``loop.create_task``. Callers must expect the task
to be done already when ``spawn`` returns.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = ["spawn"]

T = TypeVar("T")


def spawn(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Start ``coro`` as a task of ``loop`` (eagerly on Python 3.12+)."""
    return loop.create_task(coro)


if sys.version_info >= (3, 12):

    def spawn(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start ``coro`` as a task of ``loop`` (eagerly on Python 3.12+)."""
        return asyncio.Task(coro, loop=loop, eager_start=True)
