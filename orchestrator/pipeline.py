"""``spawn_pipeline`` and ``PipelineHandles``: the five stages, admission, tickets, shutdown."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import weakref
from typing import TYPE_CHECKING, final

from orchestrator import metrics
from orchestrator._channel import Channel
from orchestrator._deadlines import Deadlines
from orchestrator._stages import (
    InferenceStage,
    Stage,
    fail,
    post_work,
    store_completed,
    store_str,
    stream_work,
)
from orchestrator.config import PipelineConfig
from orchestrator.enhanced.cache import cache_key
from orchestrator.enhanced.dedup import Deduplicator
from orchestrator.enhanced.priority import Priority, PriorityQueue
from orchestrator.errors import InvalidRequest, Overloaded, PipelineClosed, RateLimited
from orchestrator.ticket import Ticket
from orchestrator.types import PromptRequest, RequestStatus, SessionId
from orchestrator.workers.base import ModelWorker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from types import TracebackType
    from typing import Any, Self

    from orchestrator.hooks import Retriever, Template

__all__ = ["InputSender", "PipelineHandles", "spawn_pipeline"]

logger = logging.getLogger("orchestrator.pipeline")

_LIVE: weakref.WeakSet[PipelineHandles] = weakref.WeakSet()


def _queue_depths() -> Iterator[tuple[tuple[str, ...], float]]:
    for handles in list(_LIVE):
        yield from handles._queue_depths()


metrics.QUEUE_DEPTH.add_source(_queue_depths)


def _cache_scope(worker: ModelWorker, config: PipelineConfig) -> str:
    """What besides the input changes answers: the worker's identity and the template."""
    identity = getattr(worker, "cache_identity", None)
    if not isinstance(identity, str):
        identity = f"{type(worker).__module__}.{type(worker).__qualname__}"
    template = config.template
    shape = template if isinstance(template, str) else getattr(template, "__qualname__", "")
    return f"{identity}|{shape}"


def _retriever_work(retriever: Retriever | None) -> Callable[[Ticket], Any]:
    if retriever is None:
        return lambda t: ""
    return lambda t: retriever(t.request)


def _template_work(template: Template) -> Callable[[Ticket], Any]:
    if isinstance(template, str):
        fmt = template.format
        return lambda t: fmt(context=t.context, input=t.request.input)
    return lambda t: template(t.request, t.context)


@final
class InputSender:
    """The seed's fire-and-forget entrance: ``await handles.input_tx.send(request)``.

    Unlike ``submit``, ``send`` waits for room when the pipeline is full instead of raising
    ``Overloaded``, like a bounded channel's sender.
    """

    __slots__ = ("_handles",)

    def __init__(self, handles: PipelineHandles) -> None:
        self._handles = handles

    async def send(self, request: PromptRequest) -> Ticket:
        """Submit ``request``, waiting for room; returns its ticket (ignore it if you like).

        Raises:
            The errors of ``PipelineHandles.submit``, except ``Overloaded``.
        """
        return await self._handles._admit(request, wait=True)


