"""The five stage loops. Private: ``pipeline.py`` wires them together.

A stage takes tickets from its inbox, skips the ones already finished (cancelled, timed
out, displaced), runs its hook and forwards the ticket to the next channel, waiting when
that channel is full (backpressure, which ends as ``Overloaded`` at admission). A hook
that returns an awaitable runs in a task of its own, bounded per stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any

from orchestrator import metrics
from orchestrator._channel import Channel
from orchestrator._tasks import spawn
from orchestrator.errors import InferenceError, Overloaded, QueueFull, StageError
from orchestrator.types import PostOutput, RequestStatus
from orchestrator.workers.base import worker_name

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

    from orchestrator.enhanced.cache import CacheLayer
    from orchestrator.enhanced.circuit_breaker import CircuitBreaker
    from orchestrator.enhanced.dedup import Deduplicator
    from orchestrator.enhanced.priority import PriorityQueue
    from orchestrator.enhanced.retry import RetryPolicy
    from orchestrator.ticket import Ticket
    from orchestrator.workers.base import ModelWorker

logger = logging.getLogger("orchestrator.pipeline")

_FAILED = RequestStatus.FAILED
_COMPLETED = RequestStatus.COMPLETED


def _expired(ticket: Ticket, loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``ticket``'s deadline has passed (then it is expired now)."""
    if loop.time() < ticket.deadline:
        return False
    ticket.expire()
    return True


def _discard(value: Any) -> None:
    """Close a hook's coroutine that will never run (no 'never awaited' warning)."""
    close = getattr(value, "close", None)
    if close is not None:
        close()


def fail(ticket: Ticket, stage: str, error: BaseException) -> None:
    """Fail ``ticket`` with ``error`` and count it."""
    if ticket.finish(_FAILED, error=error):
        metrics.ERRORS.labels(stage, type(error).__name__).inc()


def _push_inference(queue: PriorityQueue[Ticket], ticket: Ticket) -> bool:
    """Queue ``ticket`` for inference; ``False`` if it must wait for room.

    At capacity a higher-priority ticket displaces the newest ticket of the lowest level
    present, which fails as ``Overloaded`` (counted as shed).
    """
    try:
        displaced = queue.push_nowait(ticket.priority, ticket)
    except QueueFull:
        return False
    if displaced is not None:
        victim = displaced[1]
        metrics.SHED.labels("inference").inc()
        fail(
            victim,
            "inference",
            Overloaded(
                f"request {victim.request_id} was displaced by higher-priority work",
                stage="inference",
            ),
        )
    return True


