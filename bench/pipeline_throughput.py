"""Requests/s through the whole pipeline versus a bare five-stage ``asyncio.Queue`` chain.

Both runs use the same submitters (many concurrent tasks, each submitting one request and
awaiting its result before the next) in the same process, so their ratio is meaningful on
a noisy machine. The bare chain does only the five hand-offs: the floor cost in Python.

    python bench/pipeline_throughput.py [--requests 50000] [--submitters 256] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from orchestrator import EchoWorker, PipelineConfig, PromptRequest, spawn_pipeline

_STOP = object()


async def bare_chain(requests: int, submitters: int) -> float:
    """Five ``asyncio.Queue`` stages; the last resolves the submitter's future."""
    sizes = (512, 512, 1024, 512, 256)
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue(n) for n in sizes]

    async def stage(i: int) -> None:
        inbox = queues[i]
        outbox = queues[i + 1] if i + 1 < len(queues) else None
        while True:
            item = await inbox.get()
            if outbox is None:
                item[1].set_result(item[0])
            else:
                await outbox.put(item)

    loop = asyncio.get_running_loop()
    per = requests // submitters

    async def submitter() -> None:
        for _ in range(per):
            fut = loop.create_future()
            await queues[0].put(("Hello world", fut))
            await fut

    tasks = [asyncio.create_task(stage(i)) for i in range(len(queues))]
    start = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(submitters)))
    elapsed = time.perf_counter() - start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return per * submitters / elapsed


async def pipeline(requests: int, submitters: int) -> float:
    """The orchestrator pipeline with a zero-delay EchoWorker, default config."""
    per = requests // submitters
    async with spawn_pipeline(EchoWorker.with_delay(0), PipelineConfig()) as handles:

        async def submitter(n: int) -> None:
            session = f"user-{n}"
            for _ in range(per):
                ticket = await handles.submit(PromptRequest(session, "Hello world"))
                await ticket.result()

        start = time.perf_counter()
        await asyncio.gather(*(submitter(n) for n in range(submitters)))
        elapsed = time.perf_counter() - start
    return per * submitters / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--submitters", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    bare: list[float] = []
    ours: list[float] = []
    for _ in range(args.rounds):  # interleaved, so drift hits both alike
        bare.append(asyncio.run(bare_chain(args.requests, args.submitters)))
        ours.append(asyncio.run(pipeline(args.requests, args.submitters)))
    b, o = statistics.median(bare), statistics.median(ours)
    if args.json:
        print(json.dumps({"bare_chain_rps": round(b), "pipeline_rps": round(o), "ratio": o / b}))
        return
    runs = {"bare asyncio.Queue chain": bare, "orchestrator pipeline": ours}
    for label, values in runs.items():
        listed = ", ".join(f"{x:,.0f}" for x in values)
        print(f"{label:<25}: {statistics.median(values):>10,.0f} req/s  (runs: {listed})")
    print(f"{'ratio':<25}: {o / b:.0%} of the bare chain")


if __name__ == "__main__":
    main()
