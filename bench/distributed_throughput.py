"""Submit + result over a shared Redis versus the in-process pipeline, in one run.

(a) today's in-process pipeline; (b) one frontend (this process) and one worker process
over Redis; (c) one frontend and two worker processes. Each with ``--submitters``
concurrent callers submitting a request and awaiting its result before the next, a
zero-delay EchoWorker, the template ``{input}``; and once more with one caller, for the
latency one request adds. A throwaway ``redis-server`` on a free port (no persistence);
Redis's own ``INFO commandstats`` counts the commands each request cost.

    python bench/distributed_throughput.py [--requests 3000] [--submitters 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import EchoWorker, PipelineConfig, PromptRequest, spawn_pipeline
from orchestrator.distributed import ClusterConfig

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
CONFIG = PipelineConfig(template="{input}", retriever=None, max_concurrency=64)


def zero_echo() -> EchoWorker:
    """The worker processes' factory: ``--worker distributed_throughput:zero_echo``."""
    return EchoWorker.with_delay(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis() -> tuple[subprocess.Popen[bytes], str, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH")
    port = _free_port()
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not _ping(port):
        if time.monotonic() > deadline:
            sys.exit("redis-server did not start")
        time.sleep(0.02)  # a poll for the server to answer PING
    return process, f"redis://127.0.0.1:{port}/0", directory


async def commands(url: str) -> int:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(int(v["calls"]) for k, v in stats.items() if not k.endswith("info"))


async def drive(handles: Any, requests: int, submitters: int) -> tuple[float, list[float]]:
    per = max(1, requests // submitters)
    latencies: list[float] = []

    async def submitter(n: int) -> None:
        for i in range(per):
            start = time.perf_counter()
            ticket = await handles.submit(PromptRequest(f"s{n}", f"request {n} {i}"))
            await ticket.result()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(submitter(n) for n in range(submitters)))
    elapsed = time.perf_counter() - start
    return per * submitters / elapsed, latencies


def summary(rps: float, latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "rps": round(rps),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 3),
    }


async def in_process(requests: int, submitters: int) -> dict[str, float]:
    async with spawn_pipeline(EchoWorker.with_delay(0), CONFIG) as handles:
        await drive(handles, 200, 8)  # warm up
        return summary(*await drive(handles, requests, submitters))


def start_workers(url: str, prefix: str, count: int) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")])}
    command = [
        sys.executable,
        "-m",
        "orchestrator.distributed",
        "--worker",
        "distributed_throughput:zero_echo",
        "--redis-url",
        url,
        "--prefix",
        prefix,
        "--max-concurrency",
        "64",
        "--log-level",
        "warning",
    ]
    return [subprocess.Popen(command, env=env) for _ in range(count)]


async def shared(url: str, workers: int, requests: int, submitters: int) -> dict[str, float]:
    prefix = f"bench{uuid.uuid4().hex[:8]}:"
    processes = start_workers(url, prefix, workers)
    try:
        async with spawn_pipeline(
            None, CONFIG, redis_url=url, role="frontend", cluster=ClusterConfig(prefix=prefix)
        ) as handles:
            await drive(handles, 200, 8)  # warm up (and the workers are up once it is done)
            before = await commands(url)
            rps, latencies = await drive(handles, requests, submitters)
            after = await commands(url)
            result = summary(rps, latencies)
            result["redis_commands_per_request"] = round(
                (after - before - 1) / max(1, len(latencies)), 1
            )
            return result
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    redis, url, directory = start_redis()
    try:
        results: dict[str, Any] = {}
        runs: tuple[tuple[str, Callable[[int, int], Awaitable[dict[str, float]]]], ...] = (
            ("a_in_process", in_process),
            ("b_one_worker", functools.partial(shared, url, 1)),
            ("c_two_workers", functools.partial(shared, url, 2)),
        )
        for label, run in runs:
            results[label] = await run(args.requests, args.submitters)
            results[label + "_1conn"] = await run(max(200, args.requests // 10), 1)
        a, b = results["a_in_process"]["rps"], results["b_one_worker"]["rps"]
        results["b_over_a"] = round(b / a, 3)
        results["added_p50_ms_1conn"] = round(
            results["b_one_worker_1conn"]["p50_ms"] - results["a_in_process_1conn"]["p50_ms"], 3
        )
        return results
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--submitters", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(results))
        return
    for label, value in results.items():
        print(f"{label:<24} {value}")


if __name__ == "__main__":
    main()
