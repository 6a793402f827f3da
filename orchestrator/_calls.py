"""``WorkerCalls``: how the Inference stage calls the worker. Private.

Composed once, from the policies' own classes: dedup outermost (identical prompts in
flight share one call), then the retry policy, then the circuit breaker around each
attempt. A stream is one breaker call from its opening to its last token
(``CircuitBreaker.guard``), and is retried only until its first token: after that the
tokens have reached readers, and a retry would repeat them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, final

from orchestrator.workers.base import worker_name

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

    from orchestrator.enhanced.circuit_breaker import CircuitBreaker
    from orchestrator.enhanced.dedup import Deduplicator
    from orchestrator.enhanced.retry import RetryPolicy
    from orchestrator.workers.base import ModelWorker

__all__ = ["WorkerCalls", "close_stream"]


async def close_stream(stream: AsyncIterator[Any]) -> None:
    """Close a worker's stream (an HTTP worker closes its response); a plain async
    iterator without ``aclose`` has nothing to close."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


@final
class WorkerCalls:
    """``infer(prompt)`` and ``stream(prompt)`` through the configured policies.

    ``infer`` may return a list shared with other callers (dedup): copy it before
    changing it.
    """

    __slots__ = ("_breaker", "_retry", "_worker", "guarded", "infer", "name", "stream")

    def __init__(
        self,
        worker: ModelWorker,
        *,
        dedup: Deduplicator | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._worker = worker
        self._retry = retry
        self._breaker = breaker
        self.name = worker_name(worker)
        self.guarded = dedup is not None or retry is not None or breaker is not None

        infer: Callable[[str], Awaitable[list[str]]] = worker.infer
        if breaker is not None:
            infer = functools.partial(self._infer_through_breaker, infer)
        if retry is not None:
            infer = functools.partial(self._retried, infer)
        if dedup is not None:
            infer = functools.partial(_shared_infer, dedup, infer)
        self.infer = infer

        stream: Callable[[str], AsyncIterator[str]] = worker.stream
        if breaker is not None or retry is not None:
            stream = self._stream_guarded
        if dedup is not None:
            stream = functools.partial(_shared_stream, dedup, stream)
        self.stream = stream

    async def _infer_through_breaker(
        self, infer: Callable[[str], Awaitable[list[str]]], prompt: str
    ) -> list[str]:
        assert self._breaker is not None
        return await self._breaker.call(functools.partial(infer, prompt))

    async def _retried(
        self, infer: Callable[[str], Awaitable[list[str]]], prompt: str
    ) -> list[str]:
        assert self._retry is not None
        return await self._retry.call(functools.partial(infer, prompt), worker=self.name)

    async def _stream_guarded(self, prompt: str) -> AsyncGenerator[str, None]:
        opened = functools.partial(self._open, prompt)
        if self._retry is not None:
            stream, first = await self._retry.call(opened, worker=self.name)
        else:
            stream, first = await opened()
        try:
            if first is None:
                return
            yield first
            async for token in stream:
                yield token
        finally:
            await stream.aclose()

    async def _open(self, prompt: str) -> tuple[AsyncGenerator[str, None], str | None]:
        """One attempt, up to its first token (``None``: the stream was empty)."""
        stream = self._attempt(prompt)
        try:
            first: str | None = await anext(stream)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await stream.aclose()
            raise
        return stream, first

    async def _attempt(self, prompt: str) -> AsyncGenerator[str, None]:
        """The worker's stream, as one breaker call when there is a breaker."""
        stream = self._worker.stream(prompt)
        try:
            if self._breaker is None:
                async for token in stream:
                    yield token
            else:
                async with self._breaker.guard():
                    async for token in stream:
                        yield token
        finally:
            await close_stream(stream)


async def _shared_infer(
    dedup: Deduplicator, infer: Callable[[str], Awaitable[list[str]]], prompt: str
) -> list[str]:
    return await dedup.run(prompt, functools.partial(infer, prompt))


def _shared_stream(
    dedup: Deduplicator, stream: Callable[[str], AsyncIterator[str]], prompt: str
) -> AsyncIterator[str]:
    return dedup.stream(prompt, functools.partial(stream, prompt))
