from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import uuid
from typing import TYPE_CHECKING, TypeVar

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from orchestrator import BackendUnavailable
from orchestrator.enhanced import cache as cache_module
from orchestrator.enhanced.cache import CacheLayer, CacheStats, cache_key
from orchestrator.metrics import REGISTRY
from tests.helpers import concurrently

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio
T = TypeVar("T")


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@attrs.define
class Case:
    """A cache under test and how its time passes."""

    cache: CacheLayer
    clock: FakeClock | None  # None: Redis keeps time, tests poll or read PTTL
    client: Redis | None = None  # Redis: a separate client to look at the keys
    prefix: str = ""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def case(
    request: pytest.FixtureRequest, clock: FakeClock, prefix: str
) -> AsyncIterator[Case]:
    if request.param == "memory":
        async with CacheLayer.new_memory(100, clock=clock) as cache:
            yield Case(cache, clock)
        return
    url: str = request.getfixturevalue("redis_url")  # a sync fixture: Redis tests may skip
    client = Redis.from_url(url)
    try:
        async with await CacheLayer.new_redis(url, prefix=prefix) as cache:
            yield Case(cache, None, client, prefix)
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:  # leave nothing behind on a shared REDIS_URL server
            await client.delete(*keys)
    finally:
        await client.aclose()


def sample(name: str, backend: str) -> float:
    return (
        REGISTRY.get_sample_value(f"orchestrator_cache_{name}_total", {"backend": backend}) or 0.0
    )


async def eventually_missing(cache: CacheLayer, key: str) -> None:
    with anyio.fail_after(5):
        while await cache.get(key) is not None:
            await anyio.sleep(0.01)  # poll interval; the loop condition decides


# -- cache_key ---------------------------------------------------------------------------------


def test_cache_key_without_parts_is_the_seed_format() -> None:
    prompt = "What is Rust?"
    assert cache_key(prompt) == "prompt:" + hashlib.sha256(prompt.encode()).hexdigest()
    assert len(cache_key("")) == len("prompt:") + 64


def test_cache_key_parts_are_unambiguous() -> None:
    assert cache_key("p", "a", "bc") != cache_key("p", "ab", "c")
    assert cache_key("ab") != cache_key("a", "b")
    assert cache_key("a") != cache_key("a", "")
    assert cache_key("a", "") != cache_key("a", "", "")
    assert cache_key("a", "b") == cache_key("a", "b")


@given(
    st.tuples(st.text(), st.lists(st.text(), max_size=4)),
    st.tuples(st.text(), st.lists(st.text(), max_size=4)),
)
def test_cache_key_distinct_inputs_give_distinct_keys(
    a: tuple[str, list[str]], b: tuple[str, list[str]]
) -> None:
    if a != b:
        assert cache_key(a[0], *a[1]) != cache_key(b[0], *b[1])
    else:
        assert cache_key(a[0], *a[1]) == cache_key(b[0], *b[1])


def test_cache_key_accepts_lone_surrogates() -> None:
    assert cache_key("\ud800") != cache_key("\udc00")


# -- the contract, over every backend -----------------------------------------------------------


async def test_miss_then_hit(case: Case) -> None:
    cache = case.cache
    assert await cache.get("k") is None
    await cache.set("k", "v", 60)
    assert await cache.get("k") == "v"
    await cache.set("k", "w", 60)
    assert await cache.get("k") == "w"


async def test_values_round_trip_exactly(case: Case) -> None:
    values = ["", " ", "héllo wörld", "日本語 🎉\n\ttabs", "\x00nul", "a" * 100_000, "\ud800"]
    for i, value in enumerate(values):
        await case.cache.set(f"k{i}", value)
    for i, value in enumerate(values):
        assert await case.cache.get(f"k{i}") == value