class Stage:
    """A stage whose work is a hook: ``work(ticket)`` returns a value or an awaitable of one,
    ``store(ticket, value)`` keeps it, then the ticket moves on (``outbox`` is a ``Channel``,
    the inference ``PriorityQueue``, or ``None`` for the last stage)."""

    def __init__(
        self,
        name: str,
        inbox: Channel[Ticket],
        outbox: Channel[Ticket] | PriorityQueue[Ticket] | None,
        work: Callable[[Ticket], Any],
        store: Callable[[Ticket, Any], None],
        concurrency: int,
    ) -> None:
        self.name = name
        self.inbox = inbox
        self.outbox = outbox
        self.work = work
        self.store = store
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._duration = metrics.STAGE_DURATION.labels(name)

    async def forward(self, ticket: Ticket) -> None:
        """Hand ``ticket`` to the next stage, waiting for room when it is full."""
        outbox = self.outbox
        if isinstance(outbox, Channel):
            if len(outbox.items) < outbox.maxsize:
                outbox.put_nowait(ticket)
            else:
                await outbox.put(ticket)
        elif outbox is not None and not _push_inference(outbox, ticket):
            await outbox.put(ticket.priority, ticket)

    async def run(self) -> None:
        inbox, work, store = self.inbox, self.work, self.store
        items = inbox.items
        duration = self._duration
        clock = time.perf_counter
        forward, outbox = self.forward, self.outbox
        channel = outbox if isinstance(outbox, Channel) else None
        try:
            while True:
                if not items:
                    await inbox.wait()
                ticket = inbox.get_nowait()
                if ticket._done:
                    continue
                start = clock()
                try:
                    value = work(ticket)
                    if type(value) is not str and inspect.isawaitable(value):
                        await self._slots.acquire()
                        if ticket._done:  # finished while we waited for a slot
                            self._slots.release()
                            _discard(value)
                            continue
                        task = asyncio.create_task(self._finish_async(ticket, value, start))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                        ticket._task = task  # a timeout or cancel of the ticket ends the hook
                        continue
                    store(ticket, value)
                except Exception as exc:
                    self._hook_failed(ticket, exc)
                    continue
                duration.observe(clock() - start)
                if channel is not None and len(channel.items) < channel.maxsize:
                    channel.put_nowait(ticket)
                elif outbox is not None:
                    await forward(ticket)
        finally:
            await cancel_all(self._tasks)

    async def _finish_async(self, ticket: Ticket, value: Awaitable[Any], start: float) -> None:
        try:
            try:
                self.store(ticket, await value)
            except Exception as exc:
                self._hook_failed(ticket, exc)
                return
            finally:
                self._slots.release()
                ticket.release_task()
            self._duration.observe(time.perf_counter() - start)
            if not ticket._done:
                await self.forward(ticket)
        except asyncio.CancelledError:
            if not ticket._done:
                raise  # the pipeline is stopping; it fails the ticket

    def _hook_failed(self, ticket: Ticket, exc: Exception) -> None:
        logger.warning("%s hook failed for request %s: %r", self.name, ticket.request_id, exc)
        error = StageError(self.name, repr(exc))
        error.__cause__ = exc
        fail(ticket, self.name, error)


