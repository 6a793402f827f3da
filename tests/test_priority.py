from __future__ import annotations

import asyncio

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.enhanced import Priority, PriorityQueue, QueueStats
from orchestrator.errors import Overloaded, QueueFull

pytestmark = pytest.mark.anyio


async def test_levels_in_order_and_fifo_within_a_level() -> None:
    q: PriorityQueue[str] = PriorityQueue()
    await q.push(Priority.LOW, "low-1")
    await q.push(Priority.NORMAL, "normal-1")
    await q.push(Priority.CRITICAL, "critical-1")
    await q.push(Priority.HIGH, "high-1")
    await q.push(Priority.HIGH, "high-2")
    await q.push(Priority.LOW, "low-2")
    popped = [await q.pop() for _ in range(6)]
    assert [entry[1] for entry in popped if entry is not None] == [
        "critical-1",
        "high-1",
        "high-2",
        "normal-1",
        "low-1",
        "low-2",
    ]
    assert await q.pop() is None


async def test_items_are_never_compared() -> None:
    class Opaque:  # no ordering: a heap of (priority, item) would raise TypeError
        pass

    q: PriorityQueue[Opaque] = PriorityQueue()
    a, b = Opaque(), Opaque()
    await q.push(Priority.NORMAL, a)
    await q.push(Priority.NORMAL, b)
    assert await q.pop() == (Priority.NORMAL, a)


async def test_stats_by_level() -> None:
    q: PriorityQueue[int] = PriorityQueue()
    for i, level in enumerate([Priority.HIGH, Priority.HIGH, Priority.LOW]):
        await q.push(level, i)
    stats = await q.stats()
    assert stats == QueueStats(
        total=3,
        by_priority={Priority.CRITICAL: 0, Priority.HIGH: 2, Priority.NORMAL: 0, Priority.LOW: 1},
    )


async def test_capacity_refuses_the_lowest_level_present() -> None:
    q: PriorityQueue[str] = PriorityQueue(capacity=2)
    await q.push(Priority.NORMAL, "a")
    await q.push(Priority.NORMAL, "b")
    with pytest.raises(QueueFull):
        await q.push(Priority.NORMAL, "c")
    with pytest.raises(Overloaded):
        await q.push(Priority.LOW, "d")
    assert len(q) == 2


async def test_higher_priority_displaces_the_newest_of_the_lowest_level() -> None:
    q: PriorityQueue[str] = PriorityQueue(capacity=3)
    await q.push(Priority.LOW, "low-old")
    await q.push(Priority.NORMAL, "normal")
    await q.push(Priority.LOW, "low-new")
    assert await q.push(Priority.HIGH, "high") == (Priority.LOW, "low-new")
    assert await q.push(Priority.HIGH, "high-2") == (Priority.LOW, "low-old")
    assert await q.push(Priority.CRITICAL, "crit") == (Priority.NORMAL, "normal")
    with pytest.raises(QueueFull):
        await q.push(Priority.HIGH, "high-3")  # only HIGH and above present
    assert [(await q.pop()) for _ in range(3)] == [
        (Priority.CRITICAL, "crit"),
        (Priority.HIGH, "high"),
        (Priority.HIGH, "high-2"),
    ]


async def test_get_waits_for_an_item() -> None:
    q: PriorityQueue[str] = PriorityQueue()
    got = asyncio.create_task(q.get())
    await anyio.wait_all_tasks_blocked()
    assert not got.done()
    await q.push(Priority.LOW, "x")
    assert await got == (Priority.LOW, "x")


async def test_a_cancelled_getter_does_not_swallow_an_item() -> None:
    q: PriorityQueue[str] = PriorityQueue()
    first = asyncio.create_task(q.get())
    second = asyncio.create_task(q.get())
    await anyio.wait_all_tasks_blocked()
    first.cancel()
    await q.push(Priority.NORMAL, "x")
    assert await second == (Priority.NORMAL, "x")


async def test_put_waits_for_room() -> None:
    q: PriorityQueue[str] = PriorityQueue(capacity=1)
    await q.put(Priority.NORMAL, "a")
    blocked = asyncio.create_task(q.put(Priority.LOW, "b"))
    await anyio.wait_all_tasks_blocked()
    assert not blocked.done()
    assert await q.pop() == (Priority.NORMAL, "a")
    await blocked
    assert await q.pop() == (Priority.LOW, "b")


async def test_aging_lets_old_low_work_climb() -> None:
    now = 0.0
    q: PriorityQueue[str] = PriorityQueue(aging=10.0, clock=lambda: now)
    await q.push(Priority.LOW, "old-low")
    now = 25.0  # waited 2.5 agings: competes as HIGH
    await q.push(Priority.HIGH, "new-high")
    await q.push(Priority.CRITICAL, "crit")
    assert [(await q.pop()) for _ in range(3)] == [
        (Priority.CRITICAL, "crit"),
        (Priority.LOW, "old-low"),  # as HIGH, and older than new-high
        (Priority.HIGH, "new-high"),
    ]


async def test_without_aging_low_waits_behind_high() -> None:
    now = 0.0
    q: PriorityQueue[str] = PriorityQueue(clock=lambda: now)
    await q.push(Priority.LOW, "old-low")
    now = 1e9
    await q.push(Priority.HIGH, "high")
    assert await q.pop() == (Priority.HIGH, "high")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PriorityQueue(capacity=0)
    with pytest.raises(ValueError, match="aging"):
        PriorityQueue(aging=0)


def test_parse() -> None:
    assert Priority.parse("HIGH") is Priority.HIGH
    assert Priority.parse(None) is Priority.NORMAL
    assert Priority.parse(Priority.LOW) is Priority.LOW
    assert str(Priority.CRITICAL) == "critical"
    with pytest.raises(ValueError, match="unknown priority"):
        Priority.parse("urgent")


@given(st.lists(st.sampled_from(list(Priority)), max_size=200))
def test_pop_order_is_priority_then_arrival(levels: list[Priority]) -> None:
    q: PriorityQueue[int] = PriorityQueue()
    for i, level in enumerate(levels):
        q.push_nowait(level, i)
    popped = []
    while (entry := q.pop_nowait()) is not None:
        popped.append(entry)
    expected = sorted(enumerate(levels), key=lambda e: (-e[1], e[0]))
    assert popped == [(level, i) for i, level in expected]
    assert len(q) == 0


def test_the_queue_lives_in_the_core_and_keeps_its_public_homes() -> None:
    import orchestrator._priority as core
    import orchestrator.enhanced
    import orchestrator.enhanced.priority as shim

    for name in ("Priority", "PriorityQueue", "QueueStats"):
        assert getattr(shim, name) is getattr(core, name)
        assert getattr(orchestrator.enhanced, name) is getattr(core, name)
        assert getattr(core, name).__module__ == "orchestrator._priority"
    assert shim.__all__ == core.__all__ == ["Priority", "PriorityQueue", "QueueStats"]
