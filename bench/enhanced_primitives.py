"""Cost of the cache and the rate limiters, next to the seed's claims.

ns per operation (the best of ``--rounds`` runs of ``--n`` operations; Redis operations,
being round trips, run ``--n-redis`` times) for:

- ``CacheLayer.get`` (hit, miss) and ``set``, on the memory and Redis backends;
- ``RateLimiter.check`` on each backend (simple, governor, redis), over ``--sessions``
  distinct sessions in turn, every check allowed;
- ``cache_key`` of a 200-character prompt, alone and with two parts.

Memory, by tracemalloc, of what the structures add (keys, values and session strings are
made before tracing starts, and reported beside): bytes per cache entry (memory backend)
and per limiter session (simple, governor); and Redis's own ``MEMORY USAGE`` of one cache
entry and one limiter bucket. Seed claims: a rate-limit check under 10 µs, ~1 KB per cache
entry, ~100 bytes per limiter session.

Redis: a throwaway ``redis-server`` on a free loopback port (as tests/redis_server.py
does), or ``$REDIS_URL`` when there is no binary; without either the Redis rows are left
out.

    python bench/enhanced_primitives.py [--n 100000] [--n-redis 5000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc
from typing import TYPE_CHECKING, TypeVar

from redis.asyncio import Redis

from orchestrator.enhanced.cache import CacheLayer, cache_key
from orchestrator.enhanced.rate_limit import RateLimiter

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

PROMPT = ("Summarise the following support ticket in two sentences. " * 4)[:200]
VALUE = ("The customer cannot log in after the update; a password reset did not help. " * 3)[:200]
PREFIX = "bench:"

PARTS = ("openai:gpt-4o", "temperature=0.2")
BIG = 10**9  # checks: a limit never reached and a refill of 1 token/s, so every bucket
# stays in use (a bucket that refills completely between checks is dropped and made anew)
DAY = 86_400.0  # memory rows: no bucket refills while they are being built
T = TypeVar("T")


# -- a throwaway Redis -------------------------------------------------------------------------


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    """The URL of a Redis to measure against, or ``None`` when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield os.environ.get("REDIS_URL")
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.01)  # poll interval; PING decides
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=5)


# -- timed loops: each returns ns per operation ------------------------------------------------


async def _per_op(n: int, op: Callable[[int], Awaitable[object]]) -> float:
    start = time.perf_counter_ns()
    for i in range(n):
        await op(i)
    return (time.perf_counter_ns() - start) / n


async def cache_ops(make: Callable[[], Awaitable[CacheLayer]], n: int) -> dict[str, float]:
    keys = [cache_key(f"{PROMPT} {i}") for i in range(min(n, 10_000))]
    misses = [cache_key(f"missing {i}") for i in range(len(keys))]
    k = len(keys)
    async with await make() as cache:
        set_ns = await _per_op(n, lambda i: cache.set(keys[i % k], VALUE, 3600))
        hit_ns = await _per_op(n, lambda i: cache.get(keys[i % k]))
        miss_ns = await _per_op(n, lambda i: cache.get(misses[i % k]))
    return {"set": set_ns, "get hit": hit_ns, "get miss": miss_ns}


async def limiter_checks(
    make: Callable[[], Awaitable[RateLimiter]], n: int, sessions: int
) -> float:
    names = [f"user-{i}" for i in range(sessions)]
    async with await make() as limiter:
        check = limiter.check
        for name in names:  # every bucket exists before timing
            await check(name)
        return await _per_op(n, lambda i: check(names[i % sessions]))


def key_ns(n: int, *parts: str) -> float:
    prompts = [f"{PROMPT}{i}" for i in range(1000)]
    start = time.perf_counter_ns()
    for i in range(n):
        cache_key(prompts[i % 1000], *parts)
    return (time.perf_counter_ns() - start) / n


# -- memory --------------------------------------------------------------------------------------


def _traced(build: Callable[[], Awaitable[object]]) -> int:
    """Bytes still allocated after ``build`` ran (what it built is kept alive meanwhile)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = asyncio.run(_keep(build))
        gc.collect()
        size = tracemalloc.get_traced_memory()[0] - before
        del kept
    finally:
        tracemalloc.stop()
    return size


async def _keep(build: Callable[[], Awaitable[object]]) -> object:
    return await build()


def cache_entry_bytes(entries: int) -> tuple[float, float]:
    """(bytes per entry the cache adds, bytes of its key and value strings)."""
    keys = [cache_key(f"{PROMPT} {i}") for i in range(entries)]
    values = [f"{VALUE[:-8]}{i:08d}" for i in range(entries)]

    async def build() -> CacheLayer:
        cache = CacheLayer.new_memory(entries)
        for key, value in zip(keys, values, strict=True):
            await cache.set(key, value, 3600)
        return cache

    strings = sys.getsizeof(keys[0]) + sys.getsizeof(values[0])
    return _traced(build) / entries, strings


def session_bytes(make: Callable[[], RateLimiter], sessions: int) -> tuple[float, float]:
    """(bytes per session the limiter adds, bytes of a session string)."""
    names = [f"user-{i:06d}" for i in range(sessions)]

    async def build() -> RateLimiter:
        limiter = make()
        for name in names:
            await limiter.check(name)
        return limiter

    return _traced(build) / sessions, sys.getsizeof(names[0])


async def redis_memory(url: str) -> tuple[int, int]:
    """Redis's MEMORY USAGE of one cache entry and one limiter bucket."""
    client = Redis.from_url(url)
    try:
        async with await CacheLayer.new_redis(client=client, prefix=PREFIX) as cache:
            key = cache_key(PROMPT)
            await cache.set(key, VALUE, 3600)
            entry = int(await client.memory_usage(PREFIX + key) or 0)
        async with await RateLimiter.new_redis(None, 100, 60, client=client, prefix=PREFIX) as rl:
            await rl.check("user-000001")
            bucket = int(await client.memory_usage(PREFIX + "user-000001") or 0)
        await client.flushdb()
        return entry, bucket
    finally:
        await client.aclose()


