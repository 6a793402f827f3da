from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
import tracemalloc
import uuid
from typing import TYPE_CHECKING, TypeVar

import anyio
import attrs
import pytest
from aiolimiter import AsyncLimiter
from redis.asyncio import Redis

from orchestrator import BackendUnavailable
from orchestrator.enhanced import rate_limit as rate_limit_module
from orchestrator.enhanced.rate_limit import RateDecision, RateLimiter, UsageInfo
from orchestrator.metrics import REGISTRY
from orchestrator.types import SessionId
from tests.helpers import concurrently

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio
T = TypeVar("T")


class SkewedLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock tests can move forward: aiolimiter reads ``loop.time()``."""

    skew = 0.0

    def time(self) -> float:
        return super().time() + self.skew


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return "asyncio", {"loop_factory": SkewedLoop}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def advance_loop(seconds: float) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, SkewedLoop)
    loop.skew += seconds


@attrs.define
class Case:
    """How to make a limiter of one backend, and how to move its time (None: real time)."""

    backend: str
    make: Callable[[int, float], Awaitable[RateLimiter]]
    advance: Callable[[float], None] | None


@pytest.fixture(params=["simple", "governor", "redis"])
async def case(request: pytest.FixtureRequest) -> AsyncIterator[Case]:
    made: list[RateLimiter] = []
    if request.param == "simple":
        clock = FakeClock()

        async def make(n: int, window: float) -> RateLimiter:
            return RateLimiter(n, window, clock=clock)

        yield Case("simple", make, clock.advance)
    elif request.param == "governor":

        async def make(n: int, window: float) -> RateLimiter:
            return RateLimiter.new_governor(n, window)

        yield Case("governor", make, advance_loop)
    else:
        url: str = request.getfixturevalue("redis_url")
        prefix = f"test:{uuid.uuid4().hex}:"

        async def make(n: int, window: float) -> RateLimiter:
            limiter = await RateLimiter.new_redis(url, n, window, prefix=prefix)
            made.append(limiter)
            return limiter

        try:
            yield Case("redis", make, None)
        finally:
            for limiter in made:
                await limiter.aclose()


@pytest.fixture(params=["simple", "governor"])
def local(request: pytest.FixtureRequest) -> Case:
    """The in-process backends, whose time the tests move exactly."""
    if request.param == "simple":
        clock = FakeClock()

        async def make(n: int, window: float) -> RateLimiter:
            return RateLimiter(n, window, clock=clock)

        return Case("simple", make, clock.advance)

    async def make_governor(n: int, window: float) -> RateLimiter:
        return RateLimiter.new_governor(n, window)

    return Case("governor", make_governor, advance_loop)


def decisions(decision: str) -> float:
    value = REGISTRY.get_sample_value(
        "orchestrator_rate_limit_decisions_total", {"decision": decision}
    )
    return value or 0.0


# -- the contract, over every backend ---------------------------------------------------------


async def test_a_session_bursts_its_limit_then_is_refused(case: Case) -> None:
    limiter = await case.make(5, 60)
    results = [await limiter.check("user-1") for _ in range(7)]
    assert results == [True] * 5 + [False] * 2


async def test_decisions_carry_remaining_retry_after_and_reset(case: Case) -> None:
    limiter = await case.make(4, 60)  # one token per 15 s
    allowed = [await limiter.decide("s") for _ in range(4)]
    assert [d.remaining for d in allowed] == [3, 2, 1, 0]
    assert all(d.allowed and d.limit == 4 and d.retry_after == 0.0 for d in allowed)
    assert [d.reset_in for d in allowed] == pytest.approx([15, 30, 45, 60], rel=1e-3)
    refused = await limiter.decide("s")
    assert (refused.allowed, refused.limit, refused.remaining) == (False, 4, 0)
    assert refused.retry_after == pytest.approx(15, rel=1e-3)
    assert refused.reset_in == pytest.approx(60, rel=1e-3)


async def test_sessions_are_independent_and_session_ids_equal_strings(case: Case) -> None:
    limiter = await case.make(1, 60)
    assert await limiter.check(SessionId("alice"))
    assert not await limiter.check("alice")
    assert await limiter.check("bob")
    assert await limiter.check("")  # any string is a session


async def test_get_usage_does_not_consume(case: Case) -> None:
    limiter = await case.make(10, 60)
    assert await limiter.get_usage("s") is None  # never seen
    await limiter.check("s")
    await limiter.check("s")
    for _ in range(5):
        usage = await limiter.get_usage("s")
        assert usage is not None
        assert (usage.used, usage.remaining) == (2, 8)
        assert usage.reset_in_secs == pytest.approx(12, rel=1e-3)
    assert (await limiter.decide("s")).remaining == 7


async def test_decisions_are_counted(case: Case) -> None:
    limiter = await case.make(2, 60)
    allowed, limited = decisions("allowed"), decisions("limited")
    for _ in range(3):
        await limiter.check("s")
    await limiter.decide("s")
    await limiter.get_usage("s")  # not a decision
    assert decisions("allowed") - allowed == 2
    assert decisions("limited") - limited == 2


async def test_properties_and_close(case: Case) -> None:
    limiter = await case.make(7, 2.5)
    assert (limiter.limit, limiter.window_secs, limiter.backend) == (7, 2.5, case.backend)
    assert repr(limiter) == f"RateLimiter({case.backend}, 7 per 2.5s)"
    async with limiter:
        assert await limiter.check("s")
    await limiter.aclose()  # idempotent


@pytest.mark.parametrize(
    ("max_requests", "window_secs"),
    [(0, 1), (-1, 1), (1, 0), (1, -1), (1, math.nan), (1, math.inf), (2.5, 1), (True, 1)],
)
async def test_arguments_are_checked(max_requests: int, window_secs: float) -> None:
    with pytest.raises(ValueError, match=r"max_requests|window_secs"):
        RateLimiter(max_requests, window_secs)
    with pytest.raises(ValueError, match=r"max_requests|window_secs"):
        RateLimiter.new_governor(max_requests, window_secs)
    with pytest.raises(ValueError, match=r"max_requests|window_secs"):  # before connecting
        await RateLimiter.new_redis("redis://127.0.0.1:1/0", max_requests, window_secs)
    with pytest.raises(ValueError, match="max_sessions"):
        RateLimiter(1, 1, max_sessions=0)


# -- time, moved exactly: the in-process backends -------------------------------------------------


# Windows here are long (a token per hundreds of seconds) and margins a second, so the real
# time that passes between calls (the governor's loop clock is real time plus our skew) is
# negligible.


async def test_tokens_refill_at_the_average_rate(local: Case) -> None:
    assert local.advance is not None
    limiter = await local.make(3, 3000)  # a token every 1000 s
    assert [await limiter.check("s") for _ in range(4)] == [True, True, True, False]
    refused = await limiter.decide("s")
    assert refused.retry_after == pytest.approx(1000, abs=0.1)
    local.advance(refused.retry_after - 1)
    assert not await limiter.check("s")
    local.advance(2)
    assert await limiter.check("s")
    assert not await limiter.check("s")


async def test_a_steady_rate_under_the_limit_is_never_refused(local: Case) -> None:
    assert local.advance is not None
    limiter = await local.make(10, 1000)
    for _ in range(10):
        assert await limiter.check("s")  # the burst
    for _ in range(100):  # then the average rate
        local.advance(100.001)
        assert await limiter.check("s")
        assert not await limiter.check("s")


async def test_usage_resets_when_the_bucket_is_full_again(local: Case) -> None:
    assert local.advance is not None
    limiter = await local.make(4, 2000)  # a token every 500 s
    await limiter.check("s")
    await limiter.check("s")
    usage = await limiter.get_usage("s")
    assert usage is not None
    assert (usage.used, usage.remaining) == (2, 2)
    assert usage.reset_in_secs == pytest.approx(1000, abs=0.1)
    local.advance(600)  # 1.2 tokens back: one whole, one partly (still counted used)
    usage = await limiter.get_usage("s")
    assert usage is not None
    assert (usage.used, usage.remaining) == (1, 3)
    assert usage.reset_in_secs == pytest.approx(400, abs=0.1)
    local.advance(401)
    assert await limiter.get_usage("s") is None
    assert limiter.tracked_sessions == 0
    assert (await limiter.decide("s")).remaining == 3  # a fresh bucket


async def test_idle_buckets_are_dropped_so_memory_stays_bounded(local: Case) -> None:
    assert local.advance is not None
    limiter = await local.make(5, 60)
    sessions = 100_000 if local.backend == "simple" else 10_000  # an AsyncLimiter is bigger
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(sessions):
            assert await limiter.check(f"user-{i}")
        assert limiter.tracked_sessions == sessions
        full = tracemalloc.get_traced_memory()[0] - before
        local.advance(60 / 5 + 1e-6)  # one token back: every bucket is full again
        # Each check drops a few idle buckets, oldest first: a steady trickle of traffic
        # drains them all, without any one check doing unbounded work.
        for _ in range(sessions // 8 + 1):
            assert await limiter.check("steady")
            local.advance(60 / 5)  # "steady" stays within its own rate
        assert limiter.tracked_sessions == 1
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert after < full / 50, (full, after)


async def test_max_sessions_caps_memory_under_a_flood(local: Case) -> None:
    limiter = (
        RateLimiter(5, 60, max_sessions=100)
        if local.backend == "simple"
        else RateLimiter.new_governor(5, 60, max_sessions=100)
    )
    for i in range(1000):
        await limiter.check(f"user-{i}")
    assert limiter.tracked_sessions == 100
    assert await limiter.get_usage("user-999") is not None
    assert await limiter.get_usage("user-0") is None  # the least recently allowed went first


async def test_governor_reads_aiolimiter_level() -> None:
    # _GovernorBuckets reads AsyncLimiter._level (there is no public accessor): pin it.
    limiter = AsyncLimiter(3, 1)
    assert limiter._level == 0
    await limiter.acquire()
    assert limiter._level == 1


# -- Redis ------------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


async def test_redis_limiters_on_one_prefix_share_one_budget(redis_url: str, prefix: str) -> None:
    async with (
        await RateLimiter.new_redis(redis_url, 10, 60, prefix=prefix) as one,
        await RateLimiter.new_redis(redis_url, 10, 60, prefix=prefix) as two,
        await RateLimiter.new_redis(redis_url, 10, 60, prefix=prefix + "other:") as other,
    ):
        # Concurrent checks from two "replicas": exactly the limit gets through.
        results: list[bool] = []

        async def hit(limiter: RateLimiter) -> None:
            results.append(await limiter.check("shared"))

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(hit, one if i % 2 else two)
        assert results.count(True) == 10
        usage = await one.get_usage("shared")
        assert usage is not None
        assert usage.used == 10
        assert await other.check("shared")  # another prefix, another budget


async def test_redis_bucket_uses_server_time_and_expires_when_full(
    redis_url: str, prefix: str
) -> None:
    client = Redis.from_url(redis_url)
    try:
        async with await RateLimiter.new_redis(
            client=client, url=None, max_requests=4, window_secs=2, prefix=prefix
        ) as limiter:
            await limiter.check("s")
            seconds, micros = await client.time()
            stored = float(await client.hget(prefix + "s", "ts") or 0)
            assert abs(stored - (seconds * 1000 + micros / 1000)) < 1000
            assert 0 < await client.pttl(prefix + "s") <= 500  # full again in 0.5 s
            for _ in range(3):
                await limiter.check("s")
            assert 1500 < await client.pttl(prefix + "s") <= 2000
        assert await client.ping()  # borrowed: still open
    finally:
        await client.aclose()


async def test_redis_refills_in_real_time(redis_url: str, prefix: str) -> None:
    async with await RateLimiter.new_redis(redis_url, 2, 0.2, prefix=prefix) as limiter:
        assert await limiter.check("s")
        assert await limiter.check("s")
        refused = await limiter.decide("s")
        assert not refused.allowed
        assert 0.05 < refused.retry_after <= 0.1
        start = time.monotonic()
        with anyio.fail_after(5):
            while not await limiter.check("s"):
                await anyio.sleep(0.01)  # poll interval; the check decides
        assert time.monotonic() - start >= refused.retry_after * 0.5
        with anyio.fail_after(5):
            while await limiter.get_usage("s") is not None:  # the key expires when full
                await anyio.sleep(0.01)


async def test_redis_unreachable_at_start_raises() -> None:
    from tests.redis_server import free_port

    with pytest.raises(BackendUnavailable, match="did not answer PING"):
        await RateLimiter.new_redis(f"redis://127.0.0.1:{free_port()}/0", 1, 1)
    with pytest.raises(ValueError, match="exactly one"):
        await RateLimiter.new_redis(None, 1, 1)


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_outage_follows_fail_open_and_recovers(
    redis_server: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture, fail_open: bool
) -> None:
    if not redis_server.can_restart:
        pytest.skip("an external Redis (REDIS_URL) cannot be stopped by the tests")
    caplog.set_level(logging.INFO, logger=rate_limit_module.__name__)
    async with await RateLimiter.new_redis(
        redis_server.url, 1, 60, prefix=prefix, fail_open=fail_open, probe_interval=0
    ) as limiter:
        assert await limiter.check("s")
        assert not await limiter.check("s")
        with redis_server.stopped():
            with anyio.fail_after(5):
                outage = [await limiter.decide("s") for _ in range(5)]
                assert await limiter.get_usage("s") is None
        assert all(d.allowed is fail_open for d in outage)
        if not fail_open:
            assert all(d.retry_after > 0 for d in outage)
        # Restarted empty (and without our script): a fresh bucket, the script reloaded.
        assert await limiter.check("s")
        assert not await limiter.check("s")
    records = [r for r in caplog.records if r.name == rate_limit_module.__name__]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    assert ("allowing" if fail_open else "refusing") in records[0].getMessage()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_frozen_only_the_probe_waits(
    redis_server: RedisServer, prefix: str, fail_open: bool
) -> None:
    if not redis_server.can_restart:
        pytest.skip("an external Redis (REDIS_URL) cannot be frozen by the tests")
    timeout, clock = 0.5, FakeClock()
    async with await RateLimiter.new_redis(
        redis_server.url,
        1000,
        60,
        prefix=prefix,
        fail_open=fail_open,
        command_timeout=timeout,
        probe_interval=5,
        clock=clock,
    ) as limiter:
        assert await limiter.check("s")
        with redis_server.frozen():
            # Nothing is known yet: the checks go to Redis until one has waited too long.
            first = await concurrently(200, lambda: limiter.decide("s"))
            clock.advance(5)  # one check probes; the others do not wait for it
            second = await concurrently(200, lambda: limiter.decide("s"))
        for wave in (first, second):
            assert {decision.allowed for _, decision in wave} == {fail_open}
            waited = [took for took, _ in wave if took > timeout / 2]
            assert 1 <= len(waited) <= 2, sorted(took for took, _ in wave)[-5:]
        assert await limiter.get_usage("s") is None  # within the interval, Redis is not asked
        clock.advance(5)
        usage = await limiter.get_usage("s")  # the probe: the bucket survived the freeze
        assert usage is not None
        assert usage.used >= 1
        assert await limiter.check("s")


async def test_decision_and_usage_are_frozen_values() -> None:
    decision = RateDecision(allowed=True, limit=1, remaining=0, retry_after=0.0, reset_in=1.0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        decision.allowed = False  # type: ignore[misc]
    assert UsageInfo(1, 2, 3.0) == UsageInfo(used=1, remaining=2, reset_in_secs=3.0)
