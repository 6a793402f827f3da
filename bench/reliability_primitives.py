"""Cost of the reliability primitives on their hot paths, in ns per operation.

Each figure is the best of ``--rounds`` runs of ``--n`` operations, next to the baseline it
adds to (the same loop without the primitive), so the difference is what the primitive
costs. The callee is ``async def f(): return 1``: everything measured is overhead.

- ``CircuitBreaker``: a closed breaker around a call (``call``, ``guard``, and the
  explicit ``before_call``/``record_success`` the pipeline uses for streams).
- ``RetryPolicy.call`` when the first attempt succeeds.
- ``Deduplicator.run``: a leader (its call runs in a task the deduplicator owns, so the
  baseline is a task per call) and joiners (batches of ``--batch`` tasks on one key,
  versus as many tasks awaiting one future).
- ``PriorityQueue`` push/pop, and tracemalloc's bytes per queued item, next to the seed's
  claim of ~200 bytes per queued request.

    python bench/reliability_primitives.py [--n 200000] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
import tracemalloc
from typing import TYPE_CHECKING, Any

from orchestrator.enhanced import Priority, PriorityQueue
from orchestrator.enhanced.circuit_breaker import CircuitBreaker
from orchestrator.enhanced.dedup import Deduplicator
from orchestrator.enhanced.retry import RetryPolicy
from orchestrator.types import PromptRequest

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

SEED_BYTES_PER_QUEUED_REQUEST = 200
_LEVELS = (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)


async def one() -> int:
    return 1


# -- async loops: each returns ns per operation ----------------------------------------------


async def bare_await(n: int) -> float:
    fn = one
    start = time.perf_counter_ns()
    for _ in range(n):
        await fn()
    return (time.perf_counter_ns() - start) / n


async def breaker_call(n: int) -> float:
    call = CircuitBreaker(name="bench").call
    fn = one
    start = time.perf_counter_ns()
    for _ in range(n):
        await call(fn)
    return (time.perf_counter_ns() - start) / n


async def breaker_guard(n: int) -> float:
    guard = CircuitBreaker(name="bench").guard
    fn = one
    start = time.perf_counter_ns()
    for _ in range(n):
        async with guard():
            await fn()
    return (time.perf_counter_ns() - start) / n


async def breaker_explicit(n: int) -> float:
    breaker = CircuitBreaker(name="bench")
    before, success, failure = breaker.before_call, breaker.record_success, breaker.record_failure
    fn = one
    start = time.perf_counter_ns()
    for _ in range(n):
        token = before()
        try:
            await fn()
        except BaseException as exc:
            failure(exc, token)
            raise
        success(token)
    return (time.perf_counter_ns() - start) / n


async def retry_call(n: int) -> float:
    call = RetryPolicy().call
    fn = one
    start = time.perf_counter_ns()
    for _ in range(n):
        await call(fn)
    return (time.perf_counter_ns() - start) / n


async def task_per_call(n: int) -> float:
    create_task = asyncio.get_running_loop().create_task
    fn = one
    start = time.perf_counter_ns()
    for _ in range(n):
        await create_task(fn())
    return (time.perf_counter_ns() - start) / n


async def dedup_leader(n: int) -> float:
    run = Deduplicator().run
    fn = one
    start = time.perf_counter_ns()
    for i in range(n):
        await run(i, fn)
    return (time.perf_counter_ns() - start) / n


async def _batches(
    n: int, batch: int, make: Callable[[asyncio.Future[int]], Coroutine[Any, Any, int]]
) -> float:
    loop = asyncio.get_running_loop()
    rounds = max(1, n // batch)
    start = time.perf_counter_ns()
    for _ in range(rounds):
        gate: asyncio.Future[int] = loop.create_future()
        tasks = [loop.create_task(make(gate)) for _ in range(batch)]
        await asyncio.sleep(0)  # every task runs up to its wait
        gate.set_result(1)
        await asyncio.gather(*tasks)
    return (time.perf_counter_ns() - start) / (rounds * batch)


async def dedup_joiners(n: int, batch: int) -> float:
    dedup = Deduplicator()

    def make(gate: asyncio.Future[int]) -> Coroutine[Any, Any, int]:
        async def call() -> int:
            return await gate

        return dedup.run("key", call)  # the first of each batch leads, the rest join

    return await _batches(n, batch, make)


async def shared_future_waiters(n: int, batch: int) -> float:
    async def wait(gate: asyncio.Future[int]) -> int:
        return await gate

    return await _batches(n, batch, wait)


async def queue_op(n: int, *, awaited: bool, pop: bool) -> float:
    """ns per push (into a queue growing to ``n``) or per pop (draining it)."""
    q: PriorityQueue[object] = PriorityQueue()
    item = object()
    levels = [_LEVELS[i & 3] for i in range(n)]
    start = time.perf_counter_ns()
    if awaited:
        for level in levels:
            await q.push(level, item)
        middle = time.perf_counter_ns()
        for _ in levels:
            await q.pop()
    else:
        push_nowait, pop_nowait = q.push_nowait, q.pop_nowait
        for level in levels:
            push_nowait(level, item)
        middle = time.perf_counter_ns()
        for _ in levels:
            pop_nowait()
    end = time.perf_counter_ns()
    return (end - middle if pop else middle - start) / n


# -- memory ----------------------------------------------------------------------------------


def queue_bytes_per_item(n: int, *, aging: bool = False, with_request: bool = False) -> float:
    """Bytes tracemalloc attributes to ``n`` pushes, per item."""
    q: PriorityQueue[object] = PriorityQueue(aging=1.0 if aging else None)
    items: list[object] = [] if with_request else [object() for _ in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        if with_request:  # the request itself is counted: the seed's figure may include it
            for i in range(n):
                q.push_nowait(_LEVELS[i & 3], PromptRequest(session="user-1", input="Hello"))
        else:
            for i, item in enumerate(items):
                q.push_nowait(_LEVELS[i & 3], item)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / n


# -- driver ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="operations per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is kept")
    parser.add_argument("--batch", type=int, default=100, help="callers per dedup key")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    n, rounds, batch = args.n, args.rounds, args.batch

    benches: dict[str, Callable[[], Coroutine[Any, Any, float]]] = {
        "bare": lambda: bare_await(n),
        "task": lambda: task_per_call(n),
        "waiters": lambda: shared_future_waiters(n, batch),
        "call": lambda: breaker_call(n),
        "guard": lambda: breaker_guard(n),
        "explicit": lambda: breaker_explicit(n),
        "retry": lambda: retry_call(n),
        "leader": lambda: dedup_leader(n),
        "joiner": lambda: dedup_joiners(n, batch),
        "push": lambda: queue_op(n, awaited=False, pop=False),
        "pop": lambda: queue_op(n, awaited=False, pop=True),
        "apush": lambda: queue_op(n, awaited=True, pop=False),
        "apop": lambda: queue_op(n, awaited=True, pop=True),
    }
    best = dict.fromkeys(benches, float("inf"))
    for _ in range(rounds):  # interleaved, so drift hits every figure alike
        for name, bench in benches.items():
            best[name] = min(best[name], asyncio.run(bench()))
    bare, task = best["bare"], best["task"]
    rows: list[tuple[str, float, str, float]] = [
        ("CircuitBreaker.call, closed", best["call"], "await f()", bare),
        ("CircuitBreaker.guard, closed", best["guard"], "await f()", bare),
        ("before_call/record_success", best["explicit"], "await f()", bare),
        ("RetryPolicy.call, 1st attempt ok", best["retry"], "await f()", bare),
        ("Deduplicator.run, leader", best["leader"], "await create_task(f())", task),
        (
            f"Deduplicator.run, 1 of {batch} on a key",
            best["joiner"],
            f"{batch} tasks awaiting 1 future",
            best["waiters"],
        ),
    ]
    queue_rows = [
        ("PriorityQueue.push_nowait", best["push"]),
        ("PriorityQueue.pop_nowait", best["pop"]),
        ("await PriorityQueue.push", best["apush"]),
        ("await PriorityQueue.pop", best["apop"]),
    ]
    memory = [
        ("PriorityQueue, per queued item", queue_bytes_per_item(n)),
        ("PriorityQueue(aging=...), per item", queue_bytes_per_item(n, aging=True)),
        ("... plus a PromptRequest per item", queue_bytes_per_item(n, with_request=True)),
    ]

    if args.json:
        out = {label: round(ns, 1) for label, ns, _, _ in rows}
        out.update({label: round(ns, 1) for label, ns in queue_rows})
        out.update({f"{label} (bytes)": round(b, 1) for label, b in memory})
        out["baseline: await f()"] = round(bare, 1)
        print(json.dumps(out))
        return

    print(f"n={n:,} per round, best of {rounds} rounds, ns per operation\n")
    print(f"| {'operation':<38} | {'ns/op':>7} | {'baseline':<30} | {'ns/op':>7} | {'added':>7} |")
    print(f"| {'-' * 38} | {'-' * 6}: | {'-' * 30} | {'-' * 6}: | {'-' * 6}: |")
    for label, ns, base_label, base in rows:
        print(f"| {label:<38} | {ns:>7.0f} | {base_label:<30} | {base:>7.0f} | {ns - base:>7.0f} |")
    for label, ns in queue_rows:
        print(f"| {label:<38} | {ns:>7.0f} | {'':<30} | {'':>7} | {'':>7} |")
    print(f"\n| {'memory (tracemalloc)':<38} | {'bytes':>7} | {'seed claim':>10} |")
    print(f"| {'-' * 38} | {'-' * 6}: | {'-' * 9}: |")
    for label, size in memory:
        seed = f"~{SEED_BYTES_PER_QUEUED_REQUEST}"
        print(f"| {label:<38} | {size:>7.0f} | {seed:>10} |")


if __name__ == "__main__":
    main()
