"""The pipeline shared over a real (throwaway) Redis, several pipelines in one test loop:
what crosses processes crosses here through Redis only."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import pytest
from redis.asyncio import Redis

from orchestrator import (
    EchoWorker,
    InvalidRequest,
    Overloaded,
    PipelineConfig,
    PipelineHandles,
    PromptRequest,
    RequestStatus,
    metrics,
    spawn_pipeline,
)
from orchestrator.distributed import ClusterConfig, Role
from orchestrator.distributed._metrics import sample_queue
from tests.helpers import GateWorker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from orchestrator import ModelWorker

pytestmark = pytest.mark.anyio

PLAIN = PipelineConfig(template="{input}", retriever=None, request_timeout=30)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


class Pipelines:
    """Pipelines on one Redis and prefix, each shut down at the end."""

    def __init__(self, url: str, prefix: str, stack: AsyncExitStack) -> None:
        self.url, self.prefix, self._stack = url, prefix, stack

    async def frontend(self, config: PipelineConfig = PLAIN, **cluster: object) -> PipelineHandles:
        return await self._start(None, config, "frontend", cluster)

    async def worker(
        self, worker: ModelWorker, config: PipelineConfig = PLAIN, **cluster: object
    ) -> PipelineHandles:
        return await self._start(worker, config, "worker", cluster)

    async def _start(
        self, worker: ModelWorker | None, config: PipelineConfig, role: Role, cluster: object
    ) -> PipelineHandles:
        settings = ClusterConfig(prefix=self.prefix, **cluster)  # type: ignore[arg-type]
        handles = spawn_pipeline(
            worker,
            config,
            redis_url=self.url,
            role=role,
            cluster=settings,
        )
        return await self._stack.enter_async_context(handles)


@pytest.fixture
async def pipelines(redis_url: str, prefix: str) -> AsyncIterator[Pipelines]:
    async with AsyncExitStack() as stack:
        yield Pipelines(redis_url, prefix, stack)


async def test_a_request_submitted_to_one_pipeline_runs_on_another(pipelines: Pipelines) -> None:
    front = await pipelines.frontend()
    await pipelines.worker(EchoWorker.with_delay(0))
    ticket = await front.submit(PromptRequest("u1", "across processes"))
    with anyio.fail_after(5):
        assert await ticket.result() == "across processes"
    found = await front.find(ticket.request_id)
    assert found is not None
    assert (found.status, found.text) == (RequestStatus.COMPLETED, "across processes")


async def test_admission_refuses_a_duplicate_id(pipelines: Pipelines) -> None:
    first, second = await pipelines.frontend(), await pipelines.frontend()
    await first.submit(PromptRequest("u", "x", request_id="same-id"))
    with pytest.raises(InvalidRequest, match="already in use"):
        await second.submit(PromptRequest("u", "y", request_id="same-id"))


async def test_capacity_is_shared_and_atomic_across_frontends(pipelines: Pipelines) -> None:
    fronts = [await pipelines.frontend(capacity=10) for _ in range(2)]

    async def submit(i: int) -> str:
        try:
            await fronts[i % 2].submit(PromptRequest("u", f"r{i}"))
        except Overloaded:
            return "shed"
        return "accepted"

    outcomes = await asyncio.gather(*(submit(i) for i in range(40)))
    assert outcomes.count("accepted") == 10  # no worker: nothing leaves the queue
    assert outcomes.count("shed") == 30


async def test_a_terminal_status_is_set_once_whoever_finishes(pipelines: Pipelines) -> None:
    front = await pipelines.frontend()
    ticket = await front.submit(PromptRequest("u", "x"))
    store = front._runtime.store  # the seam itself: two finishes race
    firsts = await asyncio.gather(
        store.finish(ticket.request_id, RequestStatus.COMPLETED, result="one"),
        store.finish(ticket.request_id, RequestStatus.FAILED, error=RuntimeError("two")),
    )
    assert sorted(firsts) == [False, True]  # one finished it; the other was told so
    winner = RequestStatus.COMPLETED if firsts[0] else RequestStatus.FAILED
    again = await front.find(ticket.request_id)
    assert again is not None
    assert again.status is winner
    assert again.text == ("one" if firsts[0] else None)


async def test_tokens_reach_another_pipeline_from_the_first_however_late(
    pipelines: Pipelines,
) -> None:
    worker = GateWorker()
    worker.token_gates = [asyncio.Event() for _ in range(3)]
    front = await pipelines.frontend()
    await pipelines.worker(worker)
    ticket = await front.submit(PromptRequest("u", "one two three four"), stream=True)
    with anyio.fail_after(5):
        await worker.wait_started(1)
        worker.gate.set()
        worker.token_gates[0].set()
        worker.token_gates[1].set()
        tokens = ticket.tokens()
        assert [await anext(tokens), await anext(tokens)] == ["one", " two"]
        worker.token_gates[2].set()
        rest = [token async for token in tokens]
        late = [token async for token in (await front.find(ticket.request_id)).tokens()]  # type: ignore[union-attr]
    assert rest == [" three", " four"]
    assert late == ["one", " two", " three", " four"]


async def test_cancel_on_a_frontend_cancels_the_call_in_a_worker(pipelines: Pipelines) -> None:
    worker = GateWorker()
    front = await pipelines.frontend()
    await pipelines.worker(worker)
    ticket = await front.submit(PromptRequest("u", "never answered"))
    with anyio.fail_after(5):
        await worker.wait_started(1)
        assert await ticket.cancel()
        while worker.cancelled == 0:  # nothing to await across processes: the worker's
            await anyio.sleep(0.01)  # call ends when its notification arrives
    assert ticket.status is RequestStatus.CANCELLED
    assert not await ticket.cancel()


async def test_workers_take_critical_before_low_across_processes(
    pipelines: Pipelines,
) -> None:
    front = await pipelines.frontend()
    tickets = []
    for i in range(3):
        tickets.append(await front.submit(PromptRequest("u", f"low {i}", meta={"priority": "low"})))
    for i in range(3):
        tickets.append(
            await front.submit(PromptRequest("u", f"critical {i}", meta={"priority": "critical"}))
        )
    order: list[str] = []

    class Recording:
        name = "recording"

        async def infer(self, prompt: str) -> list[str]:
            order.append(prompt)
            return [prompt]

        def stream(self, prompt: str) -> AsyncIterator[str]:
            raise NotImplementedError

    await pipelines.worker(Recording(), PipelineConfig(template="{input}", max_concurrency=1))
    with anyio.fail_after(5):
        for ticket in tickets:
            await ticket.result()
    assert order == [f"critical {i}" for i in range(3)] + [f"low {i}" for i in range(3)]


async def test_a_deadline_that_passes_in_the_queue_never_reaches_the_worker(
    pipelines: Pipelines,
) -> None:
    worker = GateWorker(open_=True)
    front = await pipelines.frontend()
    ticket = await front.submit(PromptRequest("u", "too late", timeout=0.05))
    with anyio.fail_after(5):
        await ticket.wait()
    assert ticket.status is RequestStatus.TIMEOUT  # ended by the frontend that admitted it
    await pipelines.worker(worker)
    after = await front.submit(PromptRequest("u", "in time"))
    with anyio.fail_after(5):
        await after.result()
    assert worker.prompts == ["in time"]


async def test_a_finished_record_expires_with_the_retention(
    pipelines: Pipelines, redis: Redis, prefix: str
) -> None:
    config = PipelineConfig(template="{input}", retriever=None, retention_seconds=120)
    front = await pipelines.frontend(config)
    await pipelines.worker(EchoWorker.with_delay(0), config)
    ticket = await front.submit(PromptRequest("u", "x"))
    with anyio.fail_after(5):
        await ticket.result()
    ttl = await redis.pttl(f"{prefix}req:{ticket.request_id}")
    assert 100_000 < ttl <= 120_000


async def test_a_dead_workers_jobs_are_reclaimed_and_run_elsewhere(
    pipelines: Pipelines, redis: Redis, prefix: str
) -> None:
    front = await pipelines.frontend()
    tickets = [await front.submit(PromptRequest("u", f"r{i}")) for i in range(5)]
    # A worker takes them and dies at once: its entries stay pending, unrenewed.
    queue = f"{prefix}q:normal"
    await redis.xgroup_create(queue, "workers", id="0", mkstream=True)
    taken = await redis.xreadgroup("workers", "dead-worker", {queue: ">"}, count=10)
    assert len(taken[0][1]) == 5
    for ticket in tickets:  # its take counted the deliveries, as every worker's does
        await redis.hincrby(f"{prefix}req:{ticket.request_id}", "attempt", 1)  # type: ignore[misc]
    reclaims = metrics.RECLAIMS.labels().value
    redeliveries = metrics.REDELIVERIES.labels().value
    await pipelines.worker(EchoWorker.with_delay(0), reclaim_after=0.2)
    with anyio.fail_after(10):
        results = [await ticket.result() for ticket in tickets]
    assert results == [f"r{i}" for i in range(5)]
    assert metrics.RECLAIMS.labels().value - reclaims == 5
    assert metrics.REDELIVERIES.labels().value - redeliveries == 5
    with anyio.fail_after(5):  # acknowledged (and deleted) in the worker's next batch:
        while await redis.xlen(queue):  # nothing to await across processes, so a poll
            await anyio.sleep(0.01)


async def test_a_job_delivered_too_often_is_dead_lettered(
    pipelines: Pipelines, redis: Redis, prefix: str
) -> None:
    front = await pipelines.frontend()
    ticket = await front.submit(PromptRequest("u", "poison"))
    await redis.hset(f"{prefix}req:{ticket.request_id}", "attempt", "3")  # type: ignore[misc]
    dead = metrics.DEAD_LETTERS.labels().value
    await pipelines.worker(EchoWorker.with_delay(0), max_deliveries=3)
    with anyio.fail_after(5):
        await ticket.wait()
    assert ticket.status is RequestStatus.FAILED
    assert "dead-lettered" in str(ticket.error)
    assert await redis.xlen(f"{prefix}dead") == 1
    assert metrics.DEAD_LETTERS.labels().value - dead == 1


async def test_a_worker_shutting_down_hands_back_what_it_had_not_started(
    pipelines: Pipelines,
) -> None:
    slow = GateWorker()
    front = await pipelines.frontend()
    first = await pipelines.worker(slow, PipelineConfig(template="{input}", max_concurrency=2))
    tickets = [await front.submit(PromptRequest("u", f"r{i}")) for i in range(2)]
    with anyio.fail_after(5):
        await slow.wait_started(2)  # both slots busy: nothing else taken
    more = [await front.submit(PromptRequest("u", f"later {i}")) for i in range(3)]
    peer = GateWorker(open_=True)
    await pipelines.worker(peer)
    shutdown = asyncio.create_task(first.shutdown(drain_timeout=5))
    with anyio.fail_after(5):
        await anyio.wait_all_tasks_blocked()
        slow.gate.set()  # the running calls finish within the grace
        await shutdown
        for ticket in (*tickets, *more):
            await ticket.result()
    assert all(t.status is RequestStatus.COMPLETED for t in (*tickets, *more))
    assert sorted(slow.prompts) == ["r0", "r1"]


async def test_the_shared_queue_gauges_read_redis(
    pipelines: Pipelines, redis: Redis, prefix: str
) -> None:
    front = await pipelines.frontend()
    for i in range(3):
        await front.submit(PromptRequest("u", f"r{i}", meta={"priority": "high"}))
    streams = [f"{prefix}q:{level}" for level in ("critical", "high", "normal", "low")]
    for stream in streams:
        await redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    await redis.xreadgroup("workers", "someone", {streams[1]: ">"}, count=1)
    sampler = asyncio.create_task(sample_queue(redis, streams, None, every=0.01))
    try:
        with anyio.fail_after(5):
            while metrics.SHARED_QUEUE_PENDING.value("high") != 1.0:
                await anyio.sleep(0.01)  # the sampler's next pass
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    assert metrics.SHARED_QUEUE_DEPTH.value("high") == 2.0  # not yet taken
    assert metrics.SHARED_QUEUE_DEPTH.value("low") == 0.0
