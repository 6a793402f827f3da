"""``spawn_pipeline`` and ``PipelineHandles``: admission, tickets, shutdown.

The stages, the seams and the tasks live in the runtime (``_runtime.py``); this module
admits requests into it (policies first: rate limit, then cache), hands out tickets, and
owns the runtime's one supervisor task.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
import weakref
from typing import TYPE_CHECKING, Literal, final

from orchestrator import metrics
from orchestrator._job import Job
from orchestrator._priority import Priority
from orchestrator._runtime import Runtime
from orchestrator._store import MemoryStore
from orchestrator.config import PipelineConfig
from orchestrator.enhanced.dedup import Deduplicator
from orchestrator.errors import (
    InvalidRequest,
    Overloaded,
    PipelineClosed,
    RateLimited,
    RequestCancelled,
)
from orchestrator.ticket import Ticket
from orchestrator.types import PromptRequest, RequestStatus, SessionId
from orchestrator.workers.base import ModelWorker

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from types import TracebackType
    from typing import Self

    from orchestrator._runtime import Shared
    from orchestrator._seams import RequestRecord
    from orchestrator.distributed._cluster import ClusterConfig
    from orchestrator.enhanced.rate_limit import RateDecision

__all__ = ["InputSender", "PipelineHandles", "spawn_pipeline"]

logger = logging.getLogger("orchestrator.pipeline")

_LIVE: weakref.WeakSet[PipelineHandles] = weakref.WeakSet()
_COMPLETED = RequestStatus.COMPLETED


def _queue_depths() -> Iterator[tuple[tuple[str, ...], float]]:
    for handles in list(_LIVE):
        yield from handles.queue_depths()


metrics.QUEUE_DEPTH.add_source(_queue_depths)


@final
class InputSender:
    """The seed's fire-and-forget entrance: ``await handles.input_tx.send(request)``.

    Unlike ``submit``, ``send`` waits for room when the pipeline is full instead of raising
    ``Overloaded``, like a bounded channel's sender; once shutdown begins it raises
    ``PipelineClosed``, a send already waiting for room included.
    """

    __slots__ = ("_handles",)

    def __init__(self, handles: PipelineHandles) -> None:
        self._handles = handles

    async def send(self, request: PromptRequest, *, stream: bool = False) -> Ticket:
        """Submit ``request``, waiting for room; returns its ticket (ignore it if you like).

        Raises:
            The errors of ``PipelineHandles.submit``, except ``Overloaded``.
        """
        return await self._handles.admit(request, stream=stream, wait=True)


@final
class PipelineHandles:
    """A running pipeline: submit requests, find tickets, shut down.

    Made by ``spawn_pipeline``; use it as ``async with spawn_pipeline(worker) as handles:``
    or call ``await handles.shutdown()`` when done. A pipeline dropped without either warns
    ``ResourceWarning`` when its event loop closes, as an unclosed file does.
    """

    def __init__(
        self, worker: ModelWorker | None, config: PipelineConfig, shared: Shared | None = None
    ) -> None:
        if worker is None and (shared is None or shared.runs_work):
            raise TypeError("a pipeline that runs requests needs a worker")
        if worker is not None and not isinstance(worker, ModelWorker):
            raise TypeError(
                f"worker must implement ModelWorker (infer and stream), got {type(worker).__name__}"
            )
        self.worker = worker
        self.config = config
        self.input_tx = InputSender(self)
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._crash: BaseException | None = None
        self._own_dedup = Deduplicator() if config.dedup is True else None
        dedup = self._own_dedup if config.dedup is True else (config.dedup or None)
        self._runtime = runtime = Runtime(worker, config, self._loop, dedup, shared)
        self._shared = shared
        self._store = runtime.store
        # The in-process store, whose sync admission is the fast path (None when shared).
        self._memory = runtime.store if isinstance(runtime.store, MemoryStore) else None
        self._rag = runtime.rag
        self._limiter = config.rate_limiter
        self._cache = runtime.cache
        self._policies = config.cache is not None or config.rate_limiter is not None
        self._shed = metrics.SHED.labels("rag")
        self._deadlines = runtime.deadlines
        self._request_timeout = config.request_timeout
        self._stop = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        # Our one task: the supervisor that owns the runtime (and through it every task).
        self._supervisor = self._loop.create_task(self._supervise(), name="orchestrator-pipeline")
        _LIVE.add(self)

    # -- submitting ------------------------------------------------------------------------

    async def submit(
        self, request: PromptRequest, *, stream: bool = False, wait: bool = False
    ) -> Ticket:
        """Admit ``request`` and return its ticket at once.

        Args:
            request: The request.
            stream: Produce it with ``worker.stream()``, so tokens reach
                ``Ticket.tokens()`` as the model emits them; otherwise ``worker.infer()``
                is called (the cheaper path for HTTP workers) and ``tokens()`` yields them
                all when the answer arrives.
            wait: When the pipeline is full, wait for room (as ``input_tx.send`` does)
                instead of raising ``Overloaded``: for a program that would rather be
                slowed down than refused, e.g. ``asyncio.gather`` over a burst larger than
                the RAG channel.

        Raises:
            Overloaded: The RAG channel is full (counted in
                ``orchestrator_requests_shed_total{stage="rag"}``), without ``wait``.
            RateLimited: The session is over its budget (with a rate limiter).
            PipelineClosed: Shutdown has begun.
            InvalidRequest: ``meta["priority"]`` is not a known level, or the request id
                is already in use (also a ``ValueError``).
        """
        if not (self._policies or wait) and self._shared is None:  # nothing to await
            return self._enter(request, self._check(request), stream, None)
        return await self.admit(request, stream=stream, wait=wait)

    async def admit(self, request: PromptRequest, *, stream: bool, wait: bool) -> Ticket:
        """Admission: refuse what cannot be taken, apply the policies (rate limit, then
        cache), then queue the request for RAG, shedding when full or, with ``wait``,
        waiting for room."""
        priority = self._check(request)
        shared = self._shared
        if not wait and shared is None:
            self._check_room()  # refuse before spending the session's budget
        key: str | None = None
        decision: RateDecision | None = None
        if self._policies:
            limiter, cache = self._limiter, self._cache
            pending = None
            if limiter is not None:
                if cache is not None:  # on Redis its GET rides the limiter's round trip
                    key, pending = cache.lookup_soon(request)
                try:
                    decision = await limiter.decide(request.session)
                    if not decision.allowed:
                        raise _rate_limited(request, decision)
                except BaseException:
                    if pending is not None:
                        pending.discard()  # refused: the lookup is not sent
                    raise
            if cache is not None:
                if pending is None:
                    key, cached = await cache.lookup(request)
                else:
                    cached = await pending.answer()
                if cached is not None:
                    if shared is not None:
                        record = await shared.completed(request, cached)
                        return Ticket(record, self._store, self, decision)
                    return self._completed_from_cache(request, cached, decision)
            self._check(request)  # shutdown may have begun, or the id been taken, meanwhile
        if shared is not None:
            return await self._enter_shared(shared, request, priority, stream, key, decision, wait)
        if wait and self._rag.full():
            await self._rag.wait_for_room()
            self._check(request)
        return self._enter(request, priority, stream, key, decision)

    def _enter(
        self,
        request: PromptRequest,
        priority: Priority,
        stream: bool,
        key: str | None,
        decision: RateDecision | None = None,
    ) -> Ticket:
        """Queue the request for RAG and record it: nothing runs between the two."""
        rag = self._rag
        if len(rag.items) >= rag.maxsize:
            self._shed.inc()
            raise Overloaded(
                f"pipeline is at capacity ({rag.maxsize} requests waiting for RAG)", stage="rag"
            )
        timeout = request.timeout or self._request_timeout
        store = self._memory
        assert store is not None  # the path of a pipeline in one process
        record = store.create_nowait(request)
        job = Job(record, request, priority, self._loop.time() + timeout, stream, key)
        rag.put_nowait(job)  # cannot fail: the channel has room and is open (checked)
        self._deadlines.add(record, job.deadline, timeout, store.in_flight)
        return Ticket(record, store, self, decision)

    async def _enter_shared(
        self,
        shared: Shared,
        request: PromptRequest,
        priority: Priority,
        stream: bool,
        key: str | None,
        decision: RateDecision | None,
        wait: bool,
    ) -> Ticket:
        """Record the request and queue it for every worker, in one step on the shared
        store; with ``wait``, wait while the shared queue is full."""
        timeout = request.timeout or self._request_timeout
        record = shared.new_record(request, stream=stream)
        job = Job(record, request, priority, self._loop.time() + timeout, stream, key)
        pause = 0.01
        while True:
            try:
                record = await shared.admit(job)
                break
            except Overloaded:
                if not wait:
                    self._shed.inc()
                    raise
            await asyncio.sleep(pause)  # the queue is shared: no one here to wake us
            pause = min(pause * 2, 0.5)
            self._check(request)
        # This process ends it at its deadline if no worker has by then (queued too long).
        self._deadlines.add(record, job.deadline, timeout, self._store.in_flight)
        return Ticket(record, self._store, self, decision)

    def _check(self, request: PromptRequest) -> Priority:
        if self._closed or self._rag.closed:
            raise PipelineClosed("the pipeline is shutting down and admits no new requests")
        if self._shared is not None and not self._shared.admits:
            raise RuntimeError(
                "a pipeline in the worker role admits no requests: submit to a frontend"
            )
        try:
            priority = Priority.parse(request.meta.get("priority"))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        store = self._store
        if isinstance(store, MemoryStore) and store.in_use(request.request_id):
            raise InvalidRequest(f"request id {request.request_id!r} is already in use")
        return priority

    def _check_room(self) -> None:
        rag = self._rag
        if rag.full():
            self._shed.inc()
            raise Overloaded(
                f"pipeline is at capacity ({rag.maxsize} requests waiting for RAG)", stage="rag"
            )

    def _completed_from_cache(
        self, request: PromptRequest, text: str, decision: RateDecision | None
    ) -> Ticket:
        store = self._memory
        assert store is not None  # the path of a pipeline in one process
        record = store.create_nowait(request)
        record.tokens.append(text)  # type: ignore[union-attr]  # a new record's list
        store.finish_nowait(request.request_id, _COMPLETED, result=text)
        return Ticket(record, store, self, decision)

    async def infer(
        self,
        prompt: str,
        session_id: SessionId | str = "anonymous",
        *,
        meta: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the request's deadline, not a wait
        wait: bool = False,
    ) -> str:
        """Submit one prompt and wait for its text: ``await handles.infer("Hi", session_id="u1")``.

        ``wait=True`` waits for room in a full pipeline instead of raising ``Overloaded``
        (see ``submit``).

        Raises:
            The errors of ``submit`` and ``Ticket.result``.
        """
        request = PromptRequest(session=session_id, input=prompt, meta=meta, timeout=timeout)
        ticket = await self.submit(request, wait=wait)
        return await ticket.result()

    # -- finding ---------------------------------------------------------------------------

    def get(self, request_id: str) -> Ticket | None:
        """The ticket of a request in flight or finished within the retention, else ``None``."""
        record = self._store.peek(request_id)
        return None if record is None else self._ticket(record)

    async def find(self, request_id: str) -> Ticket | None:
        """``get``, through the request store: the form that also works when the store is
        shared by other processes."""
        record = await self._store.read(request_id)
        return None if record is None else self._ticket(record)

    def _ticket(self, record: RequestRecord) -> Ticket:
        return Ticket(record, self._store, self)

    # -- cancelling (what a Ticket asks) ---------------------------------------------------

    async def cancel(self, request_id: str) -> bool:
        """End a request as ``cancelled`` and wait for its worker call to unwind; ``False``
        if it had finished already."""
        return await self._runtime.cancel(request_id, _cancelled(request_id))

    def cancel_nowait(self, request_id: str) -> bool:
        """End a request as ``cancelled``; its worker call stops soon after."""
        return self._runtime.cancel_nowait(request_id, _cancelled(request_id))

    # -- state -----------------------------------------------------------------------------

    def queue_depths(self) -> Iterator[tuple[tuple[str, ...], float]]:
        """``(stage,), depth`` of each channel (the queue-depth gauge's source)."""
        return self._runtime.queue_depths()

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet finished."""
        return self._store.in_flight

    @property
    def closed(self) -> bool:
        """Whether admission has stopped (shutdown began, or a stage crashed)."""
        return self._closed

    # -- lifetime --------------------------------------------------------------------------

    async def _supervise(self) -> None:
        runtime = self._runtime
        try:
            async with runtime.serving():
                await self._stop.wait()
        except asyncio.CancelledError:
            if self._shutdown_task is None:  # the loop is closing under a live pipeline
                warnings.warn(
                    "a pipeline was not shut down: use `async with spawn_pipeline(...)` "
                    "or `await handles.shutdown()`",
                    ResourceWarning,
                    stacklevel=1,
                )
            raise
        except BaseException as exc:  # a stage crashed: a bug; fail loudly, lose nothing
            crash = _lone(exc)  # the runtime ended the leftovers, chained to it
            self._crash = crash
            logger.error("pipeline stage crashed", exc_info=crash)
        finally:
            self._closed = True
            _LIVE.discard(self)

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop admission, let requests in flight finish, then stop the stages.

        Requests still unfinished after ``drain_timeout`` seconds (default
        ``config.drain_timeout``) fail with ``PipelineClosed``; an ``input_tx.send``
        waiting for room raises ``PipelineClosed`` at once. Safe to call twice; after it
        returns no task of the pipeline is left.

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
        if drain_timeout is not None:
            self._runtime.drain_timeout = drain_timeout
        self._stop.set()
        await asyncio.wait([self._supervisor])
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


def _cancelled(request_id: str) -> RequestCancelled:
    return RequestCancelled(f"request {request_id} was cancelled")


def _rate_limited(request: PromptRequest, decision: RateDecision) -> RateLimited:
    return RateLimited(
        str(request.session),
        limit=decision.limit,
        remaining=decision.remaining,
        retry_after=decision.retry_after,
        reset_in=decision.reset_in,
    )


def _lone(exc: BaseException) -> BaseException:
    """A lone exception out of (nested) exception groups, as starlette's
    ``collapse_excgroups`` does; a group of several stays a group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def spawn_pipeline(
    worker: ModelWorker | None,
    config: PipelineConfig | None = None,
    *,
    redis_url: str | None = None,
    role: Literal["frontend", "worker", "both"] = "both",
    cluster: ClusterConfig | None = None,
) -> PipelineHandles:
    """Start the five stages for ``worker`` on the running event loop.

    With ``redis_url`` the pipeline is shared with every process on that Redis (see
    docs/scale-out.md): request records, the work queue and the token streams live there,
    so any process answers for any request and a crash loses none. ``role`` is what this
    process does: ``"frontend"`` admits requests and answers for them (no worker:
    pass ``None``), ``"worker"`` runs them, ``"both"`` (what identical replicas run) does
    both. The handles and tickets are the same in every mode.

    Example:
        >>> async def main() -> None:  # doctest: +SKIP
        ...     async with spawn_pipeline(EchoWorker()) as handles:
        ...         print(await handles.infer("Hello", session_id="u1"))

    Raises:
        RuntimeError: No event loop is running.
        TypeError: ``worker`` is not a ``ModelWorker`` (or ``None`` where one is needed).
        ValueError: An unknown ``role``, or a bad ``redis_url``.
        ImportError: ``redis_url`` without redis-py (the ``redis`` extra).
    """
    config = config or PipelineConfig()
    if redis_url is None:
        if role != "both" or cluster is not None:
            raise ValueError("role and cluster need a redis_url")
        return PipelineHandles(worker, config)
    from orchestrator.distributed._cluster import Cluster, ClusterConfig

    shared = Cluster(redis_url, role, cluster or ClusterConfig(), config)
    return PipelineHandles(worker, config, shared)
