"""``connect_redis``: one client that a cache and a rate limiter share and never close."""

from __future__ import annotations

import uuid

import pytest
from redis.exceptions import RedisError

from orchestrator import BackendUnavailable
from orchestrator.enhanced import CacheLayer, RateLimiter, connect_redis
from tests.redis_server import free_port

pytestmark = pytest.mark.anyio


async def test_a_shared_client_serves_both_and_stays_open_after_them(redis_url: str) -> None:
    client = await connect_redis(redis_url)
    try:
        key = f"shared-{uuid.uuid4().hex}"
        async with (
            await CacheLayer.new_redis(client=client) as cache,
            await RateLimiter.new_redis(None, 1, 60, client=client) as limiter,
        ):
            await cache.set(key, "v")
            assert await cache.get(key) == "v"
            assert await limiter.check(key)
            assert not await limiter.check(key)
        assert await client.ping()  # borrowed: neither closed it
    finally:
        await client.aclose()


async def test_no_answer_is_backend_unavailable_without_the_password() -> None:
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(BackendUnavailable, match="did not answer PING") as info:
        await connect_redis(url, connect_timeout=0.5)
    assert info.value.backend == "redis"
    assert isinstance(info.value.__cause__, RedisError | OSError)
    assert "s3cret" not in str(info.value)


async def test_without_ping_a_client_is_made_while_redis_is_down() -> None:
    client = await connect_redis(f"redis://127.0.0.1:{free_port()}/0", ping=False)
    try:
        with pytest.raises((RedisError, OSError)):
            await client.ping()
    finally:
        await client.aclose()


async def test_a_bad_url_is_a_value_error_with_the_password_redacted() -> None:
    with pytest.raises(ValueError, match="invalid Redis URL") as info:
        await connect_redis("redis://user:s3cret@host:port/0")
    assert "s3cret" not in str(info.value)
