"""CommandBatcher: the commands of concurrent callers in one pipeline, over a real Redis."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from orchestrator import EchoWorker, PipelineConfig, PromptRequest, RequestStatus, spawn_pipeline
from orchestrator.enhanced import CacheLayer, RateLimiter, connect_redis
from orchestrator.enhanced._redis_batch import CommandBatcher, batcher_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
        await client.delete("batch:text", "batch:k", "batch:behind")
    finally:
        await client.aclose()


async def test_the_calls_of_one_loop_turn_share_one_round_trip(client: Redis) -> None:
    batcher = CommandBatcher(client)
    replies = await asyncio.gather(*(batcher.execute("ECHO", f"m{i}") for i in range(50)))
    assert replies == [f"m{i}".encode() for i in range(50)]
    assert (batcher.round_trips, batcher.commands) == (1, 50)
    # What queues while a batch is in flight goes in the next one, not one trip each.
    first = asyncio.create_task(batcher.execute("ECHO", "lead"))
    await anyio.wait_all_tasks_blocked()  # its batch is on the wire
    later = [asyncio.create_task(batcher.execute("ECHO", f"n{i}")) for i in range(20)]
    assert await first == b"lead"
    assert await asyncio.gather(*later) == [f"n{i}".encode() for i in range(20)]
    assert batcher.round_trips == 3


async def test_a_command_that_fails_fails_only_its_caller(client: Redis) -> None:
    batcher = CommandBatcher(client)
    await client.set("batch:text", "not a number")
    results: list[object] = await asyncio.gather(
        batcher.execute("ECHO", "fine"),
        batcher.execute("INCR", "batch:text"),
        return_exceptions=True,
    )
    assert results[0] == b"fine"
    assert isinstance(results[1], ResponseError)
    assert batcher.round_trips == 1


async def test_a_leader_cancelled_in_flight_hands_its_batch_on(client: Redis) -> None:
    batcher = CommandBatcher(client)
    leader = asyncio.create_task(batcher.execute("BLPOP", "batch:never", "5"))  # blocks Redis
    follower = asyncio.create_task(batcher.execute("SET", "batch:k", "v"))
    await anyio.wait_all_tasks_blocked()  # one batch in flight, both commands in it
    assert batcher.round_trips == 1
    leader.cancel()
    with anyio.fail_after(3):  # not the 5 s of the BLPOP: sent again at once
        assert await follower is True
    assert leader.cancelled()
    assert await client.get("batch:k") == b"v"
    assert batcher.round_trips == 2
    assert await batcher.execute("ECHO", "after") == b"after"  # the lead went on


async def test_a_follower_cancelled_while_waiting_leaves_the_rest_alone(client: Redis) -> None:
    batcher = CommandBatcher(client)
    leader = asyncio.create_task(batcher.execute("BLPOP", "batch:never", "0.1"))  # in flight
    await anyio.wait_all_tasks_blocked()
    gone = asyncio.create_task(batcher.execute("ECHO", "gone"))
    stays = asyncio.create_task(batcher.execute("ECHO", "stays"))
    await anyio.wait_all_tasks_blocked()
    gone.cancel()
    assert await leader is None  # the BLPOP timed out
    assert await stays == b"stays"
    assert gone.cancelled()


async def test_a_detached_command_rides_the_batch_in_flight_in_order(client: Redis) -> None:
    batcher = CommandBatcher(client)
    assert batcher.send_detached("SET", "batch:behind", "x") is None  # nothing in flight
    leader = asyncio.create_task(batcher.execute("BLPOP", "batch:never", "0.1"))  # in flight
    await anyio.wait_all_tasks_blocked()
    reply = batcher.send_detached("SET", "batch:behind", "y")
    assert reply is not None
    assert await leader is None
    assert await reply is True  # with nobody else waiting, the leader sent it after its own
    assert batcher.round_trips == 2
    assert await batcher.execute("GET", "batch:behind") == b"y"


async def test_clients_have_one_batcher_each(client: Redis, redis_url: str) -> None:
    other = Redis.from_url(redis_url)
    try:
        assert batcher_for(client) is batcher_for(client)
        assert batcher_for(client) is not batcher_for(other)
    finally:
        await other.aclose()


async def test_a_queued_command_rides_the_next_call_or_leads_when_awaited(client: Redis) -> None:
    batcher = CommandBatcher(client)
    queued = batcher.enqueue("ECHO", "early")  # nothing sent yet
    assert batcher.round_trips == 0
    assert await batcher.execute("ECHO", "next") == b"next"  # carries the queued one
    assert (batcher.round_trips, batcher.commands) == (1, 2)
    assert await queued.reply() == b"early"  # already answered: no round trip
    alone = batcher.enqueue("ECHO", "alone")
    assert await alone.reply() == b"alone"  # nobody led: awaiting it sends it
    assert batcher.round_trips == 2
    await client.set("batch:text", "not a number")
    unread = batcher.enqueue("INCR", "batch:text")  # fails, and nobody ever reads it
    assert await batcher.execute("ECHO", "after") == b"after"
    assert unread is not None  # its error was taken by the batcher: no "never retrieved"


async def test_a_requests_rate_limit_check_and_cache_lookup_share_one_round_trip(
    redis_url: str,
) -> None:
    client = await connect_redis(redis_url)
    try:
        async with (
            await CacheLayer.new_redis(client=client, prefix="batch-admit:") as cache,
            await RateLimiter.new_redis(None, 1000, 60, client=client, prefix="batch-rl:") as rl,
        ):
            config = PipelineConfig(cache=cache, rate_limiter=rl, template="{input}")
            async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
                assert await handles.infer("first", "s") == "first"  # loads the script
                batcher = batcher_for(client)
                trips, commands = batcher.round_trips, batcher.commands
                ticket = await handles.submit(PromptRequest("s", "second"))
                assert (batcher.round_trips - trips, batcher.commands - commands) == (1, 2)
                assert await ticket.result() == "second"
                again = await handles.submit(PromptRequest("s", "second"))
                assert again.status is RequestStatus.COMPLETED  # stored, then found
        keys = [key async for key in client.scan_iter(match="batch-*")]
        if keys:  # leave nothing behind on a shared server
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_a_caller_handed_the_lead_keeps_its_place_behind_a_detached_store(
    client: Redis,
) -> None:
    batcher = CommandBatcher(client)
    leader = asyncio.create_task(batcher.execute("BLPOP", "batch:never", "0.1"))  # in flight
    await anyio.wait_all_tasks_blocked()
    assert batcher.send_detached("SET", "batch:k", "stored") is not None
    deleted = asyncio.create_task(batcher.execute("DEL", "batch:k"))  # queued after the SET
    await anyio.wait_all_tasks_blocked()
    assert await leader is None
    assert await deleted == 1  # the SET ran first, then the DEL found the key
    assert await client.get("batch:k") is None


async def test_a_discarded_command_is_never_sent(client: Redis) -> None:
    batcher = CommandBatcher(client)
    await client.set("batch:k", "kept")
    queued = batcher.enqueue("DEL", "batch:k")
    queued.discard()
    assert await batcher.execute("ECHO", "next") == b"next"
    assert batcher.commands == 1
    assert await client.get("batch:k") == b"kept"


async def test_a_stream_of_detached_stores_does_not_hold_the_leader(client: Redis) -> None:
    batcher = CommandBatcher(client)
    stop = False

    async def store_forever() -> None:  # a store behind every batch, as a busy Stream stage
        i = 0
        while not stop:
            if batcher.send_detached("SET", "batch:k", str(i)) is None:
                await batcher.execute("SET", "batch:k", str(i))
            i += 1
            await asyncio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(store_forever)
        await asyncio.sleep(0)
        with anyio.fail_after(2):
            assert await batcher.execute("ECHO", "mine") == b"mine"  # answered, not held
        stop = True
