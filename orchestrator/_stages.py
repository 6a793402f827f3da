"""The stage loops. Private: ``_runtime.py`` wires them together and owns their tasks.

A hook stage (RAG, Assemble, Post, Stream) takes jobs from its inbox, skips the ones
already finished (cancelled, timed out, displaced), runs its hook and forwards the job,
waiting when the next channel is full (backpressure, which ends as ``Overloaded`` at
admission). A hook that returns an awaitable runs in a task of the stage's own, bounded
per stage, and is cancelled with its request. The Inference stage is ``max_concurrency``
slots, each taking jobs from the work queue one after another. When its inbox closes and
empties, a stage finishes its work in hand and closes its outbox: closure flows stage to
stage, and the pipeline has drained when the last stage ends.

Every ending goes through the request store (``Endings``): its ``on_finish`` listener is
how a cancel or a timeout reaches the task working on the job (``Running``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any, final

import anyio

from orchestrator import metrics
from orchestrator._channel import Channel
from orchestrator._waiters import Waiters
from orchestrator.errors import (
    BackendUnavailable,
    InferenceError,
    Overloaded,
    RequestTimeout,
    StageError,
)
from orchestrator.types import PostOutput, RequestStatus

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from orchestrator._calls import WorkerCalls
    from orchestrator._job import Job
    from orchestrator._seams import RequestStore, TokenStream, WorkQueue
    from orchestrator.enhanced.cache import CachePolicy
    from orchestrator.hooks import OutputSink, PostProcessor, Retriever, Template

__all__ = [
    "Endings",
    "HookStage",
    "HookTasks",
    "InferenceStage",
    "Running",
    "post_work",
    "retriever_work",
    "store_str",
    "stream_work",
    "template_work",
]

logger = logging.getLogger("orchestrator.pipeline")

_FAILED = RequestStatus.FAILED
_COMPLETED = RequestStatus.COMPLETED
_TIMEOUT = RequestStatus.TIMEOUT


@final
class Running:
    """Which task works on which job in this process, so that the end of a request ends
    the work: a slot's worker call, or an async hook's task."""

    __slots__ = ("_tasks", "_unwound")

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._unwound: dict[str, Waiters] = {}

    def begin(self, request_id: str, task: asyncio.Task[Any]) -> None:
        self._tasks[request_id] = task

    def end(self, request_id: str) -> None:
        """The task is done with the job (it may go on serving others)."""
        if self._tasks.pop(request_id, None) is not None and self._unwound:
            waiters = self._unwound.pop(request_id, None)
            if waiters is not None:
                waiters.wake_all()

    def interrupt(self, request_id: str, _status: object = None) -> bool:
        """Cancel the task working on the job, unless it is the caller; whether one was.
        (A request store's finish listener: a cancel or a timeout reaches the work here.)"""
        task = self._tasks.get(request_id)
        if task is None or task is asyncio.current_task():
            return False
        task.cancel()
        return True

    async def unwound(self, request_id: str, within: float) -> None:
        """Wait (at most ``within`` seconds) until no task works on the job."""
        if request_id not in self._tasks:
            return
        waiters = self._unwound.setdefault(request_id, Waiters())
        with anyio.move_on_after(within):
            await waiters.wait()


_AFTER_QUEUE = frozenset({"inference", "post", "stream"})


@final
class Endings:
    """How stages end a job: through the store, exactly once, counted; a job that was
    taken from the work queue has its lease acknowledged once its record is finished.

    A shared store that cannot be reached (``BackendUnavailable``) records nothing: the
    job is handed to ``unreachable`` (a worker lets go of its lease, so that the job runs
    again once the store answers: at least once) and the stage goes on serving."""

    __slots__ = ("_acks", "_queue", "_store", "_unreachable")

    def __init__(
        self,
        store: RequestStore,
        queue: WorkQueue,
        unreachable: Callable[[str], object] | None = None,
    ) -> None:
        self._store = store
        self._queue = queue
        self._acks = queue.acknowledges
        self._unreachable = unreachable

    async def finish(
        self,
        request_id: str,
        status: RequestStatus,
        *,
        result: str | None = None,
        error: BaseException | None = None,
    ) -> bool:
        """``store.finish``, an unreachable store answered as above."""
        try:
            return await self._store.finish(request_id, status, result=result, error=error)
        except BackendUnavailable as exc:
            logger.warning("could not record the end of request %s: %s", request_id, exc)
            if self._unreachable is not None:
                self._unreachable(request_id)
            return False

    async def fail(self, job: Job, stage: str, error: BaseException) -> None:
        if await self.finish(job.id, _FAILED, error=error):
            metrics.ERRORS.labels(stage, type(error).__name__).inc()
        if self._acks and stage in _AFTER_QUEUE:
            await self._queue.ack(job)

    def complete(self, job: Job, _value: object = None) -> Awaitable[object]:
        """The last stage's ``store``: the job completed with its output (to be awaited)."""
        if self._acks or self._unreachable is not None:
            return self._complete_and_ack(job)
        return self._store.finish(job.id, _COMPLETED, result=job.output)  # one process

    async def _complete_and_ack(self, job: Job) -> None:
        await self.finish(job.id, _COMPLETED, result=job.output)
        if self._acks:
            await self._queue.ack(job)

    async def skip(self, job: Job, stage: str) -> None:
        """A stage passes over a job that finished elsewhere (cancelled, timed out)."""
        if self._acks and stage in _AFTER_QUEUE:
            await self._queue.ack(job)

    async def expire(self, request_id: str) -> None:
        await self.finish(
            request_id, _TIMEOUT, error=RequestTimeout(f"request {request_id} timed out")
        )

    def lost(self, request_id: str) -> None:
        """The store could not be reached for this job (see the class)."""
        if self._unreachable is not None:
            self._unreachable(request_id)


@final
class HookTasks:
    """The tasks of one stage's async hooks: at most ``limit`` at once; ``close`` cancels
    and awaits them (the stage owns them, and it ends inside the runtime's task group)."""

    __slots__ = ("_free", "_freed", "_tasks")

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._freed = Waiters()
        self._tasks: set[asyncio.Task[None]] = set()

    async def acquire(self) -> None:
        while self._free <= 0:
            await self._freed.wait()
        self._free -= 1

    def release(self) -> None:
        self._free += 1
        self._freed.wake_one()

    def start(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, *, cancel: bool) -> None:
        """Wait for the hooks in hand to end (cancelling them first if ``cancel``)."""
        while self._tasks:
            pending = list(self._tasks)
            if cancel:
                for task in pending:
                    task.cancel()
            await asyncio.wait(pending)


class HookStage:
    """A stage whose work is a hook: ``work(job)`` returns a value or an awaitable of one,
    ``store(job, value)`` keeps it, then the job moves on (``outbox`` is a ``Channel``, the
    work queue, or ``None`` for the last stage, whose ``store`` ends the job)."""

    def __init__(
        self,
        name: str,
        inbox: Channel[Job],
        outbox: Channel[Job] | WorkQueue | None,
        work: Callable[[Job], Any],
        store: Callable[[Job, Any], Any],
        *,
        concurrency: int,
        endings: Endings,
        running: Running,
    ) -> None:
        self.name = name
        self.inbox = inbox
        self.outbox = outbox
        self.work = work
        self.store = store
        self._endings = endings
        self._running = running
        self._hooks = HookTasks(concurrency)
        self._duration = metrics.STAGE_DURATION.labels(name)

    async def run(self) -> None:
        """Serve jobs until the inbox is closed and empty, then close the outbox."""
        inbox, work, store = self.inbox, self.work, self.store
        items = inbox.items
        duration = self._duration
        clock = time.perf_counter
        outbox = self.outbox
        channel = outbox if isinstance(outbox, Channel) else None
        try:
            while True:
                if not items and not await inbox.wait():
                    break
                job = inbox.get_nowait()
                if job.record.finished_at is not None:
                    await self._endings.skip(job, self.name)
                    continue
                start = clock()
                try:
                    value = work(job)
                    if type(value) is not str and inspect.isawaitable(value):
                        await self._start_hook(job, value, start)
                        continue
                    value = store(job, value)
                    if value is not None:  # the last stage's store may need to await
                        await value
                except Exception as exc:
                    await self._hook_failed(job, exc)
                    continue
                duration.observe(clock() - start)
                if channel is not None and len(channel.items) < channel.maxsize:
                    channel.put_nowait(job)
                elif outbox is not None:
                    await self.forward(job)
            await self._hooks.close(cancel=False)  # drained: the hooks in hand finish
        finally:
            # Stopped, even while waiting for them above: the hooks left are cancelled (not
            # waited for without end) and awaited, since they are this stage's.
            with anyio.CancelScope(shield=True):
                await self._hooks.close(cancel=True)
            if outbox is not None:
                outbox.close()

    async def forward(self, job: Job) -> None:
        """Hand ``job`` to the next stage, waiting for room when it is full."""
        outbox = self.outbox
        if isinstance(outbox, Channel):
            await outbox.put(job)
            return
        assert outbox is not None
        try:
            displaced = await outbox.put(job)
        except Overloaded as exc:
            metrics.SHED.labels("inference").inc()
            await self._endings.fail(job, "inference", exc)
            return
        if displaced is not None:
            metrics.SHED.labels("inference").inc()
            await self._endings.fail(
                displaced,
                "inference",
                Overloaded(
                    f"request {displaced.id} was displaced by higher-priority work",
                    stage="inference",
                ),
            )

    async def _start_hook(self, job: Job, value: Awaitable[Any], start: float) -> None:
        hooks = self._hooks
        await hooks.acquire()
        if job.record.finished_at is not None:  # finished while we waited for a slot
            hooks.release()
            _discard(value)
            await self._endings.skip(job, self.name)
            return
        task = hooks.start(self._finish_hook(job, value, start))
        self._running.begin(job.id, task)  # a timeout or cancel of the job ends the hook

    async def _finish_hook(self, job: Job, value: Awaitable[Any], start: float) -> None:
        try:
            try:
                result = self.store(job, await value)
                if result is not None:
                    await result
            except Exception as exc:
                await self._hook_failed(job, exc)
                return
            finally:
                self._hooks.release()
                self._running.end(job.id)
            self._duration.observe(time.perf_counter() - start)
            if job.record.finished_at is not None:
                await self._endings.skip(job, self.name)
            elif self.outbox is not None:
                await self.forward(job)
        except asyncio.CancelledError:
            if job.record.finished_at is None:
                raise  # the pipeline is stopping; it fails the job
            await self._endings.skip(job, self.name)

    async def _hook_failed(self, job: Job, exc: Exception) -> None:
        logger.warning("%s hook failed for request %s: %r", self.name, job.id, exc)
        error = StageError(self.name, repr(exc))
        error.__cause__ = exc
        await self._endings.fail(job, self.name, error)


class InferenceStage:
    """``max_concurrency`` slots, each taking jobs from the work queue, highest priority
    first, and making one worker call at a time: a worker call per slot, no task per
    request. A job whose deadline has passed when a slot takes it never reaches the
    worker (the deadline timer cannot run while a slot serves the queue back to back).
    """

    name = "inference"

    def __init__(
        self,
        inbox: WorkQueue,
        outbox: Channel[Job],
        calls: WorkerCalls,
        max_concurrency: int,
        *,
        store: RequestStore,
        tokens: TokenStream,
        endings: Endings,
        running: Running,
    ) -> None:
        self.inbox = inbox
        self.outbox = outbox
        self.calls = calls
        self.max_concurrency = max_concurrency
        self._store = store
        self._tokens = tokens
        self._endings = endings
        self._running = running
        self._duration = metrics.STAGE_DURATION.labels("inference")
        self._latency = metrics.WORKER_LATENCY.labels(calls.name)
        self._chunks = metrics.WORKER_TOKENS.labels(calls.name, "chunks")
        self._acks = inbox.acknowledges

    async def run(self) -> None:
        """Run the slots until the work queue is closed and empty, then close the outbox."""
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.max_concurrency):
                    tg.start_soon(self._slot)
        finally:
            self.outbox.close()

    async def _slot(self) -> None:
        take, ack = self.inbox.take, self._ack
        me = asyncio.current_task()
        assert me is not None
        loop = me.get_loop()
        while (job := await take()) is not None:
            if job.record.finished_at is not None:
                await ack(job)
            elif loop.time() >= job.deadline:
                await self._endings.expire(job.id)
                await ack(job)
            else:
                await self._call(job, me)  # it acknowledges the job once it ends

    async def _ack(self, job: Job) -> None:
        if self._acks:
            await self.inbox.ack(job)

    async def _call(self, job: Job, me: asyncio.Task[Any]) -> None:
        try:
            started = await self._store.start(job.id)
        except BackendUnavailable as exc:
            logger.warning("could not start request %s: %s", job.id, exc)
            self._endings.lost(job.id)
            return
        if not started:
            await self._ack(job)
            return
        start = time.perf_counter()
        running = self._running
        running.begin(job.id, me)  # from here, the end of the request cancels this call
        try:
            if job.stream:
                tokens = await self._stream(job)
            else:
                tokens = await self.calls.infer(job.prompt)
                await self._tokens.append_tokens(job.id, tokens)
        except asyncio.CancelledError:
            running.end(job.id)
            if job.record.finished_at is None:
                raise  # the pipeline is stopping; it fails the job
            me.uncancel()  # the cancellation was this job's alone: serve the next one
            await self._ack(job)
            return
        except Exception as exc:
            running.end(job.id)
            await self._endings.fail(job, "inference", self._as_inference_error(exc))
            return
        running.end(job.id)
        elapsed = time.perf_counter() - start
        self._latency.observe(elapsed)
        self._duration.observe(elapsed)
        self._chunks.inc(len(tokens))
        if job.record.finished_at is not None:
            await self._ack(job)
            return
        job.output = "".join(tokens)
        outbox = self.outbox
        if len(outbox.items) < outbox.maxsize:
            outbox.put_nowait(job)
        else:
            await outbox.put(job)

    async def _stream(self, job: Job) -> list[str]:
        tokens: list[str] = []
        append, request_id = self._tokens.append_tokens, job.id
        stream = self.calls.stream(job.prompt)
        try:
            async for token in stream:
                tokens.append(token)
                await append(request_id, (token,))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return tokens

    def _as_inference_error(self, exc: Exception) -> InferenceError:
        if isinstance(exc, InferenceError):
            return exc
        name = self.calls.name
        error = InferenceError(f"{name} worker failed: {exc!r}", worker=name)
        error.__cause__ = exc
        return error