async def test_delete(case: Case) -> None:
    await case.cache.set("k", "v")
    await case.cache.delete("k")
    assert await case.cache.get("k") is None
    await case.cache.delete("never-set")  # no error


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf])
async def test_ttl_must_be_positive_and_finite(case: Case, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await case.cache.set("k", "v", ttl)
    assert await case.cache.get("k") is None


async def test_each_entry_expires_after_its_own_ttl(case: Case) -> None:
    cache = case.cache
    await cache.set("short", "s", 0.05)
    await cache.set("long", "l", 3600)
    await cache.set("forever", "f")
    if case.clock is not None:
        case.clock.advance(0.049)
        assert await cache.get("short") == "s"
        case.clock.advance(0.001)
        assert await cache.get("short") is None
        case.clock.advance(3599.9)
        assert await cache.get("long") == "l"
        case.clock.advance(0.1)
        assert await cache.get("long") is None
        case.clock.advance(1e9)
    else:
        assert case.client is not None
        assert 0 < await case.client.pttl(case.prefix + "short") <= 50
        assert 3_599_000 < await case.client.pttl(case.prefix + "long") <= 3_600_000
        assert await case.client.pttl(case.prefix + "forever") == -1  # no expiry
        await eventually_missing(cache, "short")
        assert await cache.get("long") == "l"
    assert await cache.get("forever") == "f"


async def test_hits_and_misses_are_counted_by_backend(case: Case) -> None:
    backend = case.cache.backend
    hits, misses = sample("hits", backend), sample("misses", backend)
    await case.cache.get("k")
    await case.cache.set("k", "v")
    await case.cache.get("k")
    await case.cache.get("k")
    assert sample("hits", backend) - hits == 2
    assert sample("misses", backend) - misses == 1
    stats = case.cache.stats()
    assert (stats.backend, stats.hits, stats.misses, stats.errors) == (backend, 2, 1, 0)
    assert stats.hit_ratio == pytest.approx(2 / 3)


async def test_aclose_is_idempotent_and_closes_the_cache(case: Case) -> None:
    await case.cache.aclose()
    await case.cache.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await case.cache.get("k")


async def test_default_ttl_applies_when_set_gets_none(case: Case, prefix: str) -> None:
    if case.clock is not None:
        cache = CacheLayer.new_memory(10, default_ttl=5, clock=case.clock)
        await cache.set("k", "v")
        await cache.set("pinned", "p", 100)
        case.clock.advance(5)
        assert await cache.get("k") is None
        assert await cache.get("pinned") == "p"
        return
    assert case.client is not None
    async with await CacheLayer.new_redis(
        client=case.client, prefix=prefix, default_ttl=5
    ) as cache:
        await cache.set("k", "v")
        assert 4_000 < await case.client.pttl(prefix + "k") <= 5_000


# -- memory -------------------------------------------------------------------------------------


async def test_memory_evicts_the_least_recently_used(clock: FakeClock) -> None:
    cache = CacheLayer.new_memory(2, clock=clock)
    await cache.set("a", "1")
    await cache.set("b", "2")
    assert await cache.get("a") == "1"  # b is now the least recently used
    await cache.set("c", "3")
    assert await cache.get("b") is None
    assert await cache.get("a") == "1"
    assert await cache.get("c") == "3"
    assert cache.stats().entries == 2


async def test_set_nowait_stores_in_memory_and_on_redis_only_behind_a_batch(case: Case) -> None:
    stored = case.cache.set_nowait("k", "v", 60)
    assert stored is (case.cache.backend == "memory")  # no Redis batch in flight: not queued
    assert await case.cache.get("k") == ("v" if stored else None)


async def test_set_nowait_on_redis_rides_the_batch_in_flight_and_a_later_get_sees_it(
    redis_url: str,
) -> None:
    async with await CacheLayer.new_redis(redis_url, prefix="behind:") as cache:
        lookup = asyncio.create_task(cache.get("other"))
        await asyncio.sleep(0)  # one turn: the lookup leads a batch, in flight from now
        assert cache.set_nowait("k", "behind", 60)
        assert await cache.get("k") == "behind"  # queued after the store: runs after it
        assert await lookup is None
        await cache.delete("k")


async def test_set_nowait_checks_its_ttl(clock: FakeClock) -> None:
    cache = CacheLayer.new_memory(10, clock=clock)
    with pytest.raises(ValueError, match="ttl"):
        cache.set_nowait("k", "v", 0)
    await cache.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        cache.set_nowait("k", "v", 1)


async def test_memory_entries_do_not_count_expired_ones(clock: FakeClock) -> None:
    cache = CacheLayer.new_memory(10_000, clock=clock)
    for i in range(1000):
        await cache.set(f"k{i}", "v", 1)
    await cache.set("kept", "v")
    assert cache.stats().entries == 1001
    clock.advance(1)
    assert cache.stats() == CacheStats(backend="memory", hits=0, misses=0, errors=0, entries=1)


async def test_memory_backend_failing_degrades_and_recovers(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = CacheLayer.new_memory(10, clock=clock)
    await cache.set("k", "v")
    working = cache_module._MemoryBackend.get

    async def failing(self: object, key: str) -> str | None:
        raise RuntimeError("broken")

    monkeypatch.setattr(cache_module._MemoryBackend, "get", failing)
    assert await cache.get("k") is None
    assert not cache.available
    monkeypatch.setattr(cache_module._MemoryBackend, "get", working)
    assert await cache.get("k") is None  # within probe_interval: not tried
    clock.advance(1)
    assert await cache.get("k") == "v"  # the probe
    assert cache.available
    assert await cache.get("k") == "v"
    assert cache.stats().errors == 2


def test_memory_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        CacheLayer.new_memory(0)
    with pytest.raises(ValueError, match="ttl"):
        CacheLayer.new_memory(1, default_ttl=0)


# -- outages, over a backend of one's own --------------------------------------------------------


class GateBackend:
    """A backend of one's own: a call raises ``fail()`` if set, else waits for ``gate``."""

    name = "gate"

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.fail: Callable[[], Exception] | None = None
        self.calls = 0

    async def get(self, key: str) -> str | None:
        self.calls += 1
        if self.fail is not None:
            raise self.fail()
        await self.gate.wait()
        return "v"

    async def set(self, key: str, value: str, ttl_seconds: float | None) -> None:
        await self.get(key)

    async def delete(self, key: str) -> None:
        await self.get(key)

    def entries(self) -> None:
        return None

    async def aclose(self) -> None:
        pass


def broken() -> Exception:
    return ConnectionError("backend down")


async def test_a_down_backend_is_probed_by_one_call_at_a_time(clock: FakeClock) -> None:
    backend = GateBackend()
    cache = CacheLayer(backend, probe_interval=0, clock=clock)
    backend.fail = broken
    assert await cache.get("k") is None  # fails: the outage begins
    backend.fail = None
    answers: list[str | None] = []

    async def get() -> None:
        answers.append(await cache.get("k"))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(get)
            await anyio.wait_all_tasks_blocked()
            assert backend.calls == 2  # the probe waits; nobody else asked the backend
            assert answers == [None] * 49
            backend.gate.set()
    assert answers[-1] == "v"
    assert cache.available
    assert cache.stats().errors == 50
    await cache.set("k", "w")  # direct again, no probe
    assert backend.calls == 3


async def test_calls_waiting_when_an_outage_starts_are_released(clock: FakeClock) -> None:
    backend = GateBackend()
    cache = CacheLayer(backend, clock=clock)
    released: list[tuple[str | None, int]] = []

    async def waiting() -> None:
        answer = await cache.get("k")
        task = asyncio.current_task()
        assert task is not None
        released.append((answer, task.cancelling()))  # our cancellation was taken back

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiting)
            await anyio.wait_all_tasks_blocked()
            backend.fail = broken
            assert await cache.get("k") is None  # this failure starts the outage
            backend.fail = None
        # Released at once, while the gate stays shut.
    assert released == [(None, 0)] * 3
    assert not cache.available
    assert cache.stats().errors == 4
    assert backend.calls == 4
    clock.advance(1)  # the probe interval
    backend.gate.set()
    assert await cache.get("k") == "v"
    assert cache.available


async def test_a_released_call_cancelled_by_its_caller_stays_cancelled(
    clock: FakeClock,
) -> None:
    backend = GateBackend()
    cache = CacheLayer(backend, clock=clock)
    scope = anyio.CancelScope()
    outcome: list[object] = []

    async def waiting() -> None:
        with scope:
            outcome.append(await cache.get("k"))
        task = asyncio.current_task()
        assert task is not None
        outcome.append((scope.cancelled_caught, task.cancelling()))

    def cancel_and_fail() -> Exception:
        scope.cancel()  # the caller's cancellation lands together with the release
        return broken()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting)
            await anyio.wait_all_tasks_blocked()
            backend.fail = cancel_and_fail
            assert await cache.get("k") is None  # starts the outage: releases the waiting call
    assert outcome == [(True, 0)]  # cancelled, not answered a miss


