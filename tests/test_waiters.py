"""Waiters: the one waiting primitive. Woken in order, one or all, and no wake-up lost to a
waiter that leaves."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from orchestrator._waiters import Waiters

pytestmark = pytest.mark.anyio


async def _waiting(waiters: Waiters, n: int) -> list[asyncio.Task[None]]:
    """``n`` tasks waiting on ``waiters``, in arrival order."""
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(waiters.wait()))
        await anyio.wait_all_tasks_blocked()  # each is waiting before the next arrives
    return tasks


async def test_wake_one_wakes_the_longest_waiting_first() -> None:
    waiters = Waiters()
    woken: list[str] = []

    async def wait(name: str) -> None:
        await waiters.wait()
        woken.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for name in "abc":
                tg.start_soon(wait, name)
                await anyio.wait_all_tasks_blocked()
            for expected in ("a", "ab", "abc"):
                waiters.wake_one()
                await anyio.wait_all_tasks_blocked()
                assert "".join(woken) == expected
    assert not waiters


async def test_wake_all_wakes_every_waiter() -> None:
    waiters = Waiters()
    tasks = await _waiting(waiters, 3)
    waiters.wake_all()
    with anyio.fail_after(5):
        await asyncio.gather(*tasks)
    assert not waiters


async def test_a_wake_up_with_nobody_waiting_is_not_kept_for_later() -> None:
    # Not a semaphore: a waiter rechecks its condition, so a wake-up before it came is moot.
    waiters = Waiters()
    waiters.wake_one()
    waiters.wake_all()
    [task] = await _waiting(waiters, 1)
    assert not task.done()
    waiters.wake_one()
    with anyio.fail_after(5):
        await task


async def test_a_waiter_cancelled_after_being_woken_passes_its_turn_on() -> None:
    waiters = Waiters()
    first, second = await _waiting(waiters, 2)
    waiters.wake_one()  # first's turn...
    first.cancel()  # ...but it is cancelled before it runs again
    with anyio.fail_after(5):
        await second  # the turn went on: no wake-up lost
        with pytest.raises(asyncio.CancelledError):
            await first


async def test_a_waiter_cancelled_while_waiting_is_skipped() -> None:
    waiters = Waiters()
    first, second, third = await _waiting(waiters, 3)
    first.cancel()
    await anyio.wait_all_tasks_blocked()
    assert first.cancelled()
    waiters.wake_one()  # goes to second, not to the one that left
    await anyio.wait_all_tasks_blocked()
    assert second.done()
    assert not third.done()
    waiters.wake_one()
    with anyio.fail_after(5):
        await third
    assert not waiters


async def test_a_waiter_cancelled_after_wake_all_wakes_nobody_extra() -> None:
    waiters = Waiters()
    first, second = await _waiting(waiters, 2)
    waiters.wake_all()
    first.cancel()
    with anyio.fail_after(5):
        await second
    [late] = await _waiting(waiters, 1)
    assert not late.done()  # the woken-then-cancelled first woke the next, who had gone
    waiters.wake_one()
    with anyio.fail_after(5):
        await late