def _discard(value: Any) -> None:
    """Close a hook's coroutine that will never run (no 'never awaited' warning)."""
    close = getattr(value, "close", None)
    if close is not None:
        close()


# -- what the hook stages do ----------------------------------------------------------------


def retriever_work(retriever: Retriever | None) -> Callable[[Job], Any]:
    """RAG: the retriever's context for the request (none without a retriever)."""
    if retriever is None:
        return lambda job: ""
    return lambda job: retriever(job.request)


def template_work(template: Template) -> Callable[[Job], Any]:
    """Assemble: the prompt from the template."""
    if isinstance(template, str):
        fmt = template.format
        return lambda job: fmt(context=job.context, input=job.request.input)
    return lambda job: template(job.request, job.context)


def post_work(processors: tuple[PostProcessor, ...]) -> Callable[[Job], Any]:
    """Post: run the processors in order over the output (async ones awaited)."""

    def work(job: Job) -> Any:
        text = job.output
        for i, processor in enumerate(processors):
            result = processor(job.request, text)
            if type(result) is not str and inspect.isawaitable(result):
                return _post_rest(processors[i + 1 :], job, result)
            text = result
        return text

    return work


async def _post_rest(
    processors: tuple[PostProcessor, ...], job: Job, pending: Awaitable[str]
) -> str:
    text = await pending
    for processor in processors:
        result = processor(job.request, text)
        text = await result if inspect.isawaitable(result) else result
    return text


