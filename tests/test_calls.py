"""WorkerCalls: dedup, retry and the circuit breaker composed once around the worker. A
stream is one breaker call, retried only until its first token."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import anyio
import pytest

from orchestrator._calls import WorkerCalls, close_stream
from orchestrator.enhanced.circuit_breaker import CircuitBreaker, CircuitState
from orchestrator.enhanced.dedup import Deduplicator
from orchestrator.enhanced.retry import RetryPolicy
from orchestrator.errors import CircuitOpen, InferenceError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.anyio


def _flaky(message: str = "flaky") -> InferenceError:
    return InferenceError(message, retryable=True)


class ScriptedWorker:
    """Each call plays the next script: the tokens it yields, then the error it raises
    (``None``: it ends cleanly). Records which method was called and whether each stream
    was closed."""

    name = "scripted"

    def __init__(self, *scripts: tuple[list[str], Exception | None]) -> None:
        self.scripts = list(scripts)
        self.calls: list[str] = []
        self.closed = 0
        self.gate: asyncio.Event | None = None

    def _next(self) -> tuple[list[str], Exception | None]:
        return self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]

    async def infer(self, prompt: str) -> list[str]:
        self.calls.append("infer")
        tokens, error = self._next()
        if self.gate is not None:
            await self.gate.wait()
        if error is not None:
            raise error
        return list(tokens)

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        self.calls.append("stream")
        tokens, error = self._next()
        try:
            if self.gate is not None:
                await self.gate.wait()
            for token in tokens:
                yield token
            if error is not None:
                raise error
        finally:
            self.closed += 1


class NoSleep:
    """A retry's sleep that records its delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def _retry(attempts: int = 3) -> RetryPolicy:
    return RetryPolicy(max_attempts=attempts, base_delay=0.0, jitter=False, sleep=NoSleep())


async def _collect(stream: AsyncIterator[str], into: list[str]) -> None:
    async for token in stream:
        into.append(token)


async def test_without_policies_the_worker_is_called_directly() -> None:
    worker = ScriptedWorker((["a", "b"], None))
    calls = WorkerCalls(worker)
    assert not calls.guarded
    assert calls.name == "scripted"
    assert calls.infer == worker.infer  # no layer in between
    with anyio.fail_after(5):
        assert await calls.infer("p") == ["a", "b"]
        assert [t async for t in calls.stream("p")] == ["a", "b"]


async def test_a_failing_stream_is_one_breaker_failure_not_one_per_token() -> None:
    breaker = CircuitBreaker(failure_threshold=2, name="calls-test")
    worker = ScriptedWorker((["a", "b", "c"], InferenceError("broke mid-stream")))
    calls = WorkerCalls(worker, breaker=breaker)
    assert calls.guarded
    tokens: list[str] = []
    with anyio.fail_after(5), pytest.raises(InferenceError, match="mid-stream"):
        await _collect(calls.stream("p"), tokens)
    assert tokens == ["a", "b", "c"]
    assert breaker.failures == 1  # three tokens, one call
    states = [breaker.state]
    with anyio.fail_after(5), pytest.raises(InferenceError):
        await _collect(calls.stream("p"), [])
    states.append(breaker.state)
    assert breaker.failures == 2
    assert states == [CircuitState.CLOSED, CircuitState.OPEN]  # the second failure opened it


async def test_a_whole_stream_is_one_breaker_success() -> None:
    breaker = CircuitBreaker(failure_threshold=2, name="calls-test")
    worker = ScriptedWorker((["x"], InferenceError("down")), (["a", "b", "c"], None))
    calls = WorkerCalls(worker, breaker=breaker)
    with anyio.fail_after(5):
        with pytest.raises(InferenceError):
            await _collect(calls.stream("p"), [])
        assert breaker.failures == 1
        assert [t async for t in calls.stream("p")] == ["a", "b", "c"]
    assert breaker.failures == 0


async def test_an_open_breaker_refuses_a_stream_without_calling_the_worker() -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_timeout=60, name="calls-test")
    worker = ScriptedWorker(([], InferenceError("down")))
    calls = WorkerCalls(worker, breaker=breaker, retry=_retry())
    with anyio.fail_after(5):
        with pytest.raises(InferenceError, match="down"):
            await _collect(calls.stream("p"), [])
        with pytest.raises(CircuitOpen):  # and not retried: retrying an open breaker is moot
            await _collect(calls.stream("p"), [])
    assert worker.calls == ["stream"]


