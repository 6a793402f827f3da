"""Deadlines: one timer for the earliest deadline, a reaper that expires the requests whose
deadline passed, exactly once, finished ones skipped.

Most tests drive ``Deadlines`` on a fake clock (``FakeTimers`` stands in for the loop's time
and ``call_at``); the reaper itself runs on the real loop. One test runs it all for real.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

import anyio
import pytest

from orchestrator._deadlines import Deadlines
from orchestrator._store import MemoryStore, Record
from orchestrator.types import PromptRequest, RequestStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

pytestmark = pytest.mark.anyio


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    """The two things ``Deadlines`` asks of its loop, ``time()`` and ``call_at()``, on a clock
    that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> FakeTimer:
        timer = FakeTimer(when, callback)
        self.timers.append(timer)
        return timer

    @property
    def armed(self) -> list[float]:
        """When the timers still armed ring."""
        return [t.when for t in self.timers if not t.cancelled]

    def advance(self, to: float) -> None:
        """Move the clock to ``to`` and ring the timers due by then, in order."""
        self.now = to
        while due := sorted(
            (t for t in self.timers if not t.cancelled and t.when <= to), key=lambda t: t.when
        ):
            self.ring(due[0])

    def ring(self, timer: FakeTimer) -> None:
        self.timers.remove(timer)
        timer.callback()


