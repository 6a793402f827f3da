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
import contextlib
import functools
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, final

import anyio
import anyio.abc

from orchestrator._calls import WorkerCalls
from orchestrator._channel import Channel
from orchestrator._deadlines import Deadlines
from orchestrator._seams import RequestStore, TokenStream
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
from orchestrator.errors import OrchestratorError, PipelineClosed
from orchestrator.types import RequestStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
    from contextlib import AbstractAsyncContextManager

    from orchestrator._job import Job
    from orchestrator._seams import RequestRecord
    from orchestrator.config import PipelineConfig
    from orchestrator.enhanced.dedup import Deduplicator
    from orchestrator.types import PromptRequest
    from orchestrator.workers.base import ModelWorker

__all__ = ["Runtime"]

logger = logging.getLogger("orchestrator.pipeline")

_CANCEL_GRACE = 5.0  # seconds cancel() waits for a worker call to unwind


@final
class Runtime:
    """One pipeline's stages, channels, store, work queue, deadlines and running work."""

    def __init__(
        self,
        worker: ModelWorker | None,
        config: PipelineConfig,
        loop: asyncio.AbstractEventLoop,
        dedup: Deduplicator | None,
        shared: Shared | None = None,
    ) -> None:
        c = config
        self.loop = loop
        self.shared = shared
        self.store: Seams = (
            MemoryStore(
                retention_seconds=c.retention_seconds,
                retention_max=c.retention_max,
                retention_bytes=c.retention_bytes,
                **({} if c.clock is None else {"clock": c.clock}),
            )
            if shared is None
            else shared.store
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
        endings = self._endings = Endings(
            self.store, self.queue, None if shared is None else shared.lost
        )
        calls = WorkerCalls(
            worker if worker is not None else _NoWorker(),
            dedup=dedup,
            retry=c.retry,
            breaker=c.circuit_breaker,
        )
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
        self._runs_stages = worker is not None
        self.drain_timeout = c.drain_timeout
        self._drained = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self.store.on_finish(self.running.interrupt)  # a cancel or timeout reaches the work
        if shared is not None:
            shared.attach(self)

    def queue_depths(self) -> Iterator[tuple[tuple[str, ...], float]]:
        """``(stage,), depth`` for each channel, for the queue-depth gauge."""
        channels = self._channels
        yield ("rag",), float(channels["rag"].qsize())
        yield ("assemble",), float(channels["assemble"].qsize())
        yield ("inference",), float(self.queue.qsize())
        yield ("post",), float(channels["post"].qsize())
        yield ("stream",), float(channels["stream"].qsize())

    async def cancel(self, request_id: str, error: BaseException) -> bool:
        """End the request as cancelled and wait for its worker call to unwind (when it
        runs in this process)."""
        if not await self.store.finish(request_id, RequestStatus.CANCELLED, error=error):
            return False
        await self.running.unwound(request_id, _CANCEL_GRACE)
        return True

    def cancel_nowait(self, request_id: str, error: BaseException) -> bool:
        """End the request as cancelled; its worker call is cancelled, not awaited.

        With a shared store the finish is sent by a task of the runtime's, and the answer
        is whether the request was unfinished as far as this process knows."""
        store = self.store
        if isinstance(store, MemoryStore):
            return store.finish_nowait(request_id, RequestStatus.CANCELLED, error=error)
        record = store.peek(request_id)
        if self._tg is None or (record is not None and record.finished_at is not None):
            return False
        self._tg.start_soon(self._finish_quietly, request_id, error)
        return True

    async def _finish_quietly(self, request_id: str, error: BaseException) -> None:
        try:
            await self.store.finish(request_id, RequestStatus.CANCELLED, error=error)
        except OrchestratorError as exc:  # Redis down: the request goes on, say so
            logger.warning("could not cancel %s: %s", request_id, exc)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Runtime]:
        """Run every stage until the block ends, then drain (see the module docstring).

        A stage's crash propagates (an exception group) after the leftovers are ended,
        chained to it."""
        shared = self.shared
        async with shared.opened() if shared is not None else contextlib.nullcontext():
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    self._start(tg)
                    try:
                        yield self
                    finally:
                        await self._drain(tg)
            except asyncio.CancelledError:  # the loop is closing under the pipeline
                with anyio.CancelScope(shield=True):
                    await self.end_leftovers(None)
                raise
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    await self.end_leftovers(_lone(exc))
                raise
            finally:
                self._tg = None
            await self.end_leftovers(None)

    def _start(self, tg: anyio.abc.TaskGroup) -> None:
        if self._runs_stages:
            for stage in self._stages[:-1]:
                tg.start_soon(stage.run)
            tg.start_soon(self._last_stage)
        else:  # a frontend: nothing runs here but admission and its deadlines
            self._drained.set()
        tg.start_soon(self.deadlines.run, self._endings.expire)
        if self.shared is not None:
            for task in self.shared.tasks():
                tg.start_soon(task)

    async def _drain(self, tg: anyio.abc.TaskGroup) -> None:
        if self.shared is not None:  # stop taking work; hand back what waits
            with anyio.CancelScope(shield=True):
                await self.shared.stop()
        self.rag.close()  # closure flows stage to stage as each inbox ends
        # Cancelled (a stage crashed, or the loop is closing): no drain.
        task = asyncio.current_task()
        cancelled = task is not None and task.cancelling() > 0
        timeout = 0.0 if cancelled else self.drain_timeout
        with anyio.move_on_after(timeout, shield=True):
            await self._drained.wait()
        if not self._drained.is_set() and self.store.in_flight:
            logger.warning(
                "shutdown: %d requests unfinished after %.1fs", self.store.in_flight, timeout
            )
        tg.cancel_scope.cancel()  # leftovers cancelled: they end, none vanish

    async def _last_stage(self) -> None:
        try:
            await self._stages[-1].run()
        finally:
            self._drained.set()

    async def end_leftovers(self, cause: BaseException | None) -> None:
        """In one process: fail every request not finished with ``PipelineClosed``
        (``cause`` chained). With a shared store the requests outlive this process: the
        jobs it held go back to its peers."""
        if self.shared is not None:
            await self.shared.leftovers()
            return
        store = self.store
        assert isinstance(store, MemoryStore)
        for request_id in store.unfinished():
            error = PipelineClosed("the pipeline stopped before the request finished")
            error.__cause__ = cause
            store.finish_nowait(request_id, RequestStatus.FAILED, error=error)


