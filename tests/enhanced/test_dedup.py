from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import metrics
from orchestrator.enhanced.dedup import Deduplicator
from orchestrator.errors import InferenceError, PipelineClosed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class GatedCall:
    """A call that waits for its gate; records starts and whether it saw cancellation."""

    def __init__(self, result: object = "done") -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.started = 0
        self.cancelled = 0
        self.result = result
        self.error: Exception | None = None

    async def __call__(self) -> object:
        self.started += 1
        self.entered.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return self.result


class GatedStream:
    """An async iterator factory whose items are released one gate at a time."""

    def __init__(self, items: list[str]) -> None:
        self.items = items
        self.released = 0
        self.changed = asyncio.Event()
        self.started = 0
        self.cancelled = 0
        self.finished = 0
        self.error: Exception | None = None

    def release(self, n: int = 1) -> None:
        self.released += n
        self.changed.set()

    async def __call__(self) -> AsyncIterator[str]:
        self.started += 1
        try:
            for i, item in enumerate(self.items):
                while self.released <= i:
                    self.changed.clear()
                    await self.changed.wait()
                yield item
            if self.error is not None:
                raise self.error
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.finished += 1


def joins() -> float:
    return metrics.REGISTRY.get_sample_value("orchestrator_dedup_joins_total") or 0.0


async def collect(it: AsyncIterator[str]) -> list[str]:
    return [item async for item in it]


# -- run ---------------------------------------------------------------------------------


async def test_identical_keys_in_flight_share_one_call_and_its_result() -> None:
    dedup = Deduplicator()
    call = GatedCall(result=object())
    before = joins()
    tasks = [asyncio.create_task(dedup.run("k", call)) for _ in range(4)]
    await anyio.wait_all_tasks_blocked()
    assert call.started == 1
    assert dedup.in_flight == 1
    assert dedup.waiters("k") == 4
    assert joins() - before == 3
    call.gate.set()
    with anyio.fail_after(5):
        results = await asyncio.gather(*tasks)
    assert all(r is call.result for r in results)
    assert dedup.in_flight == 0
    assert dedup.waiters("k") == 0


async def test_different_keys_do_not_share() -> None:
    dedup = Deduplicator()
    a, b = GatedCall("a"), GatedCall("b")
    ta = asyncio.create_task(dedup.run("a", a))
    tb = asyncio.create_task(dedup.run("b", b))
    await anyio.wait_all_tasks_blocked()
    assert dedup.in_flight == 2
    a.gate.set()
    b.gate.set()
    with anyio.fail_after(5):
        assert [await ta, await tb] == ["a", "b"]


async def test_every_waiter_gets_the_same_exception() -> None:
    dedup = Deduplicator()
    call = GatedCall()
    call.error = InferenceError("backend down", worker="w", status_code=503)
    tasks = [asyncio.create_task(dedup.run("k", call)) for _ in range(3)]
    await anyio.wait_all_tasks_blocked()
    call.gate.set()
    with anyio.fail_after(5):
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(o is call.error for o in outcomes)
    assert call.started == 1


async def test_joiner_keeps_result_when_first_caller_cancels() -> None:
    dedup = Deduplicator()
    call = GatedCall()
    leader = asyncio.create_task(dedup.run("k", call))
    await anyio.wait_all_tasks_blocked()
    joiner = asyncio.create_task(dedup.run("k", call))
    await anyio.wait_all_tasks_blocked()
    leader.cancel()
    await anyio.wait_all_tasks_blocked()
    assert leader.cancelled()
    assert dedup.waiters("k") == 1
    # The leader ran the call in its own task: its cancellation ends that attempt, and
    # the call is started again, in a task of the deduplicator's, for the joiner.
    assert (call.cancelled, call.started) == (1, 2)
    call.gate.set()
    with anyio.fail_after(5):
        assert await joiner == "done"


async def test_last_waiter_leaving_cancels_the_shared_call() -> None:
    dedup = Deduplicator()
    call = GatedCall()
    tasks = [asyncio.create_task(dedup.run("k", call)) for _ in range(2)]
    await anyio.wait_all_tasks_blocked()
    tasks[1].cancel()  # a joiner leaves: the leader still wants the call
    await anyio.wait_all_tasks_blocked()
    assert call.cancelled == 0
    tasks[0].cancel()  # the last one: nobody wants it
    await anyio.wait_all_tasks_blocked()
    assert (call.cancelled, call.started) == (1, 1)
    assert all(t.cancelled() for t in tasks)
    assert dedup.in_flight == 0


