"""``Intake``: how a worker process takes jobs from the shared queue into its stages.
Private.

It takes only as many jobs as the process has room for (``limit``: its worker slots, so a
job waits in Redis, where any worker may take it, rather than here), and for each:

- a job whose record finished meanwhile is acknowledged and dropped;
- one delivered more than ``max_deliveries`` times is dead-lettered (its record fails
  with a clear error);
- a streamed job delivered again after its tokens had begun to reach readers fails rather
  than run twice (its text would be stitched from two runs);
- one whose deadline has passed ends ``timeout`` and never reaches the worker;
- the rest go to the RAG stage, their deadlines watched here.

Leases are kept alive (``renew``), dead workers' entries reclaimed (``reclaim``), and on
shutdown what was taken but not started is handed back at once (``hand_back``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, final

import anyio

from orchestrator import metrics
from orchestrator._waiters import Waiters
from orchestrator.errors import BackendUnavailable, InferenceError, RequestTimeout
from orchestrator.types import RequestStatus

if TYPE_CHECKING:
    import asyncio

    from orchestrator._channel import Channel
    from orchestrator._deadlines import Deadlines
    from orchestrator._job import Job
    from orchestrator.distributed._queue import Delivery, RedisWorkQueue
    from orchestrator.distributed._store import RedisStore

__all__ = ["Intake"]

logger = logging.getLogger("orchestrator.distributed")


@final
class Intake:
    """Feeds one worker process's RAG channel from the shared queue."""

    def __init__(
        self,
        queue: RedisWorkQueue,
        store: RedisStore,
        *,
        rag: Channel[Job],
        deadlines: Deadlines,
        loop: asyncio.AbstractEventLoop,
        limit: int,
        max_deliveries: int,
        request_timeout: float,
    ) -> None:
        self._queue = queue
        self._store = store
        self._rag = rag
        self._deadlines = deadlines
        self._loop = loop
        self.limit = limit
        self.max_deliveries = max_deliveries
        self._request_timeout = request_timeout
        self._in_hand: set[str] = set()
        self._room = Waiters()
        self._acks: list[str] = []
        self._ack_ready = Waiters()
        self._stopped = False
        store.on_finish(self._finished)

    @property
    def in_hand(self) -> int:
        """Jobs taken and not finished."""
        return len(self._in_hand)

    def _finished(self, request_id: str, _status: RequestStatus) -> None:
        # Any finish of a job held here, by anyone: its lease may go (acknowledged in
        # batches by ``acknowledge``), and there is room for another.
        if request_id in self._in_hand or self._queue.holds(request_id):
            self._in_hand.discard(request_id)
            self._acks.append(request_id)
            self._ack_ready.wake_all()
            self._room.wake_all()

    async def run(self) -> None:
        """Take jobs until stopped (a task the runtime owns)."""
        reclaim_every = max(0.05, self._queue.reclaim_after / 2)
        next_reclaim = anyio.current_time()
        pause = 0.05
        while not self._stopped:
            free = self.limit - len(self._in_hand)
            if free <= 0:
                await self._room.wait()
                continue
            try:
                deliveries: list[Delivery] = []
                if anyio.current_time() >= next_reclaim:
                    deliveries = await self._queue.reclaim(free)
                    next_reclaim = anyio.current_time() + reclaim_every
                    metrics.RECLAIMS.labels().inc(len(deliveries))
                if not deliveries:
                    deliveries = await self._queue.take(free)
                for delivery in deliveries:
                    await self._accept(delivery)
                pause = 0.05
            except BackendUnavailable as exc:
                logger.warning("worker cannot reach Redis (%s); retrying", exc)
                await anyio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _accept(self, delivery: Delivery) -> None:
        job, store = delivery.job, self._store
        request_id = job.id
        if delivery.finished:
            await self._queue.ack(request_id)
            return
        if self._stopped:
            await self._queue.release([request_id])
            return
        record = store.work_on(job.record)  # type: ignore[arg-type]  # from the queue's job
        self._in_hand.add(request_id)
        if delivery.attempt > 1:
            metrics.REDELIVERIES.labels().inc()
        if delivery.attempt > self.max_deliveries:
            metrics.DEAD_LETTERS.labels().inc()
            reason = f"delivered {delivery.attempt} times without finishing: dead-lettered"
            await self._queue.dead_letter(request_id, reason)
            await store.finish(
                request_id, RequestStatus.FAILED, error=InferenceError(reason, retryable=False)
            )
            return
        if job.stream and delivery.attempt > 1 and delivery.streamed:
            reason = (
                "the worker streaming this request stopped after its tokens had begun to "
                "reach readers; it is not run again (the text would be stitched from two runs)"
            )
            await store.finish(request_id, RequestStatus.FAILED, error=InferenceError(reason))
            return
        if self._loop.time() >= job.deadline:
            await store.finish(
                request_id,
                RequestStatus.TIMEOUT,
                error=RequestTimeout(f"request {request_id} timed out"),
            )
            return
        if delivery.attempt > 1:
            logger.info("running request %s again (delivery %d)", request_id, delivery.attempt)
        timeout = job.request.timeout or self._request_timeout
        self._deadlines.add(record, job.deadline, timeout, len(self._in_hand))
        self._rag.put_nowait(job)

    async def acknowledge(self) -> None:
        """Acknowledge finished jobs' leases in batches, until cancelled (a task)."""
        while True:
            if not self._acks:
                await self._ack_ready.wait()
                continue
            batch, self._acks = self._acks, []
            try:
                await self._queue.ack_many(batch)
            except BackendUnavailable:
                # Their records are finished: a redelivery is acknowledged on arrival.
                logger.warning("could not acknowledge %d jobs; their redeliveries will", len(batch))

    async def renew(self) -> None:
        """Keep the leases held alive, until cancelled (a task)."""
        every = max(0.05, self._queue.reclaim_after / 3)
        while True:
            await anyio.sleep(every)
            try:
                await self._queue.renew()
            except BackendUnavailable as exc:
                logger.warning("could not renew leases (%s)", exc)

    async def hand_back(self) -> None:
        """Stop taking, and give back the jobs held but not started (for a peer to run
        at once); the ones running go on."""
        self._stopped = True
        self._room.wake_all()
        unstarted = [
            record.id
            for record in self._store.working()
            if record.status is RequestStatus.PENDING and self._queue.holds(record.id)
        ]
        await self.give_back(unstarted)

    async def give_back(self, request_ids: list[str]) -> None:
        """Hand these jobs back and stop working on them here."""
        for request_id in request_ids:
            self._store.stop_working(request_id)
            self._in_hand.discard(request_id)
        try:
            await self._queue.release(request_ids)
        except BackendUnavailable as exc:  # their leases expire: reclaimed after all
            logger.warning("could not hand back %d jobs (%s)", len(request_ids), exc)

    def let_go(self, request_id: str) -> None:
        """Stop working on a job whose end could not be recorded, without acknowledging
        it: unrenewed, its lease is reclaimed (here or by a peer) and it runs again."""
        self._queue.forget(request_id)
        self._store.stop_working(request_id)
        self._in_hand.discard(request_id)
        self._room.wake_all()

    def unfinished(self) -> list[str]:
        """The jobs held and not finished (after the drain: to hand back)."""
        return list(self._queue.held())
