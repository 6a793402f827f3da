"""Servers and workers as real processes on one Redis, killed with real signals."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from tests.distributed import processes
from tests.redis_server import free_port, wait_for_ping

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.anyio


@pytest.fixture
def env() -> dict[str, str]:
    """A key prefix of the test's own, and leases reclaimed after half a second."""
    return {
        "ORCHESTRATOR_REDIS_PREFIX": f"p{uuid.uuid4().hex[:10]}:",
        "ORCHESTRATOR_RECLAIM_AFTER": "0.5",
        "SLOW_WORKER_DELAY": "0.05",
    }


async def submit(client: httpx.AsyncClient, prompt: str, **extra: Any) -> httpx.Response:
    return await client.post("/api/v1/infer", json={"prompt": prompt, **extra})


async def result(client: httpx.AsyncClient, request_id: str, timeout: float = 20) -> Any:
    with anyio.fail_after(timeout + 5):
        answer = await client.get(f"/api/v1/result/{request_id}?timeout={timeout}")
    assert answer.status_code == 200, answer.text
    return answer.json()


async def processing(client: httpx.AsyncClient, ids: list[str], count: int) -> None:
    """Wait until ``count`` of the requests are being processed by a worker (a poll of their
    status: the worker's progress is in Redis, nothing here to await)."""
    with anyio.fail_after(20):
        while True:
            statuses = [(await client.get(f"/api/v1/status/{i}")).json()["status"] for i in ids]
            if statuses.count("processing") == count:
                return
            await anyio.sleep(0.05)


@pytest.fixture
async def notes(redis_url: str, env: dict[str, str]) -> AsyncIterator[Counter[str]]:
    """How many finish notifications each request id got (each must get exactly one)."""
    heard: Counter[str] = Counter()
    client = Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(f"{env['ORCHESTRATOR_REDIS_PREFIX']}events")

    async def listen() -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                heard[json.loads(message["data"])["id"]] += 1

    task = asyncio.create_task(listen())
    try:
        yield heard
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()
        await client.aclose()


async def test_submit_on_one_replica_long_poll_and_stream_on_another(
    redis_url: str, env: dict[str, str]
) -> None:
    ports = [free_port(), free_port()]
    started = await asyncio.gather(
        processes.frontend(redis_url, ports[0], env),
        processes.frontend(redis_url, ports[1], env),
        processes.worker(redis_url, env),
        processes.worker(redis_url, env),
    )
    async with (
        processes.running(list(started)),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}") as a,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}") as b,
    ):
        submitted = await submit(a, "hello from replica a")
        assert submitted.status_code == 200
        done = await result(b, submitted.json()["request_id"])
        assert (done["status"], done["result"]) == ("completed", "hello from replica a")
        with anyio.fail_after(20):
            streamed = await submit(a, "streamed one two three", stream=True)
            events = _events(streamed.text)
            request_id = events[0]["request_id"]
            # The same tokens, followed on replica b, from the first.
            followed = _events((await b.get(f"/api/v1/tokens/{request_id}")).text)
        assert events[-1]["status"] == followed[-1]["status"] == "completed"
        assert _text(events) == _text(followed) == "streamed one two three"


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def _text(events: list[dict[str, Any]]) -> str:
    return "".join(e["token"] for e in events if "token" in e)


