"""Request deduplication: identical keys in flight share one call, and optionally its result.

The first caller of a key (the leader) starts the call in a task the ``Deduplicator`` owns;
callers of the same key that arrive while it runs (joiners) wait on that task instead of
starting their own. The work belongs to the deduplicator, not to whoever waits: a cancelled
waiter only stops waiting, and the shared call is cancelled when its last waiter leaves,
because then nobody wants its result.

``run`` shares a call that returns one value; ``stream`` shares one iteration of an async
iterator (an LLM's token stream): late joiners first get every item produced so far, then
the live ones.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Final, TypeVar, cast, final

from orchestrator import metrics
from orchestrator._tasks import spawn
from orchestrator._waiters import Waiters
from orchestrator.errors import PipelineClosed

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable

__all__ = ["Deduplicator"]

T = TypeVar("T")
V = TypeVar("V")

_JOINS: Final = metrics.DEDUP_JOINS.labels()
_MISSING: Final = object()


@final
class _Flight:
    """One shared call (``run``) or iteration (``stream``): its task, waiters and outcome."""

    __slots__ = (
        "abandoned",
        "closed",
        "error",
        "finished",
        "items",
        "key",
        "leader",
        "registry",
        "running",
        "subscribers",
        "task",
        "value",
        "waiters",
        "waiting",
    )

    def __init__(self, key: Hashable, registry: dict[Hashable, _Flight]) -> None:
        self.key = key
        self.registry = registry  # the dict of flights it is listed in while in flight
        self.task: asyncio.Task[None] | None = None
        self.leader: asyncio.Task[object] | None = None  # run: the caller running it inline
        self.waiters = Waiters()  # woken when the call ends (run) or an item comes (stream)
        self.waiting = 0  # run: callers waiting; the last one leaving abandons the call
        self.running = False  # its task started (a task cancelled before it starts never runs)
        self.finished = False
        self.abandoned = False  # the last waiter left and cancelled it
        self.closed = False  # aclose() cancelled it
        self.error: BaseException | None = None
        self.value: object = None  # run: the call's result
        self.items: list[object] = []  # stream: the items so far
        self.subscribers = 0  # stream: iterators not yet finished or closed

    def raise_error(self) -> None:
        error = self.error
        if error is None:
            return
        if self.closed and isinstance(error, asyncio.CancelledError):
            raise PipelineClosed("the deduplicator was closed while the call was in flight")
        raise error


@final
class Deduplicator:
    """Share one call among identical requests in flight, and keep results for a while.

    Every waiter of a key gets the same result, or the same exception object. A waiter that
    is cancelled stops waiting and leaves the others be; when the last one leaves, the
    shared call is cancelled. Successful results (errors never) are kept ``result_ttl``
    seconds after the call ends, so a caller arriving shortly after gets the stored result
    without a call. ``run`` and ``stream`` keep separate keys.

    Args:
        result_ttl: Seconds a successful result is kept after its call ends; ``0`` (the
            default) keeps nothing. Expired results are pruned as new ones are stored, so
            memory holds at most the results of the last ``result_ttl`` seconds.
        clock: Monotonic time source in seconds, for tests.

    Example:
        >>> async def demo(worker: "ModelWorker") -> None:  # doctest: +SKIP
        ...     dedup = Deduplicator(result_ttl=5.0)
        ...     a, b = await asyncio.gather(
        ...         dedup.run("Hi", lambda: worker.infer("Hi")),
        ...         dedup.run("Hi", lambda: worker.infer("Hi")),  # joins the first call
        ...     )
        ...     assert a is b
        ...     await dedup.aclose()
    """

    __slots__ = (
        "_calls",
        "_clock",
        "_closed",
        "_results",
        "_stream_results",
        "_streams",
        "_tasks",
        "_ttl",
    )

    def __init__(
        self, *, result_ttl: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not result_ttl >= 0:
            raise ValueError(f"result_ttl must be >= 0 seconds, got {result_ttl}")
        self._ttl = result_ttl
        self._clock = clock
        self._closed = False
        self._calls: dict[Hashable, _Flight] = {}
        self._streams: dict[Hashable, _Flight] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # every task this owns, until done
        # Insertion order is expiry order (one TTL, a monotonic clock): prune from the front.
        self._results: collections.OrderedDict[Hashable, tuple[float, object]] = (
            collections.OrderedDict()
        )
        self._stream_results: collections.OrderedDict[
            Hashable, tuple[float, tuple[object, ...]]
        ] = collections.OrderedDict()

    # -- inspection ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Number of shared calls and streams running (each counted once, however shared)."""
        return len(self._calls) + len(self._streams)

    def waiters(self, key: Hashable) -> int:
        """Number of callers waiting on ``key`` in ``run`` plus those iterating it in ``stream``."""
        call = self._calls.get(key)
        stream = self._streams.get(key)
        running = (call.waiting + (call.leader is not None)) if call else 0
        return running + (stream.subscribers if stream else 0)

    @property
    def stored(self) -> int:
        """Number of results kept for ``result_ttl`` (expired ones included until pruned)."""
        return len(self._results) + len(self._stream_results)

    # -- sharing ---------------------------------------------------------------------------

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        """Return ``call()``'s result, sharing one call among identical keys in flight.

        Args:
            key: What makes two requests identical (e.g. ``cache_key(prompt)``).
            call: Starts the work; called by the first caller (the leader), in its own
                task. If the leader is cancelled while others wait, ``call`` is called
                again for them, in a task of this deduplicator.

        Returns:
            The shared call's result, or the stored result of a recent one. All callers of
            a key must expect the same type.

        Raises:
            Exception: The shared call's exception: the same object for every waiter.
            PipelineClosed: ``aclose()`` cancelled the call, or was called before.
        """
        flight = self._calls.get(key)
        if flight is None:
            if self._results:
                stored = self._lookup(self._results, key)
                if stored is not _MISSING:
                    return cast("T", stored)  # the key names the call, so its result's type
            if self._closed:
                raise PipelineClosed("the deduplicator is closed")
            flight = self._calls[key] = _Flight(key, self._calls)
            return cast("T", await self._lead(flight, call))
        _JOINS.inc()
        if not flight.finished:
            flight.waiting += 1
            try:
                await flight.waiters.wait()
            except BaseException:
                if not flight.finished:
                    flight.waiting -= 1
                    if not flight.waiting and flight.leader is None:
                        self._abandon(flight)  # nobody wants the call any more
                raise
        if flight.error is not None:
            flight.raise_error()
        return cast("T", flight.value)  # the key names the call, so its result's type

    async def _lead(self, flight: _Flight, call: Callable[[], Awaitable[object]]) -> object:
        """The first caller runs the call itself, in its own task: no task, no loop turn
        (a zero-delay call costs nothing more than calling it). If that caller is
        cancelled while others wait, the call is handed to them: started again in a task
        of the deduplicator's (the cancelled one cannot be resumed)."""
        me = asyncio.current_task()
        flight.leader = me
        flight.running = True
        try:
            value = await call()
        except asyncio.CancelledError:
            flight.leader = None
            if flight.closed and me is not None:  # aclose() cancelled it, not our caller
                me.uncancel()
                raise PipelineClosed(
                    "the deduplicator was closed while the call was in flight"
                ) from None
            if not flight.finished:
                if flight.waiting:  # hand the call to those still waiting
                    flight.running = False
                    task = spawn(asyncio.get_running_loop(), self._drive(flight, call))
                    flight.task = task
                    if not task.done():
                        self._tasks.add(task)
                else:
                    flight.abandoned = True
                    flight.error = asyncio.CancelledError()
                    self._finish(flight)
            raise
        except Exception as exc:
            flight.leader = None
            if not flight.finished:
                flight.error = exc
                self._finish(flight)
            raise
        flight.leader = None
        if not flight.finished:
            flight.value = value
            self._finish(flight)
            # A call that ignored its leader's cancellation was abandoned all the same.
            wanted = me is None or not me.cancelling()
            if self._ttl and wanted and not flight.closed:
                self._store(self._results, flight.key, value)
        return value

    async def _drive(self, flight: _Flight, call: Callable[[], Awaitable[object]]) -> None:
        # Waiters are woken from here, not from a done callback: one loop cycle sooner.
        # Errors are kept, not raised: each waiter raises it, none is left "never retrieved".
        flight.running = True
        try:
            flight.value = await call()
        except Exception as exc:
            flight.error = exc
        except BaseException as exc:  # cancellation: the task ends cancelled
            flight.error = exc
            raise
        finally:
            self._finish(flight)
        if self._ttl and flight.error is None and not (flight.abandoned or flight.closed):
            self._store(self._results, flight.key, flight.value)

    def _finish(self, flight: _Flight) -> None:
        flight.finished = True
        if flight.task is not None:
            self._tasks.discard(flight.task)
        if flight.registry.get(flight.key) is flight:
            del flight.registry[flight.key]
        flight.waiters.wake_all()

    def _abandon(self, flight: _Flight) -> None:
        flight.abandoned = True
        if flight.registry.get(flight.key) is flight:
            del flight.registry[flight.key]  # a caller arriving now starts afresh
        assert flight.task is not None
        flight.task.cancel()
        if not flight.running:  # cancelled before its first step: its finally never runs
            self._finish(flight)

    async def stream(
        self, key: Hashable, factory: Callable[[], AsyncIterator[T]]
    ) -> AsyncGenerator[T, None]:
        """Iterate ``factory()``'s items, sharing one iteration among identical keys.

        A joiner first gets every item produced so far, then the live ones, then the end
        or the same exception as every other subscriber. Closing the iterator early (or
        cancelling its consumer) leaves; the last subscriber leaving cancels the shared
        iteration. Leave promptly with ``contextlib.aclosing``: an iterator dropped
        without closing leaves only when the garbage collector finalizes it.

        Args:
            key: What makes two requests identical.
            factory: Returns the async iterator to share; called once, in a task of this
                deduplicator, by the leader's first ``__anext__``.

        Yields:
            The shared iteration's items, from the first.

        Raises:
            Exception: The shared iteration's exception, after the items before it.
            PipelineClosed: ``aclose()`` cancelled the iteration, or was called before.
        """
        flight = self._streams.get(key)
        if flight is None:
            if self._stream_results:
                stored = self._lookup(self._stream_results, key)
                if stored is not _MISSING:
                    for item in cast("tuple[T, ...]", stored):
                        yield item
                    return
            if self._closed:
                raise PipelineClosed("the deduplicator is closed")
            flight = self._streams[key] = _Flight(key, self._streams)
            flight.task = asyncio.get_running_loop().create_task(
                self._pump(flight, cast("Callable[[], AsyncIterator[object]]", factory))
            )
            self._tasks.add(flight.task)
        else:
            _JOINS.inc()
        items = flight.items
        waiters = flight.waiters
        flight.subscribers += 1
        i = 0
        try:
            while True:
                while i < len(items):
                    yield cast("T", items[i])
                    i += 1
                if flight.finished:
                    break
                await waiters.wait()
        finally:
            flight.subscribers -= 1
            if not flight.subscribers and not flight.finished:
                self._abandon(flight)
        flight.raise_error()

    async def _pump(self, flight: _Flight, factory: Callable[[], AsyncIterator[object]]) -> None:
        flight.running = True
        items = flight.items
        waiters = flight.waiters
        try:
            iterator = factory()
            try:
                async for item in iterator:
                    items.append(item)
                    if waiters:
                        waiters.wake_all()
            finally:
                # An async generator cancelled mid-await has already finished; other
                # iterators with an aclose() (an HTTP response stream, ...) close here.
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
        except Exception as exc:
            flight.error = exc
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            self._finish(flight)
        if self._ttl and flight.error is None and not (flight.abandoned or flight.closed):
            self._store(self._stream_results, flight.key, tuple(items))

    # -- stored results --------------------------------------------------------------------

    def _lookup(
        self, results: collections.OrderedDict[Hashable, tuple[float, V]], key: Hashable
    ) -> V | object:
        entry = results.get(key)
        if entry is None:
            return _MISSING
        if entry[0] > self._clock():
            return entry[1]
        del results[key]
        return _MISSING

    def _store(
        self, results: collections.OrderedDict[Hashable, tuple[float, V]], key: Hashable, value: V
    ) -> None:
        now = self._clock()
        while results:
            oldest = next(iter(results))
            if results[oldest][0] > now:
                break
            del results[oldest]
        results.pop(key, None)  # re-inserted at the end, where its expiry belongs
        results[key] = (now + self._ttl, value)

    # -- lifetime --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Cancel every call and stream in flight, drop stored results, refuse new work.

        Waiters of a cancelled call (and subscribers of a cancelled stream) get
        ``PipelineClosed``, not ``CancelledError``: they were not cancelled themselves, and
        a stray ``CancelledError`` would end their task silently. Later ``run``/``stream``
        calls raise ``PipelineClosed`` too. Returns when every task has finished;
        idempotent.
        """
        self._closed = True
        flights: list[_Flight] = [*self._calls.values(), *self._streams.values()]
        for flight in flights:
            flight.closed = True
        self._results.clear()
        self._stream_results.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        leaders = [f.leader for f in flights if f.leader is not None]
        for leader in leaders:  # a caller running a call inline: it raises PipelineClosed
            leader.cancel()
        for flight in flights:
            if not flight.running:  # cancelled before its first step: finish it here
                flight.error = asyncio.CancelledError()
                self._finish(flight)
            elif flight.leader is not None and not flight.finished:
                flight.error = asyncio.CancelledError()  # its waiters: PipelineClosed
                self._finish(flight)
        if tasks:
            await asyncio.wait(tasks)