class Reaped:
    """The ``expire`` callback: records the ids, finishes them as the runtime does."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.ids: list[str] = []

    async def __call__(self, request_id: str) -> None:
        self.ids.append(request_id)
        await self.store.finish(request_id, RequestStatus.TIMEOUT)


def _store() -> MemoryStore:
    return MemoryStore(retention_seconds=60, retention_max=100, retention_bytes=10**9)


def _record(store: MemoryStore, request_id: str) -> Record:
    return store.create_nowait(PromptRequest("s", request_id, request_id=request_id))


@pytest.fixture
async def reaper() -> AsyncIterator[tuple[Deadlines, FakeTimers, MemoryStore, Reaped]]:
    timers = FakeTimers()
    # Deadlines uses only time() and call_at() of its loop: FakeTimers provides both.
    deadlines = Deadlines(cast("asyncio.AbstractEventLoop", timers))
    store = _store()
    reaped = Reaped(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(deadlines.run, reaped)
        await anyio.wait_all_tasks_blocked()
        yield deadlines, timers, store, reaped
        tg.cancel_scope.cancel()
    assert timers.armed == []  # the reaper disarms its timer when it stops


def _add(deadlines: Deadlines, timers: FakeTimers, record: Record, timeout: float) -> None:
    deadlines.add(record, timers.now + timeout, timeout, live=1)


async def _advance(timers: FakeTimers, to: float) -> None:
    timers.advance(to)
    await anyio.wait_all_tasks_blocked()  # the reaper has expired what was due


async def test_one_timer_armed_for_the_earliest_deadline(
    reaper: tuple[Deadlines, FakeTimers, MemoryStore, Reaped],
) -> None:
    deadlines, timers, store, reaped = reaper
    _add(deadlines, timers, _record(store, "slow"), 5.0)
    assert timers.armed == [5.0]
    _add(deadlines, timers, _record(store, "fast"), 1.0)
    assert timers.armed == [1.0]  # re-armed earlier, the later timer cancelled
    _add(deadlines, timers, _record(store, "slower"), 5.0)
    assert timers.armed == [1.0]  # a later deadline leaves the timer alone
    await _advance(timers, 1.0)
    assert reaped.ids == ["fast"]
    assert timers.armed == [5.0]  # re-armed for the next earliest


async def test_expiry_follows_the_deadlines_across_timeouts(
    reaper: tuple[Deadlines, FakeTimers, MemoryStore, Reaped],
) -> None:
    deadlines, timers, store, reaped = reaper
    _add(deadlines, timers, _record(store, "a"), 3.0)  # due at 3
    timers.now = 1.0
    _add(deadlines, timers, _record(store, "b"), 1.0)  # due at 2
    _add(deadlines, timers, _record(store, "c"), 3.0)  # due at 4
    _add(deadlines, timers, _record(store, "d"), 1.0)  # due at 2
    for at, expected in ((1.9, []), (2.0, ["b", "d"]), (3.0, ["a"]), (4.0, ["c"])):
        reaped.ids.clear()
        await _advance(timers, at)
        assert reaped.ids == expected, at
    assert timers.armed == []
    assert [store.peek(i).status for i in "abcd"] == [RequestStatus.TIMEOUT] * 4  # type: ignore[union-attr]


async def test_finished_records_are_skipped(
    reaper: tuple[Deadlines, FakeTimers, MemoryStore, Reaped],
) -> None:
    deadlines, timers, store, reaped = reaper
    for request_id in ("done", "live", "also-done"):
        _add(deadlines, timers, _record(store, request_id), 1.0)
    await store.finish("done", RequestStatus.COMPLETED, result="")
    await store.finish("also-done", RequestStatus.CANCELLED)
    await _advance(timers, 1.0)
    assert reaped.ids == ["live"]
    assert store.peek("done").status is RequestStatus.COMPLETED  # type: ignore[union-attr]


async def test_a_stuck_head_does_not_hide_the_live_records_behind_it(
    reaper: tuple[Deadlines, FakeTimers, MemoryStore, Reaped],
) -> None:
    # Behind an unfinished head, finished entries pile up until the bucket is compacted;
    # the unfinished ones must survive the compaction, in order.
    deadlines, timers, store, reaped = reaper
    _add(deadlines, timers, _record(store, "head"), 10.0)
    live = []
    for i in range(300):
        timers.now = i / 1000
        record = _record(store, f"r{i}")
        deadlines.add(record, timers.now + 10.0, 10.0, live=2)
        if i % 100 == 50:
            live.append(record.id)  # these stay unfinished
        else:
            await store.finish(record.id, RequestStatus.COMPLETED, result="")
    await _advance(timers, 20.0)
    assert reaped.ids == ["head", *live]


async def test_a_due_request_is_expired_exactly_once(
    reaper: tuple[Deadlines, FakeTimers, MemoryStore, Reaped],
) -> None:
    deadlines, timers, store, reaped = reaper
    _add(deadlines, timers, _record(store, "a"), 1.0)
    await _advance(timers, 1.0)
    _add(deadlines, timers, _record(store, "b"), 1.0)  # due at 2: another ring
    await _advance(timers, 2.0)
    await _advance(timers, 10.0)
    assert reaped.ids == ["a", "b"]


async def test_a_timer_that_rings_a_clock_tick_early_still_expires(
    reaper: tuple[Deadlines, FakeTimers, MemoryStore, Reaped],
) -> None:
    # asyncio runs a timer up to one clock tick before its time.
    deadlines, timers, store, reaped = reaper
    _add(deadlines, timers, _record(store, "a"), 1.0)
    [timer] = [t for t in timers.timers if not t.cancelled]
    timers.now = 1.0 - time.get_clock_info("monotonic").resolution / 2
    timers.ring(timer)
    await anyio.wait_all_tasks_blocked()
    assert reaped.ids == ["a"]


async def test_a_ring_before_the_reaper_waits_is_not_lost() -> None:
    timers = FakeTimers()
    deadlines = Deadlines(cast("asyncio.AbstractEventLoop", timers))  # see the fixture
    store = _store()
    reaped = Reaped(store)
    _add(deadlines, timers, _record(store, "a"), 1.0)
    timers.advance(1.0)  # rings while no reaper runs yet
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(deadlines.run, reaped)
            await anyio.wait_all_tasks_blocked()
            assert reaped.ids == ["a"]
            tg.cancel_scope.cancel()


async def test_the_reaper_expires_on_the_real_loop() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    store = _store()
    expired = asyncio.Event()
    ids: list[str] = []

    async def expire(request_id: str) -> None:
        ids.append(request_id)
        await store.finish(request_id, RequestStatus.TIMEOUT)
        if len(ids) == 2:
            expired.set()

    for request_id, timeout in (("later", 0.02), ("sooner", 0.01), ("never", 30.0)):
        deadlines.add(_record(store, request_id), loop.time() + timeout, timeout, live=3)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(deadlines.run, expire)
            await expired.wait()
            tg.cancel_scope.cancel()
    assert sorted(ids) == ["later", "sooner"]  # (their order is pinned on the fake clock)
    assert store.peek("never").status is RequestStatus.PENDING  # type: ignore[union-attr]
