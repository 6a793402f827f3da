"""Channel: the bounded FIFO between two stages, and how it closes."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from orchestrator._channel import Channel, ChannelClosed
from orchestrator.errors import Overloaded, PipelineClosed, QueueFull

pytestmark = pytest.mark.anyio


async def test_put_nowait_is_bounded_and_get_is_fifo() -> None:
    channel: Channel[int] = Channel(2)
    channel.put_nowait(1)
    channel.put_nowait(2)
    assert channel.full()
    with pytest.raises(QueueFull) as info:
        channel.put_nowait(3)
    assert isinstance(info.value, Overloaded)
    assert channel.qsize() == 2
    assert [await channel.get(), await channel.get()] == [1, 2]
    assert not channel.full()


async def test_put_waits_for_room_and_producers_resume_in_order() -> None:
    channel: Channel[str] = Channel(1)
    channel.put_nowait("a")
    first = asyncio.create_task(channel.put("b"))
    await anyio.wait_all_tasks_blocked()
    second = asyncio.create_task(channel.put("c"))
    await anyio.wait_all_tasks_blocked()
    assert not first.done()
    assert not second.done()
    with anyio.fail_after(5):
        assert await channel.get() == "a"
        await first  # the longest waiting gets the room
        assert not second.done()
        assert await channel.get() == "b"
        await second
        assert await channel.get() == "c"


async def test_a_producer_cancelled_after_its_turn_came_passes_the_room_on() -> None:
    channel: Channel[str] = Channel(1)
    channel.put_nowait("a")
    first = asyncio.create_task(channel.put("b"))
    await anyio.wait_all_tasks_blocked()
    second = asyncio.create_task(channel.put("c"))
    await anyio.wait_all_tasks_blocked()
    assert channel.get_nowait() == "a"  # wakes first...
    first.cancel()  # ...which leaves before it runs
    with anyio.fail_after(5):
        await second
        with pytest.raises(asyncio.CancelledError):
            await first
    assert list(channel.items) == ["c"]


async def test_a_consumer_waiting_is_woken_by_a_put() -> None:
    channel: Channel[int] = Channel(1)
    getter = asyncio.create_task(channel.get())
    await anyio.wait_all_tasks_blocked()
    assert not getter.done()
    channel.put_nowait(7)
    with anyio.fail_after(5):
        assert await getter == 7


async def test_close_fails_a_producer_waiting_for_room_at_once() -> None:
    channel: Channel[int] = Channel(1)
    channel.put_nowait(1)
    producer = asyncio.create_task(channel.put(2))
    await anyio.wait_all_tasks_blocked()
    channel.close()
    await anyio.wait_all_tasks_blocked()
    assert producer.done()  # without anyone taking an item
    with pytest.raises(PipelineClosed):
        producer.result()
    assert list(channel.items) == [1]


async def test_put_after_close_raises_even_with_room() -> None:
    channel: Channel[int] = Channel(5)
    channel.close()
    assert channel.closed
    with pytest.raises(PipelineClosed):
        channel.put_nowait(1)
    with anyio.fail_after(5), pytest.raises(PipelineClosed):
        await channel.put(1)
    with anyio.fail_after(5), pytest.raises(PipelineClosed):
        await channel.wait_for_room()
    assert channel.qsize() == 0


async def test_the_consumer_drains_a_closed_channel_then_sees_its_end() -> None:
    channel: Channel[int] = Channel(3)
    channel.put_nowait(1)
    channel.put_nowait(2)
    channel.close()
    channel.close()  # idempotent
    with anyio.fail_after(5):
        assert await channel.wait() is True
        assert await channel.get() == 1
        assert await channel.get() == 2
        assert await channel.wait() is False
        with pytest.raises(ChannelClosed):
            await channel.get()


async def test_close_wakes_a_consumer_waiting_on_an_empty_channel() -> None:
    channel: Channel[int] = Channel(1)
    waiting = asyncio.create_task(channel.wait())
    getting = asyncio.create_task(channel.get())
    await anyio.wait_all_tasks_blocked()
    channel.close()
    with anyio.fail_after(5):
        assert await waiting is False
        with pytest.raises(ChannelClosed):
            await getting


async def test_wait_for_room_returns_at_once_with_room_and_waits_when_full() -> None:
    channel: Channel[int] = Channel(1)
    with anyio.fail_after(5):
        await channel.wait_for_room()
    channel.put_nowait(1)
    waiting = asyncio.create_task(channel.wait_for_room())
    await anyio.wait_all_tasks_blocked()
    assert not waiting.done()
    assert channel.qsize() == 1  # waiting for room takes none
    channel.get_nowait()
    with anyio.fail_after(5):
        await waiting
    assert channel.qsize() == 0


async def test_wait_for_room_raises_when_the_channel_closes_meanwhile() -> None:
    channel: Channel[int] = Channel(1)
    channel.put_nowait(1)
    waiting = asyncio.create_task(channel.wait_for_room())
    await anyio.wait_all_tasks_blocked()
    channel.close()
    with anyio.fail_after(5), pytest.raises(PipelineClosed):
        await waiting