async def test_kill_9_of_a_worker_with_50_in_flight_loses_none(
    redis_url: str, env: dict[str, str], notes: Counter[str]
) -> None:
    port = free_port()
    front = await processes.frontend(redis_url, port, env)
    doomed = await processes.worker(redis_url, {**env, "SLOW_WORKER_DELAY": "60"}, concurrency=50)
    async with (
        processes.running([front, doomed]) as children,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        ids = [(await submit(client, f"request {i}")).json()["request_id"] for i in range(50)]
        await processing(client, ids, 50)
        doomed.send(signal.SIGKILL)
        assert await doomed.stopped() == -signal.SIGKILL
        children.append(await processes.worker(redis_url, env, concurrency=50))
        answers = [await result(client, i) for i in ids]
    assert [a["status"] for a in answers] == ["completed"] * 50
    assert [a["result"] for a in answers] == [f"request {i}" for i in range(50)]
    assert all(notes[i] == 1 for i in ids)  # each request ended exactly once


async def test_sigterm_on_a_worker_finishes_its_calls_and_exits_0(
    redis_url: str, env: dict[str, str], notes: Counter[str]
) -> None:
    port = free_port()
    front = await processes.frontend(redis_url, port, env)
    draining = await processes.worker(redis_url, {**env, "SLOW_WORKER_DELAY": "1.0"}, concurrency=2)
    async with (
        processes.running([front, draining]) as children,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        ids = [(await submit(client, f"request {i}")).json()["request_id"] for i in range(6)]
        await processing(client, ids, 2)
        children.append(await processes.worker(redis_url, env, concurrency=4))
        draining.send(signal.SIGTERM)
        assert await draining.stopped() == 0
        answers = [await result(client, i) for i in ids]
    assert [a["status"] for a in answers] == ["completed"] * 6
    assert "handing back" in draining.log
    assert all(notes[i] == 1 for i in ids)


async def test_overload_across_replicas_sheds_and_every_accepted_request_ends(
    redis_url: str, env: dict[str, str]
) -> None:
    shared = {**env, "ORCHESTRATOR_SHARED_CAPACITY": "5"}
    ports = [free_port(), free_port()]
    fronts = await asyncio.gather(*(processes.frontend(redis_url, p, shared) for p in ports))
    async with (
        processes.running(list(fronts)) as children,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}") as a,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}") as b,
    ):
        answers = await asyncio.gather(*(submit((a, b)[i % 2], f"r{i}") for i in range(20)))
        codes = Counter(r.status_code for r in answers)
        assert codes == {200: 5, 503: 15}  # no worker yet: the queue holds five, not six
        assert all(r.headers["retry-after"] for r in answers if r.status_code == 503)
        children.append(await processes.worker(redis_url, env))
        accepted = [r.json()["request_id"] for r in answers if r.status_code == 200]
        finished = [await result(a, i) for i in accepted]
    assert [f["status"] for f in finished] == ["completed"] * 5


class DurableRedis:
    """A redis-server of the test's own, with the append-only file, that can be stopped
    and started on the same port and directory: what survives a Redis restart."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        arguments = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        arguments += ["--appendonly", "yes", "--appendfsync", "always"]
        arguments += ["--dir", str(self._directory)]
        self._process = subprocess.Popen(
            [binary, *arguments],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_ping("127.0.0.1", self.port, deadline=time.monotonic() + 10)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None


async def test_a_redis_restart_mid_load_loses_nothing_and_recovers(
    tmp_path: Path, env: dict[str, str]
) -> None:
    redis = DurableRedis(tmp_path)
    redis.start()
    try:
        port = free_port()
        front = await processes.frontend(redis.url, port, env)
        work = await processes.worker(redis.url, {**env, "SLOW_WORKER_DELAY": "0.5"})
        async with (
            processes.running([front, work]),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
        ):
            before = [(await submit(client, f"before {i}")).json()["request_id"] for i in range(4)]
            redis.stop()  # with the worker in the middle of its calls
            with anyio.fail_after(5):  # never a hang: answered within about a second
                refused = await submit(client, "during")
                status = await client.get(f"/api/v1/status/{before[0]}")
            assert (refused.status_code, status.status_code) == (503, 503)
            assert "unavailable" in refused.json()["error"]
            redis.start()
            with anyio.fail_after(5):  # new requests go through again, by themselves
                while (after := await submit(client, "after")).status_code != 200:
                    await anyio.sleep(0.1)  # nothing to await: recovery is the processes'
            assert (await result(client, after.json()["request_id"]))["result"] == "after"
            # Accepted before the outage: each ends (run again if its end was lost).
            answers = [await result(client, i) for i in before]
        assert [a["status"] for a in answers] == ["completed"] * 4
    finally:
        redis.stop()