async def test_a_stream_failing_before_its_first_token_is_retried() -> None:
    retry = _retry()
    breaker = CircuitBreaker(failure_threshold=5, name="calls-test")
    worker = ScriptedWorker(([], _flaky()), ([], _flaky()), (["a", "b"], None))
    calls = WorkerCalls(worker, retry=retry, breaker=breaker)
    with anyio.fail_after(5):
        assert [t async for t in calls.stream("p")] == ["a", "b"]
    assert worker.calls == ["stream"] * 3
    assert worker.closed == 3  # every attempt's stream closed
    assert breaker.failures == 0  # two failed attempts counted, then the success reset it


async def test_each_failed_stream_attempt_is_one_breaker_failure() -> None:
    breaker = CircuitBreaker(failure_threshold=5, name="calls-test")
    worker = ScriptedWorker(([], _flaky()))
    calls = WorkerCalls(worker, retry=_retry(3), breaker=breaker)
    with anyio.fail_after(5), pytest.raises(InferenceError, match="flaky"):
        await _collect(calls.stream("p"), [])
    assert worker.calls == ["stream"] * 3
    assert breaker.failures == 3


async def test_a_stream_failing_after_its_first_token_is_not_retried() -> None:
    worker = ScriptedWorker((["a", "b"], _flaky("cut off")), (["a", "b", "c"], None))
    calls = WorkerCalls(worker, retry=_retry())
    tokens: list[str] = []
    with anyio.fail_after(5), pytest.raises(InferenceError, match="cut off"):
        await _collect(calls.stream("p"), tokens)
    assert tokens == ["a", "b"]  # no token repeated by a retry
    assert worker.calls == ["stream"]


async def test_an_empty_stream_ends_cleanly_through_the_policies() -> None:
    breaker = CircuitBreaker(failure_threshold=1, name="calls-test")
    calls = WorkerCalls(ScriptedWorker(([], None)), retry=_retry(), breaker=breaker)
    with anyio.fail_after(5):
        assert [t async for t in calls.stream("p")] == []
    assert breaker.state is CircuitState.CLOSED


async def test_closing_a_stream_early_closes_the_workers_and_is_no_failure() -> None:
    breaker = CircuitBreaker(failure_threshold=1, name="calls-test")
    worker = ScriptedWorker((["a", "b", "c"], None))
    calls = WorkerCalls(worker, retry=_retry(), breaker=breaker)
    stream = calls.stream("p")
    with anyio.fail_after(5):
        assert await anext(stream) == "a"
        await close_stream(stream)
    assert worker.closed == 1
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failures == 0


async def test_infer_is_retried_through_the_breaker_per_attempt() -> None:
    breaker = CircuitBreaker(failure_threshold=5, name="calls-test")
    worker = ScriptedWorker(([], _flaky()), ([], _flaky()), (["ok"], None))
    calls = WorkerCalls(worker, retry=_retry(), breaker=breaker)
    with anyio.fail_after(5):
        assert await calls.infer("p") == ["ok"]
    assert worker.calls == ["infer"] * 3
    failing = WorkerCalls(ScriptedWorker(([], _flaky())), retry=_retry(2), breaker=breaker)
    with anyio.fail_after(5), pytest.raises(InferenceError):
        await failing.infer("p")
    assert breaker.failures == 2


async def test_dedup_shares_one_infer_call_among_identical_prompts() -> None:
    worker = ScriptedWorker((["a", "b"], None))
    worker.gate = asyncio.Event()
    dedup = Deduplicator()
    calls = WorkerCalls(worker, dedup=dedup, retry=_retry())
    try:
        with anyio.fail_after(5):
            first = asyncio.ensure_future(calls.infer("same"))
            second = asyncio.ensure_future(calls.infer("same"))
            other = asyncio.ensure_future(calls.infer("other"))
            await anyio.wait_all_tasks_blocked()
            assert worker.calls == ["infer", "infer"]  # "same" once, "other" once
            worker.gate.set()
            assert await first == await second == ["a", "b"]
            assert await other == ["a", "b"]
    finally:
        await dedup.aclose()


async def test_dedup_shares_one_stream_among_identical_prompts() -> None:
    worker = ScriptedWorker((["a", "b", "c"], None))
    worker.gate = asyncio.Event()
    dedup = Deduplicator()
    calls = WorkerCalls(worker, dedup=dedup, breaker=CircuitBreaker(name="calls-test"))
    try:
        with anyio.fail_after(5):
            got: tuple[list[str], list[str]] = ([], [])
            readers = [asyncio.create_task(_collect(calls.stream("same"), into)) for into in got]
            await anyio.wait_all_tasks_blocked()
            worker.gate.set()
            await asyncio.gather(*readers)
        assert got == (["a", "b", "c"], ["a", "b", "c"])
        assert worker.calls == ["stream"]
    finally:
        await dedup.aclose()
