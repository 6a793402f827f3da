"""``MemoryWorkQueue``: the work queue in front of Inference, in one process. Private.

The ``PriorityQueue``: CRITICAL before HIGH before NORMAL before LOW, FIFO within a level,
optional aging. At capacity a higher-priority job displaces the newest job of the lowest
level present (returned to the caller, who fails it); otherwise ``put`` waits for room,
which is the pipeline's backpressure. Leases need no bookkeeping here: a job taken is in
hand until its record is finished.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from orchestrator._priority import PriorityQueue
from orchestrator.errors import QueueFull

if TYPE_CHECKING:
    from orchestrator._job import Job

__all__ = ["MemoryWorkQueue"]


@final
class MemoryWorkQueue:
    """The in-process ``WorkQueue``."""

    __slots__ = ("_queue",)

    acknowledges = False  # a job taken is in this process's hands until its record finishes

    def __init__(self, capacity: int, *, aging: float | None = None) -> None:
        self._queue: PriorityQueue[Job] = PriorityQueue(capacity, aging=aging)

    def qsize(self) -> int:
        """Jobs queued."""
        return self._queue.qsize()

    async def put(self, job: Job) -> Job | None:
        try:
            displaced = self._queue.push_nowait(job.priority, job)
        except QueueFull:
            await self._queue.put(job.priority, job)
            return None
        return None if displaced is None else displaced[1]

    async def take(self) -> Job | None:
        queue = self._queue
        entry = queue.pop_nowait()
        if entry is None:
            entry = await queue.get()
        return None if entry is None else entry[1]

    async def ack(self, job: Job) -> None:
        pass  # nothing to hand back: the job was in this process's hands only

    async def release(self, job: Job) -> None:
        self._queue.push_nowait(job.priority, job)

    def close(self) -> None:
        self._queue.close()
