"""Bad configuration is refused when it is made, with the reason."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from orchestrator import PipelineConfig
from orchestrator._channel import Channel
from orchestrator.errors import QueueFull

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rag_capacity": 0}, "rag_capacity"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"priority_aging": 0}, "priority_aging"),
        ({"cache_ttl": -1}, "cache_ttl"),
        ({"template": "{prompt}"}, "only {context} and {input}"),
        ({"template": 42}, "str or a callable"),
    ],
)
def test_bad_values_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        PipelineConfig(**kwargs)  # type: ignore[arg-type]


def test_defaults_are_the_seeds() -> None:
    config = PipelineConfig()
    sizes = (
        config.rag_capacity,
        config.assemble_capacity,
        config.inference_capacity,
        config.post_capacity,
        config.stream_capacity,
    )
    assert sizes == (512, 512, 1024, 512, 256)
    assert (config.max_concurrency, config.request_timeout) == (64, 300.0)
    assert config.post_processors == ()


async def test_channel_producers_wait_for_room_in_order() -> None:
    channel: Channel[int] = Channel(1)
    channel.put_nowait(0)
    with pytest.raises(QueueFull):
        channel.put_nowait(1)
    first = asyncio.create_task(channel.put(1))
    second = asyncio.create_task(channel.put(2))
    await anyio.wait_all_tasks_blocked()
    assert not first.done()
    assert [await channel.get() for _ in range(3)] == [0, 1, 2]
    await asyncio.gather(first, second)


async def test_a_cancelled_producer_passes_its_turn_on() -> None:
    channel: Channel[int] = Channel(1)
    channel.put_nowait(0)
    cancelled = asyncio.create_task(channel.put(1))
    waiting = asyncio.create_task(channel.put(2))
    await anyio.wait_all_tasks_blocked()
    cancelled.cancel()
    assert await channel.get() == 0
    await waiting
    assert channel.get_nowait() == 2
    assert cancelled.cancelled()