async def test_a_cancelled_probe_lets_the_next_call_probe(clock: FakeClock) -> None:
    backend = GateBackend()
    cache = CacheLayer(backend, probe_interval=0, clock=clock)
    backend.fail = broken
    assert await cache.get("k") is None
    backend.fail = None
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.get, "k")  # the probe, waiting at the gate
            await anyio.wait_all_tasks_blocked()
            assert await cache.get("k") is None  # not the probe: degraded at once
            tg.cancel_scope.cancel()
        assert backend.calls == 2
        backend.gate.set()
        assert await cache.get("k") == "v"  # the slot is free again: this call probes
    assert backend.calls == 3
    assert cache.available


# -- redis --------------------------------------------------------------------------------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=st.text(st.one_of(st.characters(), st.characters(categories=["Cs"]))))  # + surrogates
async def test_redis_round_trips_any_text(redis_client: Redis, value: str) -> None:
    async with await CacheLayer.new_redis(client=redis_client, prefix="test:hyp:") as cache:
        await cache.set("k", value, 10)
        assert await cache.get("k") == value


async def test_redis_entries_are_shared_through_the_prefix(redis_url: str, prefix: str) -> None:
    async with (
        await CacheLayer.new_redis(redis_url, prefix=prefix) as one,
        await CacheLayer.new_redis(redis_url, prefix=prefix) as two,
        await CacheLayer.new_redis(redis_url, prefix=prefix + "other:") as other,
    ):
        await one.set(cache_key("Hi"), "Hello", 60)
        assert await two.get(cache_key("Hi")) == "Hello"
        assert await other.get(cache_key("Hi")) is None
        assert one.stats().entries is None