class InferenceStage:
    """Takes tickets in priority order and runs up to ``max_concurrency`` worker calls at
    once, each in a task of its own so that ``Ticket.cancel()`` and deadlines reach it.

    A ticket whose tokens someone iterates is produced with ``worker.stream()`` (tokens
    reach it live); others with ``worker.infer()``, which HTTP workers answer without
    streaming overhead. Both give the same tokens.
    """

    name = "inference"

    def __init__(
        self,
        inbox: PriorityQueue[Ticket],
        outbox: Channel[Ticket],
        worker: ModelWorker,
        max_concurrency: int,
        *,
        dedup: Deduplicator | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.inbox = inbox
        self.outbox = outbox
        self.worker = worker
        self.worker_name = worker_name(worker)
        self.max_concurrency = max_concurrency
        self.dedup = dedup
        self.retry = retry
        self.breaker = breaker
        self._guarded = dedup is not None or retry is not None or breaker is not None
        self.active = 0
        self._slot_free: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._duration = metrics.STAGE_DURATION.labels("inference")
        self._latency = metrics.WORKER_LATENCY.labels(self.worker_name)
        self._tokens = metrics.WORKER_TOKENS.labels(self.worker_name, "chunks")

    async def run(self) -> None:
        inbox = self.inbox
        loop = asyncio.get_running_loop()
        limit = self.max_concurrency
        try:
            while True:
                if self.active >= limit:
                    self._slot_free = loop.create_future()
                    await self._slot_free
                    continue
                entry = inbox.pop_nowait()
                if entry is None:
                    entry = await inbox.get()
                ticket = entry[1]
                if ticket._done:
                    continue
                self.active += 1
                task = spawn(loop, self._serve(ticket))
                if not task.done():
                    self._tasks.add(task)
        finally:
            await cancel_all(self._tasks)

    async def _serve(self, ticket: Ticket) -> None:
        """Run ``ticket``'s worker call, then keep taking queued tickets (highest priority
        first) until the queue is empty: under load a slot never waits for a loop turn,
        and no task is created per request."""
        me = asyncio.current_task()
        assert me is not None
        pop = self.inbox.pop_nowait
        try:
            while True:
                await self._call(ticket, me)
                while (entry := pop()) is not None and entry[1]._done:
                    pass
                if entry is None:
                    return
                ticket = entry[1]
        finally:
            self._tasks.discard(me)
            self.active -= 1
            waiter = self._slot_free
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def _call(self, ticket: Ticket, me: asyncio.Task[None]) -> None:
        # Checked here, as the call starts, not only by the deadline timer: a slot serves
        # queued tickets back to back, with no loop turn in which the timer could run.
        if _expired(ticket, me.get_loop()):
            return
        start = time.perf_counter()
        ticket._task = me  # from here, cancelling the ticket cancels this call
        ticket.set_processing()
        try:
            if self._guarded:
                await self._produce_guarded(ticket)
            elif ticket._watched:
                await self._stream(ticket)
            else:
                ticket.push_tokens(await self.worker.infer(ticket.prompt))
        except asyncio.CancelledError:
            ticket.release_task()
            if not ticket._done:
                raise  # the pipeline is stopping; it fails the ticket
            me.uncancel()  # the cancellation was this ticket's alone: serve the next one
            return
        except Exception as exc:
            ticket.release_task()
            fail(ticket, "inference", self._as_inference_error(exc))
            return
        ticket.release_task()
        elapsed = time.perf_counter() - start
        self._latency.observe(elapsed)
        self._duration.observe(elapsed)
        self._tokens.inc(ticket.token_count)
        if ticket._done:
            return
        outbox = self.outbox
        if len(outbox.items) < outbox.maxsize:
            outbox.put_nowait(ticket)
        else:
            await outbox.put(ticket)

    async def _stream(self, ticket: Ticket) -> None:
        stream = self.worker.stream(ticket.prompt)
        push = ticket.push_token
        try:
            async for token in stream:
                push(token)
        finally:
            await _aclose(stream)

    # -- with policies: dedup (outermost), retry, circuit breaker (per attempt) -----------

    async def _produce_guarded(self, ticket: Ticket) -> None:
        prompt, dedup = ticket.prompt, self.dedup
        if not ticket._watched:
            call = functools.partial(self._infer_guarded, prompt)
            tokens = await (dedup.run(prompt, call) if dedup is not None else call())
            ticket.push_tokens(list(tokens))  # a copy: a shared result is shared
            return
        factory = functools.partial(self._stream_guarded, prompt)
        stream = dedup.stream(prompt, factory) if dedup is not None else factory()
        async with contextlib.aclosing(stream):
            async for token in stream:
                ticket.push_token(token)

    async def _infer_guarded(self, prompt: str) -> list[str]:
        attempt = functools.partial(self.worker.infer, prompt)
        breaker = self.breaker
        if breaker is not None:
            attempt = functools.partial(breaker.call, attempt)
        if self.retry is not None:
            return await self.retry.call(attempt, worker=self.worker_name)
        return await attempt()

    async def _stream_guarded(self, prompt: str) -> AsyncGenerator[str, None]:
        """The worker's stream as one breaker call; retried only until its first token
        (after that, tokens have reached callers and a retry would repeat them)."""
        breaker = self.breaker
        opened: tuple[AsyncIterator[str], str | None, int | None]
        if self.retry is not None:
            opened = await self.retry.call(
                functools.partial(self._open_stream, prompt), worker=self.worker_name
            )
        else:
            opened = await self._open_stream(prompt)
        stream, first, token = opened
        try:
            if first is not None:
                yield first
                async for item in stream:
                    yield item
        except BaseException as exc:
            if breaker is not None:
                breaker.record_failure(exc, token)
            raise
        finally:
            await _aclose(stream)
        if breaker is not None:
            breaker.record_success(token)

    async def _open_stream(self, prompt: str) -> tuple[AsyncIterator[str], str | None, int | None]:
        breaker = self.breaker
        token = breaker.before_call() if breaker is not None else None
        stream = self.worker.stream(prompt)
        try:
            first: str | None = await anext(stream)
        except StopAsyncIteration:
            first = None
        except BaseException as exc:
            if breaker is not None:
                breaker.record_failure(exc, token)
            await _aclose(stream)
            raise
        return stream, first, token

    def _as_inference_error(self, exc: Exception) -> InferenceError:
        if isinstance(exc, InferenceError):
            return exc
        error = InferenceError(
            f"{self.worker_name} worker failed: {exc!r}", worker=self.worker_name
        )
        error.__cause__ = exc
        return error


def post_work(processors: tuple[Callable[..., Any], ...]) -> Callable[[Ticket], Any]:
    """Post: join the tokens and run the processors in order (async ones awaited)."""

    def work(ticket: Ticket) -> Any:
        text = "".join(ticket._tokens)
        for i, processor in enumerate(processors):
            result = processor(ticket.request, text)
            if type(result) is not str and inspect.isawaitable(result):
                return _post_rest(processors[i + 1 :], ticket, result)
            text = result
        return text

    return work


async def _post_rest(
    processors: tuple[Callable[..., Any], ...], ticket: Ticket, pending: Awaitable[str]
) -> str:
    text = await pending
    for processor in processors:
        result = processor(ticket.request, text)
        text = await result if inspect.isawaitable(result) else result
    return text


def store_str(attribute: str, hook: str) -> Callable[[Ticket, Any], None]:
    """A ``store`` keeping a hook's text in ``ticket.<attribute>``; anything else than a
    ``str`` is the hook's bug (``TypeError``, so the request fails with ``StageError``)."""

    def store(ticket: Ticket, value: Any) -> None:
        if type(value) is not str:
            raise TypeError(f"the {hook} returned {type(value).__name__}, expected str")
        setattr(ticket, attribute, value)

    return store


def stream_work(
    sinks: tuple[Callable[[PostOutput], Any], ...],
    cache: CacheLayer | None = None,
    cache_ttl: float | None = None,
) -> Callable[[Ticket], Any]:
    """Stream: call each sink with the output, store it in the cache when the request
    missed it, then (``store_completed``) complete the ticket: once a request completed,
    the same request finds its answer in the cache."""

    def work(ticket: Ticket) -> Any:
        pending: Awaitable[Any] | None = None
        if sinks:
            output = PostOutput(ticket.request, ticket.output)
            for i, sink in enumerate(sinks):
                result = sink(output)
                if inspect.isawaitable(result):
                    pending = _sinks_rest(sinks[i + 1 :], output, result)
                    break
        key = ticket.cache_key
        if cache is not None and key is not None:
            if pending is None and cache.set_nowait(key, ticket.output, cache_ttl):
                return ""
            return _then_store(pending, cache, key, ticket.output, cache_ttl)
        return "" if pending is None else pending

    return work


async def _sinks_rest(
    sinks: tuple[Callable[[PostOutput], Any], ...], output: PostOutput, pending: Awaitable[Any]
) -> str:
    await pending
    for sink in sinks:
        result = sink(output)
        if inspect.isawaitable(result):
            await result
    return ""


async def _then_store(
    pending: Awaitable[Any] | None, cache: CacheLayer, key: str, text: str, ttl: float | None
) -> str:
    if pending is not None:
        await pending
    await cache.set(key, text, ttl)  # an outage degrades to a skipped store, never an error
    return ""


def store_completed(ticket: Ticket, _value: Any) -> None:
    """Complete the ticket with the Post stage's output."""
    ticket.finish(_COMPLETED, result=ticket.output)


async def _aclose(stream: AsyncIterator[str]) -> None:
    """Close a worker's stream (an HTTP worker closes its response)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for them to end (shielded from our own cancellation)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))
