"""MemoryWorkQueue: the work queue in front of Inference, in one process."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from orchestrator._job import Job
from orchestrator._store import MemoryStore
from orchestrator._work_queue import MemoryWorkQueue
from orchestrator.enhanced.priority import Priority
from orchestrator.errors import PipelineClosed
from orchestrator.types import PromptRequest

pytestmark = pytest.mark.anyio

_STORE = MemoryStore(retention_seconds=60, retention_max=10, retention_bytes=10**6)


def _job(name: str, priority: Priority = Priority.NORMAL) -> Job:
    request = PromptRequest("s", name)
    return Job(_STORE.create_nowait(request), request, priority, 0.0)


async def _taken(queue: MemoryWorkQueue, n: int) -> list[str]:
    taken = []
    for _ in range(n):
        job = await queue.take()
        assert job is not None
        taken.append(job.request.input)
    return taken


async def test_take_serves_higher_priority_first_fifo_within_a_level() -> None:
    queue = MemoryWorkQueue(10)
    for name, level in [
        ("low", Priority.LOW),
        ("n1", Priority.NORMAL),
        ("crit", Priority.CRITICAL),
        ("n2", Priority.NORMAL),
        ("high", Priority.HIGH),
    ]:
        assert await queue.put(_job(name, level)) is None
    assert queue.qsize() == 5
    with anyio.fail_after(5):
        assert await _taken(queue, 5) == ["crit", "high", "n1", "n2", "low"]


async def test_at_capacity_a_higher_priority_job_displaces_the_newest_lowest() -> None:
    queue = MemoryWorkQueue(2)
    old, new = _job("old", Priority.LOW), _job("new", Priority.LOW)
    await queue.put(old)
    await queue.put(new)
    with anyio.fail_after(5):
        displaced = await queue.put(_job("urgent", Priority.HIGH))
    assert displaced is new  # handed back: the caller fails it
    assert await _taken(queue, 2) == ["urgent", "old"]


async def test_at_capacity_with_nothing_lower_put_waits_for_room() -> None:
    queue = MemoryWorkQueue(1)
    await queue.put(_job("first", Priority.HIGH))
    waiting = asyncio.create_task(queue.put(_job("second", Priority.NORMAL)))
    await anyio.wait_all_tasks_blocked()
    assert not waiting.done()
    with anyio.fail_after(5):
        assert await _taken(queue, 1) == ["first"]
        assert await waiting is None
        assert await _taken(queue, 1) == ["second"]


async def test_close_refuses_new_jobs_and_takers_get_the_rest_then_none() -> None:
    queue = MemoryWorkQueue(1)
    await queue.put(_job("left"))
    blocked = asyncio.create_task(queue.put(_job("blocked")))
    await anyio.wait_all_tasks_blocked()
    queue.close()
    with anyio.fail_after(5):
        with pytest.raises(PipelineClosed):
            await blocked
        with pytest.raises(PipelineClosed):
            await queue.put(_job("late"))
        assert await _taken(queue, 1) == ["left"]
        assert await queue.take() is None


async def test_a_taker_waiting_on_an_empty_queue_is_woken_by_put_and_by_close() -> None:
    queue = MemoryWorkQueue(1)
    taker = asyncio.create_task(queue.take())
    await anyio.wait_all_tasks_blocked()
    job = _job("x")
    await queue.put(job)
    with anyio.fail_after(5):
        assert await taker is job
        ending = asyncio.create_task(queue.take())
        await anyio.wait_all_tasks_blocked()
        queue.close()
        assert await ending is None


async def test_leases_need_no_acknowledgement_and_a_release_requeues() -> None:
    queue = MemoryWorkQueue(2)
    assert queue.acknowledges is False
    job = _job("x")
    await queue.put(job)
    with anyio.fail_after(5):
        taken = await queue.take()
        assert taken is job
        await queue.ack(job)  # a no-op here
        assert queue.qsize() == 0
        await queue.release(job)
        assert await queue.take() is job