class Seams(RequestStore, TokenStream, Protocol):
    """A request store that keeps the tokens too, with what the runtime asks of it."""

    @property
    def in_flight(self) -> int: ...

    def peek(self, request_id: str) -> RequestRecord | None: ...


class Shared(Protocol):
    """What a pipeline over a shared store (Redis) adds to the runtime: its store, the
    tasks that feed and tend it, and how its work stops."""

    @property
    def store(self) -> Seams: ...

    @property
    def admits(self) -> bool:
        """Whether this process takes requests (a frontend, or both roles)."""
        ...

    @property
    def runs_work(self) -> bool:
        """Whether this process runs requests (a worker, or both roles)."""
        ...

    def new_record(self, request: PromptRequest, *, stream: bool) -> RequestRecord:
        """The record of a request about to be admitted here."""
        ...

    async def admit(self, job: Job) -> RequestRecord:
        """Record ``job`` and queue it for the workers, refusing at capacity
        (``Overloaded``) or a duplicate id (``InvalidRequest``)."""
        ...

    async def completed(self, request: PromptRequest, text: str) -> RequestRecord:
        """Record a request answered at admission (from the cache)."""
        ...

    def attach(self, runtime: Runtime) -> None:
        """Called once the runtime's channels and deadlines exist."""
        ...

    def tasks(self) -> list[Callable[[], Coroutine[Any, Any, object]]]:
        """Run under the runtime's task group until it stops."""
        ...

    async def stop(self) -> None:
        """Shutdown began: stop taking work, hand back what was taken and not started."""
        ...

    async def leftovers(self) -> None:
        """After the drain: hand back what is left (its requests live on elsewhere)."""
        ...

    def lost(self, request_id: str) -> None:
        """The shared store could not record a job's end: let go of the job here (it
        runs again once the store answers)."""
        ...

    def opened(self) -> AbstractAsyncContextManager[object]:
        """Hold the connections for the runtime's life."""
        ...


def _lone(exc: BaseException) -> BaseException:
    """A lone exception out of (nested) exception groups, as starlette's
    ``collapse_excgroups`` does; a group of several stays a group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _NoWorker:
    """The worker of a frontend, which runs no stage: never called."""

    name = "none"

    async def infer(self, prompt: str) -> list[str]:
        raise RuntimeError("a frontend runs no worker calls")

    def stream(self, prompt: str) -> AsyncIterator[str]:
        raise RuntimeError("a frontend runs no worker calls")