async def test_caller_after_an_abandoned_call_starts_a_new_one() -> None:
    dedup = Deduplicator()
    first, second = GatedCall("old"), GatedCall("new")
    task = asyncio.create_task(dedup.run("k", first))
    await anyio.wait_all_tasks_blocked()
    task.cancel()
    fresh = asyncio.create_task(dedup.run("k", second))  # before the old call unwound
    await anyio.wait_all_tasks_blocked()
    second.gate.set()
    with anyio.fail_after(5):
        assert await fresh == "new"
    assert first.cancelled == 1


async def test_call_raising_before_it_awaits_fails_the_caller_and_leaves_nothing() -> None:
    dedup = Deduplicator()

    def broken() -> asyncio.Future[str]:
        raise RuntimeError("no coroutine")

    with pytest.raises(RuntimeError, match="no coroutine"):
        await dedup.run("k", broken)
    assert dedup.in_flight == 0


async def test_result_is_kept_for_result_ttl() -> None:
    clock = FakeClock()
    dedup = Deduplicator(result_ttl=10.0, clock=clock)
    call = GatedCall("first")
    call.gate.set()
    assert await dedup.run("k", call) == "first"
    await anyio.wait_all_tasks_blocked()  # the done callback stores it
    clock.now = 9.9
    assert await dedup.run("k", call) == "first"
    assert call.started == 1
    clock.now = 10.0
    call.result = "second"
    assert await dedup.run("k", call) == "second"
    assert call.started == 2


async def test_errors_are_never_kept() -> None:
    dedup = Deduplicator(result_ttl=10.0, clock=FakeClock())
    call = GatedCall()
    call.gate.set()
    call.error = InferenceError("boom")
    with pytest.raises(InferenceError):
        await dedup.run("k", call)
    await anyio.wait_all_tasks_blocked()
    assert dedup.stored == 0
    call.error = None
    assert await dedup.run("k", call) == "done"
    assert call.started == 2


async def test_nothing_is_kept_by_default() -> None:
    dedup = Deduplicator()
    call = GatedCall()
    call.gate.set()
    await dedup.run("k", call)
    await anyio.wait_all_tasks_blocked()
    await dedup.run("k", call)
    assert call.started == 2
    assert dedup.stored == 0


async def test_expired_results_are_pruned() -> None:
    clock = FakeClock()
    dedup = Deduplicator(result_ttl=1.0, clock=clock)
    call = GatedCall()
    call.gate.set()
    for i in range(100):
        await dedup.run(i, call)
    await anyio.wait_all_tasks_blocked()
    assert dedup.stored == 100
    clock.now = 0.5
    await dedup.run("late", call)
    await anyio.wait_all_tasks_blocked()
    assert dedup.stored == 101  # none expired yet
    clock.now = 1.2
    await dedup.run("later", call)
    await anyio.wait_all_tasks_blocked()
    assert dedup.stored == 2  # the first hundred expired at 1.0


async def test_a_call_abandoned_by_its_waiters_is_not_kept() -> None:
    dedup = Deduplicator(result_ttl=10.0, clock=FakeClock())

    async def stubborn() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return "ignored cancellation"

    task = asyncio.create_task(dedup.run("k", stubborn))
    await anyio.wait_all_tasks_blocked()
    task.cancel()
    await anyio.wait_all_tasks_blocked()
    assert dedup.stored == 0


async def test_aclose_cancels_the_call_and_waiters_get_pipeline_closed() -> None:
    dedup = Deduplicator(result_ttl=10.0, clock=FakeClock())
    call = GatedCall()
    tasks = [asyncio.create_task(dedup.run("k", call)) for _ in range(2)]
    await anyio.wait_all_tasks_blocked()
    with anyio.fail_after(5):
        await dedup.aclose()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert call.cancelled == 1
    assert all(isinstance(o, PipelineClosed) for o in outcomes)
    with pytest.raises(PipelineClosed):
        await dedup.run("k", call)
    await dedup.aclose()  # idempotent


async def test_aclose_before_the_call_starts_answers_its_waiters() -> None:
    dedup = Deduplicator()
    call = GatedCall()
    task = asyncio.create_task(dedup.run("k", call))
    await asyncio.sleep(0)  # the caller ran: it runs the call itself, now at its gate
    assert dedup.in_flight == 1
    with anyio.fail_after(5):
        await dedup.aclose()
        with pytest.raises(PipelineClosed):
            await task
    assert (call.started, call.cancelled) == (1, 1)


def test_negative_result_ttl_is_refused() -> None:
    with pytest.raises(ValueError, match="result_ttl"):
        Deduplicator(result_ttl=-1.0)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=8))
