"""The library's policies as the server exposes them: 429s, cache hits, Redis replicas."""

from __future__ import annotations

import json
import logging
import uuid
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from orchestrator_server import ServerConfig, create_app
from orchestrator_server.app import build_pipeline_config
from tests.helpers import prompt_for
from tests.server.conftest import serve

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio


async def test_rate_limited_session_gets_429_with_headers() -> None:
    config = ServerConfig(access_log=False, rate_limit_requests=2, rate_limit_window=60)
    async with serve(create_app(config=config)) as base, httpx.AsyncClient(base_url=base) as c:
        body = {"prompt": "x", "session_id": "user-1"}
        admitted = [await c.post("/api/v1/infer", json=body) for _ in range(2)]
        limited = await c.post("/api/v1/infer", json=body)
        other = await c.post("/api/v1/infer", json={**body, "session_id": "user-2"})
        streamed = await c.post("/api/v1/infer", json={**body, "session_id": "u3", "stream": True})
    assert [r.status_code for r in admitted] == [200, 200]
    # Successful answers carry the quota too: what is left, and when it is all back.
    assert [r.headers["x-ratelimit-remaining"] for r in admitted] == ["1", "0"]
    assert all(r.headers["x-ratelimit-limit"] == "2" for r in admitted)
    assert 29 <= int(admitted[0].headers["x-ratelimit-reset"]) <= 30  # one token to refill
    assert streamed.headers["x-ratelimit-remaining"] == "1"
    assert limited.status_code == 429
    assert "rate limited" in limited.json()["error"]
    assert limited.headers["x-ratelimit-limit"] == "2"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    # One token back in 30 s (60 s / 2): the next request may come then; the bucket is
    # full again, the whole quota back, in 60 s.
    assert 29 <= int(limited.headers["retry-after"]) <= 30
    assert 59 <= int(limited.headers["x-ratelimit-reset"]) <= 60
    assert other.status_code == 200


async def test_rate_limit_over_websocket_keeps_the_socket_open() -> None:
    config = ServerConfig(access_log=False, rate_limit_requests=2, rate_limit_window=60)
    async with serve(create_app(config=config)) as base:
        url = base.replace("http", "ws") + "/api/v1/stream"
        async with connect(url) as ws:
            for prompt in "abc":
                await ws.send(json.dumps({"prompt": prompt, "session_id": "s"}))
            with anyio.fail_after(5):
                frames = [json.loads(await ws.recv()) for _ in range(5)]
    limited = [f for f in frames if "error" in f]
    assert len(limited) == 1
    assert "rate limited" in limited[0]["error"]
    assert 29 < limited[0]["retry_after"] <= 30  # the next token, not the full bucket (60)


async def test_a_repeated_request_is_answered_from_the_cache_at_once() -> None:
    config = ServerConfig(access_log=False)
    async with serve(create_app(config=config)) as base, httpx.AsyncClient(base_url=base) as c:
        first = (await c.post("/api/v1/infer", json={"prompt": "cached?"})).json()
        done = (await c.get(f"/api/v1/result/{first['request_id']}")).json()
        again = (await c.post("/api/v1/infer", json={"prompt": "cached?"})).json()
    assert done["status"] == "completed"
    assert again["status"] == "completed"  # in the POST answer itself
    assert again["result"] == done["result"] == prompt_for("cached?")
    assert again["request_id"] != first["request_id"]


async def test_replicas_on_one_redis_share_rate_limits_and_cache(
    redis_server: RedisServer,
) -> None:
    config = ServerConfig(
        access_log=False,
        redis_url=redis_server.url,
        rate_limit_requests=3,
        rate_limit_window=60,
    )
    session = f"shared-{uuid.uuid4().hex}"
    async with (
        serve(create_app(config=config)) as one,
        serve(create_app(config=config)) as two,
        httpx.AsyncClient() as client,
    ):
        body = {"prompt": f"replicated {session}", "session_id": session}
        a = await client.post(f"{one}/api/v1/infer", json=body)
        done = (await client.get(f"{one}/api/v1/result/{a.json()['request_id']}")).json()
        b = (await client.post(f"{two}/api/v1/infer", json=body)).json()
        codes = [
            (await client.post(f"{u}/api/v1/infer", json=body)).status_code for u in (one, two)
        ]
    assert done["status"] == "completed"
    assert b["status"] == "completed"  # replica two found replica one's answer in Redis
    assert b["result"] == done["result"]
    assert codes == [200, 429]  # three allowed in total, across both replicas


async def test_the_cache_and_the_limiter_share_one_redis_client(
    redis_server: RedisServer,
) -> None:
    name = f"one-pool-{uuid.uuid4().hex}"  # tells this test's connections from the rest
    url = f"{redis_server.url}?client_name={name}"
    config = ServerConfig(access_log=False, redis_url=url, rate_limit_requests=100)

    async def ours() -> int:
        async with Redis.from_url(redis_server.url) as admin:
            return sum(c.get("name") == name for c in await admin.client_list())

    async with AsyncExitStack() as stack:
        pipeline = await build_pipeline_config(config, stack)
        cache, limiter = pipeline.cache, pipeline.rate_limiter
        assert cache is not None
        assert limiter is not None
        for _ in range(3):  # one after the other: one pool hands out one connection
            await cache.set("one-pool", "v")
            assert await cache.get("one-pool") == "v"
            assert (await limiter.decide("one-pool")).allowed
        during = await ours()
    assert during == 1  # two pools would hold one connection each
    with anyio.fail_after(5):
        while await ours():  # the server notices the close in its own time
            await anyio.sleep(0.01)


async def test_the_server_starts_degraded_with_one_warning_while_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    config = ServerConfig(access_log=False, redis_url=url, rate_limit_requests=1)
    with caplog.at_level(logging.WARNING):
        async with AsyncExitStack() as stack:
            pipeline = await build_pipeline_config(config, stack)
            assert pipeline.cache is not None
            assert pipeline.rate_limiter is not None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "did not answer PING" in warnings[0].getMessage()
    assert "serving degraded" in warnings[0].getMessage()


async def test_the_server_starts_while_redis_is_down_and_answers_503_at_once() -> None:
    from tests.redis_server import free_port

    config = ServerConfig(
        access_log=False,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        rate_limit_requests=1,
    )
    async with serve(create_app(config=config)) as base, httpx.AsyncClient(base_url=base) as c:
        body = {"prompt": "degraded", "session_id": "s"}
        with anyio.fail_after(5):  # never a hang: the connection is refused at once
            answers = [await c.post("/api/v1/infer", json=body) for _ in range(2)]
            health = await c.get("/health")
    # The requests live in Redis: without it none can be accepted, and the client is told.
    assert [a.status_code for a in answers] == [503, 503]
    assert all("Redis" in a.json()["error"] for a in answers)
    assert all(a.headers["retry-after"].isdigit() for a in answers)
    assert health.status_code == 200  # the process itself is fine
