"""Cache, rate limits, dedup, retry and circuit breaking inside the pipeline."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import anyio
import pytest

from orchestrator import (
    EchoWorker,
    InferenceError,
    Overloaded,
    PipelineConfig,
    PromptRequest,
    RateLimited,
    RequestStatus,
    metrics,
    spawn_pipeline,
)
from orchestrator.enhanced import CacheLayer, CircuitBreaker, Deduplicator, RateLimiter, RetryPolicy
from orchestrator.errors import CircuitOpen
from tests.helpers import GateWorker, prompt_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def no_sleep(_: float) -> None:
    return None


class FlakyWorker(GateWorker):
    """Fails its first ``failures`` calls with a retryable error, then answers."""

    name = "flaky"

    def __init__(self, failures: int, *, after_tokens: int = 0) -> None:
        super().__init__(open_=True)
        self.failures = failures
        self.after_tokens = after_tokens
        self.calls = 0

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        self.calls += 1
        failing = self.calls <= self.failures
        produced = 0
        async for token in super().stream(prompt):
            if failing and produced >= self.after_tokens:
                raise InferenceError("overloaded", status_code=503, retryable=True)
            produced += 1
            yield token
        if failing:
            raise InferenceError("overloaded", status_code=503, retryable=True)


# -- cache ---------------------------------------------------------------------------------


async def test_cache_hit_completes_at_once_without_the_worker() -> None:
    worker = GateWorker(open_=True)
    cache = CacheLayer.new_memory(100)
    hits = sample("orchestrator_cache_hits_total", backend="memory")
    async with spawn_pipeline(worker, PipelineConfig(cache=cache)) as handles:
        first = await handles.infer("What is Rust?", meta={"priority": "low"})
        ticket = await handles.submit(
            PromptRequest("someone-else", "What is Rust?", meta={"priority": "high"})
        )
        assert ticket.status is RequestStatus.COMPLETED  # before any stage ran
        assert await ticket.result() == first == prompt_for("What is Rust?")
        assert [t async for t in ticket.tokens()] == [first]
        assert handles.get(ticket.request_id) == ticket
    assert len(worker.prompts) == 1
    assert sample("orchestrator_cache_hits_total", backend="memory") - hits == 1


async def test_cache_key_covers_metadata_and_worker_identity() -> None:
    cache = CacheLayer.new_memory(100)
    worker = GateWorker(open_=True)
    async with spawn_pipeline(worker, PipelineConfig(cache=cache)) as handles:
        await handles.infer("q", meta={"category": "chat"})
        await handles.infer("q", meta={"category": "code"})
    assert len(worker.prompts) == 2

    class Identified(GateWorker):
        cache_identity = "model-b"

    second = Identified(open_=True)
    async with spawn_pipeline(second, PipelineConfig(cache=cache)) as handles:
        await handles.infer("q", meta={"category": "chat"})
    assert len(second.prompts) == 1  # same input and metadata, another model: a miss


async def test_cache_key_keeps_metadata_keys_and_values_apart() -> None:
    cache = CacheLayer.new_memory(100)
    worker = GateWorker(open_=True)
    async with spawn_pipeline(worker, PipelineConfig(cache=cache)) as handles:
        await handles.infer("q", meta={"a": "b=c"})
        await handles.infer("q", meta={"a=b": "c"})
        await handles.infer("q", meta={"a": "b=c", "priority": "high"})  # priority: ignored
    assert len(worker.prompts) == 2


async def test_failures_are_not_cached() -> None:
    cache = CacheLayer.new_memory(100)
    worker = GateWorker(open_=True)
    worker.fail_with = RuntimeError("boom")
    async with spawn_pipeline(worker, PipelineConfig(cache=cache)) as handles:
        with pytest.raises(InferenceError):
            await handles.infer("q")
        worker.fail_with = None
        assert await handles.infer("q") == prompt_for("q")
    assert len(worker.prompts) == 2


async def test_redis_outage_degrades_the_cache_and_it_recovers(
    redis_server: RedisServer,
) -> None:
    if not redis_server.can_restart:
        pytest.skip("an external Redis server cannot be stopped by the tests")
    prefix = f"test-{uuid.uuid4().hex}:"
    cache = await CacheLayer.new_redis(redis_server.url, prefix=prefix, probe_interval=0)
    worker = GateWorker(open_=True)
    try:
        async with spawn_pipeline(worker, PipelineConfig(cache=cache)) as handles:
            await handles.infer("before")
            assert await handles.infer("before") == prompt_for("before")
            assert len(worker.prompts) == 1  # served from Redis
            with redis_server.stopped():
                assert await handles.infer("during") == prompt_for("during")
                assert await handles.infer("during") == prompt_for("during")
            assert len(worker.prompts) == 3  # no cache while Redis was down, no failure
            await handles.infer("after")
            await handles.infer("after")
        assert len(worker.prompts) == 4  # the cache works again
    finally:
        await cache.aclose()


# -- rate limits ---------------------------------------------------------------------------


async def test_rate_limit_is_enforced_at_submit_per_session() -> None:
    limiter = RateLimiter(2, 60, clock=lambda: 0.0)  # time stands still: exact numbers
    async with spawn_pipeline(EchoWorker.with_delay(0), PipelineConfig(rate_limiter=limiter)) as h:
        first = await h.submit(PromptRequest("alice", "1"))
        await h.submit(PromptRequest("alice", "2"))
        assert first.rate_limit is not None  # the decision that admitted it
        assert (first.rate_limit.limit, first.rate_limit.remaining) == (2, 1)
        assert first.rate_limit.reset_in == pytest.approx(30.0)
        found = h.get(first.request_id)
        assert found is not None
        assert found.rate_limit is None  # a ticket found by id knows no admission
        with pytest.raises(RateLimited) as info:
            await h.submit(PromptRequest("alice", "3"))
        assert (await h.submit(PromptRequest("bob", "1"))).request_id
        assert h.in_flight <= 3
    assert info.value.limit == 2
    assert info.value.remaining == 0
    assert info.value.retry_after == pytest.approx(30.0)  # one token back: 60 s / 2
    assert info.value.reset_in == pytest.approx(60.0)  # both back: the bucket full again


async def test_a_full_pipeline_refuses_before_spending_the_sessions_budget() -> None:
    gate = asyncio.Event()

    async def retriever(request: PromptRequest) -> str:
        await gate.wait()
        return ""

    config = PipelineConfig(
        rate_limiter=RateLimiter(2, 60), retriever=retriever, rag_capacity=1, stage_concurrency=1
    )
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        fillers = []
        for i in range(3):  # one in the RAG hook, one waiting for it, one queued: full
            fillers.append(await handles.submit(PromptRequest(f"filler{i}", "x")))
            await anyio.wait_all_tasks_blocked()
        for _ in range(3):
            with pytest.raises(Overloaded):
                await handles.submit(PromptRequest("alice", "q"))
        gate.set()
        with anyio.fail_after(5):
            for ticket in fillers:
                await ticket.wait()
            # Refused three times, alice has spent nothing: her two requests go through.
            assert await handles.infer("q", session_id="alice")
            assert await handles.infer("q", session_id="alice")
        with pytest.raises(RateLimited):
            await handles.submit(PromptRequest("alice", "q"))


# -- dedup ---------------------------------------------------------------------------------


async def test_identical_prompts_in_flight_share_one_worker_call() -> None:
    worker = GateWorker()
    joins = sample("orchestrator_dedup_joins_total")
    async with spawn_pipeline(worker, PipelineConfig(dedup=True)) as handles:
        tickets = [await handles.submit(PromptRequest(f"s{i}", "same")) for i in range(3)]
        other = await handles.submit(PromptRequest("s", "different"))
        await worker.wait_started(2)
        await anyio.wait_all_tasks_blocked()
        worker.gate.set()
        results = await asyncio.gather(*(t.result() for t in tickets))
        assert await other.result() == prompt_for("different")
    assert results == [prompt_for("same")] * 3
    assert sorted(worker.prompts) == sorted([prompt_for("same"), prompt_for("different")])
    assert sample("orchestrator_dedup_joins_total") - joins == 2


async def test_a_cancelled_joiner_leaves_the_others_their_result() -> None:
    worker = GateWorker()
    async with spawn_pipeline(worker, PipelineConfig(dedup=Deduplicator())) as handles:
        a = await handles.submit(PromptRequest("s", "same"))
        b = await handles.submit(PromptRequest("s", "same"))
        await worker.wait_started(1)
        await anyio.wait_all_tasks_blocked()
        assert await a.cancel() is True
        worker.gate.set()
        assert await b.result() == prompt_for("same")
    assert a.status is RequestStatus.CANCELLED
    # a's slot ran the shared call itself: a's cancel ended that attempt, and the call
    # was made again for b, who still wanted it.
    assert worker.cancelled == 1
    assert len(worker.prompts) == 2


async def test_dedup_shares_a_stream_token_by_token() -> None:
    worker = GateWorker(open_=True)
    worker.token_gates = [asyncio.Event()]
    config = PipelineConfig(dedup=True, template="{input}")
    async with spawn_pipeline(worker, config) as handles:
        a = await handles.submit(PromptRequest("s", "x y"), stream=True)
        b = await handles.submit(PromptRequest("s", "x y"), stream=True)
        await worker.wait_started(1)
        await anyio.wait_all_tasks_blocked()
        worker.token_gates[0].set()
        assert [t async for t in a.tokens()] == [t async for t in b.tokens()] == ["x", " y"]
    assert len(worker.prompts) == 1


# -- retry and circuit breaker -------------------------------------------------------------


async def test_retry_recovers_from_transient_worker_errors() -> None:
    worker = FlakyWorker(failures=2)
    retry = RetryPolicy(max_attempts=3, sleep=no_sleep)
    retries = sample("orchestrator_retries_total", worker="flaky")
    async with spawn_pipeline(worker, PipelineConfig(retry=retry)) as handles:
        assert await handles.infer("q") == prompt_for("q")
        worker.calls, worker.failures = 0, 2
        ticket = await handles.submit(PromptRequest("s", "q2"), stream=True)
        assert "".join([t async for t in ticket.tokens()]) == prompt_for("q2")
    assert sample("orchestrator_retries_total", worker="flaky") - retries == 4


async def test_a_stream_is_not_retried_after_its_first_token() -> None:
    worker = FlakyWorker(failures=1, after_tokens=1)
    retry = RetryPolicy(max_attempts=3, sleep=no_sleep)
    async with spawn_pipeline(worker, PipelineConfig(retry=retry)) as handles:
        ticket = await handles.submit(PromptRequest("s", "q"), stream=True)
        with pytest.raises(InferenceError, match="overloaded"):
            async for _ in ticket.tokens():
                pass
    assert worker.calls == 1


async def test_breaker_opens_on_a_failing_worker_and_closes_after_recovery() -> None:
    now = 0.0
    breaker = CircuitBreaker(
        failure_threshold=2,
        open_timeout=30.0,
        half_open_max_calls=1,
        name="test-pipeline",
        clock=lambda: now,
    )
    worker = GateWorker(open_=True)
    worker.fail_with = InferenceError("down", status_code=503, retryable=True)
    async with spawn_pipeline(worker, PipelineConfig(circuit_breaker=breaker)) as handles:
        for _ in range(2):
            with pytest.raises(InferenceError, match="down"):
                await handles.infer("q")
        with pytest.raises(CircuitOpen):
            await handles.infer("q")  # fails fast
        assert len(worker.prompts) == 2
        assert sample("orchestrator_circuit_breaker_state", breaker="test-pipeline") == 2
        now = 31.0
        worker.fail_with = None
        assert await handles.infer("q") == prompt_for("q")  # the probe succeeds
        assert sample("orchestrator_circuit_breaker_state", breaker="test-pipeline") == 0
        assert await handles.infer("q2") == prompt_for("q2")


async def test_input_tx_send_applies_the_same_policies_as_submit() -> None:
    cache = CacheLayer.new_memory(10)
    config = PipelineConfig(rate_limiter=RateLimiter(2, 60), cache=cache)
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        first = await handles.input_tx.send(PromptRequest("alice", "q"))
        assert await first.result() == prompt_for("q")
        again = await handles.input_tx.send(PromptRequest("alice", "q"))
        assert again.status is RequestStatus.COMPLETED  # a cache hit at once
        with pytest.raises(RateLimited):
            await handles.input_tx.send(PromptRequest("alice", "q"))