async def test_call_survives_unless_every_waiter_leaves(leaves: list[bool]) -> None:
    dedup = Deduplicator()
    call = GatedCall()
    tasks = [asyncio.create_task(dedup.run("k", call)) for _ in leaves]
    with anyio.fail_after(5):
        await call.entered.wait()  # the call task runs after every caller has joined
        left = [task for task, leave in zip(tasks, leaves, strict=True) if leave]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
        call.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await dedup.aclose()  # returns once the shared call has unwound
    # The leader (the first caller) runs the call itself: when it leaves, that attempt
    # is cancelled, and the call starts again for whoever still waits. The call survives
    # (one attempt completes) unless every waiter leaves.
    assert call.started - call.cancelled == (0 if all(leaves) else 1)
    if not leaves[0]:
        assert call.cancelled == 0  # the leader stayed: one attempt, never cancelled
    for outcome, leave in zip(outcomes, leaves, strict=True):
        assert isinstance(outcome, asyncio.CancelledError) if leave else outcome == "done"


# -- stream ------------------------------------------------------------------------------


async def test_late_joiner_gets_the_items_so_far_then_live_ones() -> None:
    dedup = Deduplicator()
    source = GatedStream(["a", "b", "c", "d"])
    before = joins()
    first = asyncio.create_task(collect(dedup.stream("k", source)))
    source.release(2)
    await anyio.wait_all_tasks_blocked()
    late = asyncio.create_task(collect(dedup.stream("k", source)))
    await anyio.wait_all_tasks_blocked()
    assert dedup.waiters("k") == 2
    source.release(2)
    with anyio.fail_after(5):
        assert await first == ["a", "b", "c", "d"]
        assert await late == ["a", "b", "c", "d"]
    assert source.started == 1
    assert joins() - before == 1
    assert dedup.in_flight == 0


async def test_every_subscriber_gets_the_items_then_the_same_exception() -> None:
    dedup = Deduplicator()
    source = GatedStream(["a"])
    source.error = InferenceError("stream broke")
    received: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    async def consume(out: list[str]) -> None:
        try:
            async for item in dedup.stream("k", source):
                out.append(item)
        except InferenceError as exc:
            errors.append(exc)

    tasks = [asyncio.create_task(consume(out)) for out in received]
    await anyio.wait_all_tasks_blocked()
    source.release()
    with anyio.fail_after(5):
        await asyncio.gather(*tasks)
    assert received == [["a"], ["a"]]
    assert len(errors) == 2
    assert errors[0] is errors[1] is source.error


async def test_a_subscriber_leaving_early_leaves_the_others_their_stream() -> None:
    dedup = Deduplicator()
    source = GatedStream(["a", "b"])
    quitter = dedup.stream("k", source)
    stayer = asyncio.create_task(collect(dedup.stream("k", source)))
    source.release()
    with anyio.fail_after(5):
        assert await anext(quitter) == "a"
        await quitter.aclose()
    await anyio.wait_all_tasks_blocked()
    assert source.cancelled == 0
    source.release()
    with anyio.fail_after(5):
        assert await stayer == ["a", "b"]


async def test_last_subscriber_leaving_cancels_the_underlying_iteration() -> None:
    dedup = Deduplicator()
    source = GatedStream(["a", "b"])
    consumer = asyncio.create_task(collect(dedup.stream("k", source)))
    await anyio.wait_all_tasks_blocked()
    consumer.cancel()
    await anyio.wait_all_tasks_blocked()
    assert consumer.cancelled()
    assert source.cancelled == 1
    assert source.finished == 1
    assert dedup.in_flight == 0


async def test_finished_stream_is_replayed_within_result_ttl() -> None:
    clock = FakeClock()
    dedup = Deduplicator(result_ttl=5.0, clock=clock)
    source = GatedStream(["a", "b"])
    source.release(2)
    assert await collect(dedup.stream("k", source)) == ["a", "b"]
    await anyio.wait_all_tasks_blocked()
    clock.now = 4.0
    assert await collect(dedup.stream("k", source)) == ["a", "b"]
    assert source.started == 1
    clock.now = 5.0
    assert await collect(dedup.stream("k", source)) == ["a", "b"]
    assert source.started == 2


async def test_aclose_ends_subscribers_with_pipeline_closed() -> None:
    dedup = Deduplicator()
    source = GatedStream(["a", "b"])
    received: list[str] = []

    async def consume() -> None:
        async for item in dedup.stream("k", source):
            received.append(item)

    task = asyncio.create_task(consume())
    source.release()
    await anyio.wait_all_tasks_blocked()
    with anyio.fail_after(5):
        await dedup.aclose()
        with pytest.raises(PipelineClosed):
            await task
    assert received == ["a"]
    assert source.cancelled == 1
    with pytest.raises(PipelineClosed):
        await collect(dedup.stream("k", source))