# -- report ------------------------------------------------------------------------------------


async def _ready(value: T) -> T:
    return value


def _fmt_ns(ns: float) -> str:
    return f"{ns / 1000:,.1f} µs" if ns >= 10_000 else f"{ns:,.0f} ns"


class Report:
    """Rows of (what, measured, the seed's claim), and the raw numbers for ``--json``."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.values: dict[str, float] = {}

    def add(self, name: str, value: float, shown: str, claim: str = "") -> None:
        self.values[name] = round(value, 1)
        self.rows.append((name, shown, claim))

    def print(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        shown = max(len(r[1]) for r in self.rows)
        print(f"{'operation':<{width}}  {'measured':>{shown}}  seed's claim")
        for name, value, claim in self.rows:
            print(f"{name:<{width}}  {value:>{shown}}  {claim}")


def measure(args: argparse.Namespace, url: str | None, report: Report) -> None:
    n, rounds, sessions = args.n, args.rounds, args.sessions

    caches: list[tuple[str, Callable[[], Awaitable[CacheLayer]], int]] = [
        ("memory", lambda: _ready(CacheLayer.new_memory(n + 20_000)), n)
    ]
    limiters: list[tuple[str, Callable[[], Awaitable[RateLimiter]], int]] = [
        ("simple", lambda: _ready(RateLimiter(BIG, BIG)), n),
        ("governor", lambda: _ready(RateLimiter.new_governor(BIG, BIG)), n),
    ]
    if url is not None:
        caches.append(("redis", lambda: CacheLayer.new_redis(url, prefix=PREFIX), args.n_redis))
        limiters.append(
            ("redis", lambda: RateLimiter.new_redis(url, BIG, BIG, prefix=PREFIX), args.n_redis)
        )

    for name, make_cache, ops in caches:
        runs = [asyncio.run(cache_ops(make_cache, ops)) for _ in range(rounds)]
        for op in runs[0]:
            ns = min(run[op] for run in runs)
            report.add(f"cache {op}, {name}", ns, _fmt_ns(ns))
    for name, make_limiter, ops in limiters:
        ns = min(asyncio.run(limiter_checks(make_limiter, ops, sessions)) for _ in range(rounds))
        report.add(f"rate limit check, {name}", ns, _fmt_ns(ns), "< 10 µs")

    for label, parts in (("cache_key(200-char prompt)", ()), ("cache_key(prompt, 2 parts)", PARTS)):
        ns = min(key_ns(n, *parts) for _ in range(rounds))
        report.add(label, ns, _fmt_ns(ns))

    entry, strings = cache_entry_bytes(args.entries)
    shown = f"{entry:,.0f} B + {strings:.0f} B key+value"
    report.add("bytes per cache entry, memory", entry, shown, "~1 KB")
    factories: tuple[tuple[str, Callable[[], RateLimiter]], ...] = (
        ("simple", lambda: RateLimiter(100, DAY)),
        ("governor", lambda: RateLimiter.new_governor(100, DAY)),
    )
    for name, factory in factories:
        per_session, name_bytes = session_bytes(factory, args.entries)
        shown = f"{per_session:,.0f} B + {name_bytes:.0f} B session id"
        report.add(f"bytes per limiter session, {name}", per_session, shown, "~100 B")
    if url is not None:
        entry_r, bucket_r = asyncio.run(redis_memory(url))
        report.add("Redis MEMORY USAGE, cache entry", entry_r, f"{entry_r} B")
        report.add("Redis MEMORY USAGE, limiter bucket", bucket_r, f"{bucket_r} B")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="in-process operations per round")
    parser.add_argument("--n-redis", type=int, default=5_000, help="Redis operations per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best is kept")
    parser.add_argument("--sessions", type=int, default=10_000, help="distinct sessions checked")
    parser.add_argument("--entries", type=int, default=100_000, help="entries for memory rows")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    report = Report()
    with redis_server() as url:
        measure(args, url, report)
    if args.json:
        print(json.dumps(report.values, indent=2))
        return
    report.print()
    if url is None:
        print("(no redis-server binary and no REDIS_URL: the Redis rows are left out)")


if __name__ == "__main__":
    main()