def store_str(field: str, hook: str) -> Callable[[Job, Any], None]:
    """A ``store`` keeping a hook's text in ``job.<field>``; anything else than a ``str``
    is the hook's bug (``TypeError``, so the request fails with ``StageError``)."""

    def store(job: Job, value: Any) -> None:
        if type(value) is not str:
            raise TypeError(f"the {hook} returned {type(value).__name__}, expected str")
        setattr(job, field, value)

    return store


def stream_work(sinks: tuple[OutputSink, ...], cache: CachePolicy | None) -> Callable[[Job], Any]:
    """Stream: call each sink with the output, then store it in the cache when the
    request missed it (before the job completes: once a request completed, the same
    request finds its answer in the cache)."""

    def work(job: Job) -> Any:
        pending: Awaitable[Any] | None = None
        if sinks:
            output = PostOutput(job.request, job.output)
            for i, sink in enumerate(sinks):
                result = sink(output)
                if inspect.isawaitable(result):
                    pending = _sinks_rest(sinks[i + 1 :], output, result)
                    break
        key = job.cache_key
        if cache is not None and key is not None:
            if pending is None and cache.store_nowait(key, job.output):
                return ""
            return _then_store(pending, cache, key, job.output)
        return "" if pending is None else pending

    return work


async def _sinks_rest(
    sinks: tuple[OutputSink, ...], output: PostOutput, pending: Awaitable[Any]
) -> str:
    await pending
    for sink in sinks:
        result = sink(output)
        if inspect.isawaitable(result):
            await result
    return ""


async def _then_store(
    pending: Awaitable[Any] | None, cache: CachePolicy, key: str, text: str
) -> str:
    if pending is not None:
        await pending
    await cache.store(key, text)  # an outage degrades to a skipped store, never an error
    return ""
