"""``Runtime``: the stages of one pipeline, the seams they share, and the one task group
that owns every task of theirs. Private: ``pipeline.py`` admits requests into it.

::

    admission -> rag -> [RAG] -> assemble -> [Assemble] -> work queue -> [Inference slots]
       -> post -> [Post] -> stream -> [Stream] -> store.finish        (and the deadline reaper)

``serving()`` runs them all under one anyio task group; on exit it closes the RAG channel
(admission has stopped), lets closure flow stage to stage for up to the drain timeout,
cancels what is left, and fails every request not finished with ``PipelineClosed``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, final

import anyio

from orchestrator._calls import WorkerCalls
from orchestrator._channel import Channel
from orchestrator._deadlines import Deadlines
from orchestrator._stages import (
    Endings,
    HookStage,
    InferenceStage,
    Running,
    post_work,
    retriever_work,
    store_str,
    stream_work,
    template_work,
)
from orchestrator._store import MemoryStore
from orchestrator._work_queue import MemoryWorkQueue
from orchestrator.enhanced.cache import CachePolicy
from orchestrator.errors import PipelineClosed
from orchestrator.types import RequestStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from orchestrator._job import Job
    from orchestrator.config import PipelineConfig
    from orchestrator.enhanced.dedup import Deduplicator
    from orchestrator.workers.base import ModelWorker

__all__ = ["Runtime"]

logger = logging.getLogger("orchestrator.pipeline")

_CANCEL_GRACE = 5.0  # seconds cancel() waits for a worker call to unwind


@final
class Runtime:
    """One pipeline's stages, channels, store, work queue, deadlines and running work."""

    def __init__(
        self,
        worker: ModelWorker,
        config: PipelineConfig,
        loop: asyncio.AbstractEventLoop,
        dedup: Deduplicator | None,
    ) -> None:
        c = config
        self.loop = loop
        self.store = MemoryStore(
            retention_seconds=c.retention_seconds,
            retention_max=c.retention_max,
            retention_bytes=c.retention_bytes,
            **({} if c.clock is None else {"clock": c.clock}),
        )
        self.cache = (
            None
            if c.cache is None
            else CachePolicy(
                c.cache,
                scope=CachePolicy.scope_of(worker, c.template),
                ttl=c.cache_ttl,
                ignore_meta=c.cache_ignore_meta,
            )
        )
        self.rag: Channel[Job] = Channel(c.rag_capacity)
        assemble: Channel[Job] = Channel(c.assemble_capacity)
        self.queue = MemoryWorkQueue(c.inference_capacity, aging=c.priority_aging)
        post: Channel[Job] = Channel(c.post_capacity)
        stream: Channel[Job] = Channel(c.stream_capacity)
        self._channels = {"rag": self.rag, "assemble": assemble, "post": post, "stream": stream}
        self.deadlines = Deadlines(loop)
        self.running = Running()
        endings = self._endings = Endings(self.store, self.queue)
        calls = WorkerCalls(worker, dedup=dedup, retry=c.retry, breaker=c.circuit_breaker)
        hook_stage = functools.partial(
            HookStage, concurrency=c.stage_concurrency, endings=endings, running=self.running
        )
        self._stages = (
            hook_stage(
                "rag",
                self.rag,
                assemble,
                retriever_work(c.retriever),
                store_str("context", "retriever"),
            ),
            hook_stage(
                "assemble",
                assemble,
                self.queue,
                template_work(c.template),
                store_str("prompt", "template"),
            ),
            InferenceStage(
                self.queue,
                post,
                calls,
                c.max_concurrency,
                store=self.store,
                tokens=self.store,
                endings=endings,
                running=self.running,
            ),
            hook_stage(
                "post",
                post,
                stream,
                post_work(c.post_processors),
                store_str("output", "post processor"),
            ),
            hook_stage(
                "stream",
                stream,
                None,
                stream_work(c.sinks, self.cache),
                endings.complete,
            ),
        )
        self.drain_timeout = c.drain_timeout
        self._drained = anyio.Event()
        self.store.on_finish(self.running.interrupt)  # a cancel or timeout reaches the work

    def queue_depths(self) -> Iterator[tuple[tuple[str, ...], float]]:
        """``(stage,), depth`` for each channel, for the queue-depth gauge."""
        channels = self._channels
        yield ("rag",), float(channels["rag"].qsize())
        yield ("assemble",), float(channels["assemble"].qsize())
        yield ("inference",), float(self.queue.qsize())
        yield ("post",), float(channels["post"].qsize())
        yield ("stream",), float(channels["stream"].qsize())

    async def cancel(self, request_id: str, error: BaseException) -> bool:
        """End the request as cancelled and wait for its worker call to unwind."""
        if not self.cancel_nowait(request_id, error):
            return False
        await self.running.unwound(request_id, _CANCEL_GRACE)
        return True

    def cancel_nowait(self, request_id: str, error: BaseException) -> bool:
        """End the request as cancelled; its worker call is cancelled, not awaited."""
        return self.store.finish_nowait(request_id, RequestStatus.CANCELLED, error=error)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Runtime]:
        """Run every stage until the block ends, then drain (see the module docstring)."""
        try:
            async with anyio.create_task_group() as tg:
                for stage in self._stages[:-1]:
                    tg.start_soon(stage.run)
                tg.start_soon(self._last_stage)
                tg.start_soon(self.deadlines.run, self._endings.expire)
                try:
                    yield self
                finally:
                    self.rag.close()  # closure flows stage to stage as each inbox ends
                    # Cancelled (a stage crashed, or the loop is closing): no drain.
                    task = asyncio.current_task()
                    cancelled = task is not None and task.cancelling() > 0
                    timeout = 0.0 if cancelled else self.drain_timeout
                    with anyio.move_on_after(timeout, shield=True):
                        await self._drained.wait()
                    if not self._drained.is_set() and self.store.in_flight:
                        logger.warning(
                            "shutdown: %d requests unfinished after %.1fs",
                            self.store.in_flight,
                            timeout,
                        )
                    tg.cancel_scope.cancel()  # leftovers cancelled: they fail, none vanish
        except asyncio.CancelledError:  # the loop is closing under the pipeline
            self.fail_leftovers(None)
            raise
        # A stage's crash propagates: the supervisor fails the leftovers, chained to it.
        self.fail_leftovers(None)

    async def _last_stage(self) -> None:
        try:
            await self._stages[-1].run()
        finally:
            self._drained.set()

    def fail_leftovers(self, cause: BaseException | None) -> None:
        """Fail every request not finished with ``PipelineClosed`` (``cause`` chained)."""
        for request_id in self.store.unfinished():
            error = PipelineClosed("the pipeline stopped before the request finished")
            error.__cause__ = cause
            self.store.finish_nowait(request_id, RequestStatus.FAILED, error=error)