async def test_redis_borrowed_client_stays_open(redis_client: Redis, prefix: str) -> None:
    cache = await CacheLayer.new_redis(client=redis_client, prefix=prefix)
    await cache.set("k", "v", 60)
    await cache.aclose()
    assert await redis_client.get(prefix + "k") == b"v"  # still usable


async def test_redis_borrowed_client_may_decode_responses(redis_url: str, prefix: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        async with await CacheLayer.new_redis(client=client, prefix=prefix) as cache:
            await cache.set("k", "日本語", 60)
            assert await cache.get("k") == "日本語"
    finally:
        await client.aclose()


async def test_redis_constructor_checks_its_arguments(redis_url: str, redis_client: Redis) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await CacheLayer.new_redis()
    with pytest.raises(ValueError, match="exactly one"):
        await CacheLayer.new_redis(redis_url, client=redis_client)


async def test_redis_unreachable_at_start_raises_without_leaking_the_password() -> None:
    from tests.redis_server import free_port

    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(BackendUnavailable, match="did not answer PING") as info:
        await CacheLayer.new_redis(url, connect_timeout=0.5)
    assert "s3cret" not in str(info.value)


async def test_redis_unreachable_socket_raises_without_leaking_the_query_password(
    tmp_path: Path,
) -> None:
    url = f"unix://{tmp_path}/none.sock?db=0&password=s3cret"
    with pytest.raises(BackendUnavailable, match="did not answer PING") as info:
        await CacheLayer.new_redis(url, connect_timeout=0.5)
    assert "s3cret" not in str(info.value)
    assert "password=***" in str(info.value)


async def test_redis_outage_degrades_to_misses_and_recovers(
    redis_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    if not redis_server.can_restart:
        pytest.skip("an external Redis (REDIS_URL) cannot be stopped by the tests")
    caplog.set_level(logging.INFO, logger=cache_module.__name__)
    errors = sample("errors", "redis")
    async with await CacheLayer.new_redis(
        redis_server.url, prefix=prefix, probe_interval=0
    ) as cache:
        await cache.set("k", "v")
        with redis_server.stopped():
            with anyio.fail_after(5):  # short timeouts: an outage must not hang callers
                for _ in range(5):
                    assert await cache.get("k") is None
                    await cache.set("k", "w")  # skipped, no exception
                    await cache.delete("k")
            assert not cache.available
        assert sample("errors", "redis") - errors == 15
        assert cache.stats().errors == 15
        # The server restarted empty; the pool reconnects on its own.
        assert await cache.get("k") is None
        assert cache.available
        await cache.set("k", "back")
        assert await cache.get("k") == "back"
    records = [r for r in caplog.records if r.name == cache_module.__name__]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]  # once per outage
    assert "15 calls degraded" in records[1].getMessage()


async def test_redis_outage_probes_once_per_interval(
    redis_server: RedisServer, prefix: str, clock: FakeClock
) -> None:
    if not redis_server.can_restart:
        pytest.skip("an external Redis (REDIS_URL) cannot be stopped by the tests")
    async with await CacheLayer.new_redis(
        redis_server.url, prefix=prefix, probe_interval=2, clock=clock
    ) as cache:
        await cache.set("k", "v")
        with redis_server.stopped():
            assert await cache.get("k") is None  # tries Redis, fails: outage begins
        # Redis is back, but within the interval no call tries it.
        assert await cache.get("k") is None
        assert not cache.available
        clock.advance(2)
        assert await cache.get("k") is None  # the probe: Redis restarted empty
        assert cache.available
        await cache.set("k", "v2")
        assert await cache.get("k") == "v2"
        assert cache.stats().errors == 2


async def test_redis_concurrent_calls_go_through_while_it_answers(
    redis_url: str, prefix: str
) -> None:
    async with await CacheLayer.new_redis(redis_url, prefix=prefix) as cache:
        await cache.set("k", "v")
        answers = await concurrently(200, lambda: cache.get("k"))
        assert [answer for _, answer in answers] == ["v"] * 200
        assert cache.stats().errors == 0


async def test_redis_frozen_only_the_probe_waits(
    redis_server: RedisServer, prefix: str, clock: FakeClock
) -> None:
    if not redis_server.can_restart:
        pytest.skip("an external Redis (REDIS_URL) cannot be frozen by the tests")
    timeout = 0.5
    async with await CacheLayer.new_redis(
        redis_server.url, prefix=prefix, command_timeout=timeout, probe_interval=5, clock=clock
    ) as cache:
        await cache.set("k", "v")
        with redis_server.frozen():
            # Nothing is known yet: the calls go to Redis until one has waited too long.
            first = await concurrently(200, lambda: cache.get("k"))
            assert not cache.available
            clock.advance(5)  # one call probes; the others do not wait for it
            second = await concurrently(200, lambda: cache.get("k"))
        for wave in (first, second):
            assert [answer for _, answer in wave] == [None] * 200
            waited = [took for took, _ in wave if took > timeout / 2]
            assert 1 <= len(waited) <= 2, sorted(took for took, _ in wave)[-5:]
        assert cache.stats().errors == 400  # each call degraded, and counted, once
        assert await cache.get("k") is None  # resumed, but no call tries it until the interval
        clock.advance(5)
        assert await cache.get("k") == "v"  # the probe: the server kept its data
        assert cache.available
        await cache.set("k", "w")
        assert await cache.get("k") == "w"


async def test_redis_answering_late_ends_the_outage(
    redis_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    if not redis_server.can_restart:
        pytest.skip("an external Redis (REDIS_URL) cannot be frozen by the tests")
    caplog.set_level(logging.INFO, logger=cache_module.__name__)
    async with await CacheLayer.new_redis(
        redis_server.url, prefix=prefix, command_timeout=1.0
    ) as cache:
        await cache.set("k", "v")
        late: list[str | None] = []

        async def first() -> None:
            late.append(await cache.get("k"))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                with redis_server.frozen():
                    tg.start_soon(first)
                    await anyio.wait_all_tasks_blocked()  # its GET is sent
                    assert await cache.get("k") is None  # released after 0.25 s
                    assert not cache.available
                # Resumed within the first call's timeout: it gets its answer.
        assert late == ["v"]
        assert cache.available
        assert await cache.get("k") == "v"
    records = [r for r in caplog.records if r.name == cache_module.__name__]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    assert "no answer within 0.25s" in records[0].getMessage()
    assert "1 calls degraded" in records[1].getMessage()


@pytest.mark.parametrize(
    "url", ["redis://:hun/ter2@localhost:6379/0", "redis://u:hunter2@localhost:notaport/0"]
)
async def test_a_malformed_redis_url_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(ValueError, match="invalid Redis URL") as caught:
        await CacheLayer.new_redis(url, ping=False)
    assert "hun" not in str(caught.value)
    assert caught.value.__cause__ is None