@final
class PipelineHandles:
    """A running pipeline: submit requests, find tickets, shut down.

    Made by ``spawn_pipeline``; use it as ``async with spawn_pipeline(worker) as handles:``
    or call ``await handles.shutdown()`` when done.
    """

    def __init__(self, worker: ModelWorker, config: PipelineConfig) -> None:
        if not isinstance(worker, ModelWorker):
            raise TypeError(
                f"worker must implement ModelWorker (infer and stream), got {type(worker).__name__}"
            )
        self.worker = worker
        self.config = config
        self.input_tx = InputSender(self)
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._crash: BaseException | None = None
        self._in_flight = 0
        self._drained: asyncio.Future[None] | None = None
        self._records: dict[str, Ticket] = {}
        self._finished: collections.deque[tuple[float, str, int]] = collections.deque()
        self._retained_bytes = 0

        c = config
        self._rag_q: Channel[Ticket] = Channel(c.rag_capacity)
        self._assemble_q: Channel[Ticket] = Channel(c.assemble_capacity)
        self._inference_q: PriorityQueue[Ticket] = PriorityQueue(
            c.inference_capacity, aging=c.priority_aging
        )
        self._post_q: Channel[Ticket] = Channel(c.post_capacity)
        self._stream_q: Channel[Ticket] = Channel(c.stream_capacity)
        self._deadlines = Deadlines(self._loop)
        n = c.stage_concurrency
        self._own_dedup: Deduplicator | None = Deduplicator() if c.dedup is True else None
        dedup = self._own_dedup if c.dedup is True else c.dedup
        self._inference = InferenceStage(
            self._inference_q,
            self._post_q,
            worker,
            c.max_concurrency,
            dedup=dedup or None,
            retry=c.retry,
            breaker=c.circuit_breaker,
        )
        self._cache = c.cache
        self._limiter = c.rate_limiter
        self._policies = c.cache is not None or c.rate_limiter is not None
        self._cache_scope = _cache_scope(worker, c)

        self._stages = (
            Stage(
                "rag",
                self._rag_q,
                self._assemble_q,
                _retriever_work(c.retriever),
                store_str("context", "retriever"),
                n,
            ),
            Stage(
                "assemble",
                self._assemble_q,
                self._inference_q,
                _template_work(c.template),
                store_str("prompt", "template"),
                n,
            ),
            self._inference,
            Stage(
                "post",
                self._post_q,
                self._stream_q,
                post_work(c.post_processors),
                store_str("output", "post processor"),
                n,
            ),
            Stage(
                "stream",
                self._stream_q,
                None,
                stream_work(c.sinks, c.cache, c.cache_ttl),
                store_completed,
                n,
            ),
        )
        self._shed = metrics.SHED.labels("rag")
        self._finished_callback = self._on_done  # one bound method, not one per ticket
        self._stop = asyncio.Event()
        self._supervisor = self._loop.create_task(self._supervise(), name="orchestrator-pipeline")
        self._shutdown_task: asyncio.Task[None] | None = None
        _LIVE.add(self)

    # -- submitting ------------------------------------------------------------------------

    async def submit(self, request: PromptRequest, *, stream: bool = False) -> Ticket:
        """Admit ``request`` and return its ticket at once.

        Args:
            request: The request.
            stream: Produce it with ``worker.stream()`` so tokens reach ``Ticket.tokens()``
                as the model emits them (also the case when ``tokens()`` is being iterated
                by the time its worker call starts); otherwise ``worker.infer()`` is used.

        Raises:
            Overloaded: The RAG channel is full (counted in
                ``orchestrator_requests_shed_total{stage="rag"}``).
            PipelineClosed: Shutdown has begun.
            ValueError: ``meta["priority"]`` is not a known level, or the request id is
                already in use.
        """
        if self._policies:
            ticket = await self._admit(request, wait=False)
        else:
            ticket = self._admit_nowait(request)  # the fast path: nothing to await
        if stream:
            ticket._watched = True
        return ticket

    async def _admit(self, request: PromptRequest, *, wait: bool) -> Ticket:
        """Admission with the policies (rate limit, then cache), shedding when full or,
        with ``wait``, waiting for room."""
        ticket = self._new_ticket(request)
        if not wait:
            self._check_room()  # refuse before spending the session's budget
        limiter = self._limiter
        if limiter is not None:
            decision = await limiter.decide(request.session)
            if not decision.allowed:
                raise RateLimited(
                    str(request.session),
                    limit=decision.limit,
                    remaining=decision.remaining,
                    retry_after=decision.retry_after,
                    reset_in=decision.reset_in,
                )
        cache = self._cache
        if cache is not None:
            key = self._cache_key(request)
            cached = await cache.get(key)
            if cached is not None:
                return self._complete_from_cache(ticket, cached)
            ticket.cache_key = key
        if self._closed or request.request_id in self._records:  # changed while we awaited
            self._new_ticket(request)  # raises the error that now applies
        if wait:
            await self._rag_q.put(ticket)  # nothing runs between put and accept
        else:
            self._check_room()
            self._rag_q.put_nowait(ticket)
        self._accept(ticket)
        return ticket

    def _cache_key(self, request: PromptRequest) -> str:
        ignored = self.config.cache_ignore_meta
        meta = sorted((k, v) for k, v in request.meta.items() if k not in ignored)
        return cache_key(request.input, self._cache_scope, *(f"{k}={v}" for k, v in meta))

    def _complete_from_cache(self, ticket: Ticket, text: str) -> Ticket:
        self._in_flight += 1
        self._records[ticket.request_id] = ticket
        ticket.output = text
        ticket.push_tokens([text])
        ticket.finish(RequestStatus.COMPLETED, result=text)
        return ticket

    async def infer(
        self,
        prompt: str,
        session_id: SessionId | str = "anonymous",
        *,
        meta: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the request's deadline, not a wait
    ) -> str:
        """Submit one prompt and wait for its text: ``await handles.infer("Hi", session_id="u1")``.

        Raises:
            The errors of ``submit`` and ``Ticket.result``.
        """
        request = PromptRequest(session=session_id, input=prompt, meta=meta, timeout=timeout)
        ticket = await self.submit(request)
        return await ticket.result()

    def get(self, request_id: str) -> Ticket | None:
        """The ticket of a request in flight or finished within the retention, else ``None``."""
        ticket = self._records.get(request_id)
        finished = ticket.finished_at if ticket is not None else None
        if finished is not None and finished < time.time() - self.config.retention_seconds:
            return None  # expired while no other request finished to sweep it out
        return ticket

    def _new_ticket(self, request: PromptRequest) -> Ticket:
        if self._closed:
            raise PipelineClosed("the pipeline is shutting down and admits no new requests")
        try:
            priority = Priority.parse(request.meta.get("priority"))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        if request.request_id in self._records:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use")
        return Ticket(request, priority, self._finished_callback)

    def _accept(self, ticket: Ticket) -> None:
        request = ticket.request
        timeout = request.timeout or self.config.request_timeout
        self._in_flight += 1
        self._deadlines.add(ticket, timeout, self._in_flight)
        self._records[request.request_id] = ticket

    def _check_room(self) -> None:
        queue = self._rag_q
        if queue.full():
            self._shed.inc()
            raise Overloaded(
                f"pipeline is at capacity ({queue.maxsize} requests waiting for RAG)",
                stage="rag",
            )

    def _admit_nowait(self, request: PromptRequest) -> Ticket:
        ticket = self._new_ticket(request)
        self._check_room()
        self._accept(ticket)
        self._rag_q.put_nowait(ticket)
        return ticket

    # -- bookkeeping -----------------------------------------------------------------------

    def _on_done(self, ticket: Ticket) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        finished = self._finished
        size = ticket.retained_bytes
        finished.append((ticket.finished_at, ticket.request_id, size))  # type: ignore[arg-type]
        self._retained_bytes += size
        config = self.config
        max_count, max_bytes = config.retention_max, config.retention_bytes
        horizon = finished[-1][0] - config.retention_seconds
        records = self._records
        while finished and (
            len(finished) > max_count
            or finished[0][0] < horizon
            or self._retained_bytes > max_bytes
        ):
            _, request_id, size = finished.popleft()
            self._retained_bytes -= size
            records.pop(request_id, None)

    def _queue_depths(self) -> Iterator[tuple[tuple[str, ...], float]]:
        yield ("rag",), float(self._rag_q.qsize())
        yield ("assemble",), float(self._assemble_q.qsize())
        yield ("inference",), float(self._inference_q.qsize())
        yield ("post",), float(self._post_q.qsize())
        yield ("stream",), float(self._stream_q.qsize())

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet finished."""
        return self._in_flight

    @property
    def closed(self) -> bool:
        """Whether admission has stopped (shutdown began, or a stage crashed)."""
        return self._closed

    # -- lifetime --------------------------------------------------------------------------

    async def _supervise(self) -> None:
        tasks = [
            self._loop.create_task(stage.run(), name=f"orchestrator-{stage.name}")
            for stage in self._stages
        ]
        stop = self._loop.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            if stop not in done:  # a stage ended on its own: a bug; fail loudly, lose nothing
                crashed = next(t for t in tasks if t.done())
                self._crash = crashed.exception() or RuntimeError(
                    f"stage task {crashed.get_name()} exited"
                )
                logger.error("pipeline stage crashed", exc_info=self._crash)
                self._closed = True
        finally:
            stop.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, stop, return_exceptions=True)
            self._fail_leftovers()
            self._deadlines.close()
            _LIVE.discard(self)

    def _fail_leftovers(self) -> None:
        for ticket in list(self._records.values()):
            if not ticket._done:
                error = PipelineClosed("the pipeline stopped before the request finished")
                error.__cause__ = self._crash
                fail(ticket, "pipeline", error)

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop admission, let requests in flight finish, then stop the stages.

        Requests still unfinished after ``drain_timeout`` seconds (default
        ``config.drain_timeout``) fail with ``PipelineClosed``. Safe to call twice.

        Raises:
            Exception: What crashed a stage, if one did.
        """
        if self._shutdown_task is None:
            self._shutdown_task = self._loop.create_task(self._shutdown(drain_timeout))
        await asyncio.shield(self._shutdown_task)
        if self._crash is not None:
            raise self._crash

    async def _shutdown(self, drain_timeout: float | None) -> None:
        self._closed = True
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        if self._in_flight and not self._supervisor.done():
            self._drained = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.wait(
                        [self._drained, self._supervisor], return_when=asyncio.FIRST_COMPLETED
                    )
            except TimeoutError:
                logger.warning(
                    "shutdown: %d requests unfinished after %.1fs", self._in_flight, timeout
                )
        self._stop.set()
        await self._supervisor
        if self._own_dedup is not None:
            await self._own_dedup.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


def spawn_pipeline(worker: ModelWorker, config: PipelineConfig | None = None) -> PipelineHandles:
    """Start the five stages for ``worker`` on the running event loop.

    Example:
        >>> async def main() -> None:  # doctest: +SKIP
        ...     async with spawn_pipeline(EchoWorker()) as handles:
        ...         print(await handles.infer("Hello", session_id="u1"))

    Raises:
        RuntimeError: No event loop is running.
        TypeError: ``worker`` is not a ``ModelWorker``.
    """
    return PipelineHandles(worker, config or PipelineConfig())
