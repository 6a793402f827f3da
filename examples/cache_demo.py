"""A response cache in front of a worker: the second identical prompt skips the model.

python examples/cache_demo.py                               # in-process cache
REDIS_URL=redis://localhost:6379/0 python examples/cache_demo.py  # shared through Redis
"""

from __future__ import annotations

import asyncio
import os
import time

from orchestrator import EchoWorker
from orchestrator.enhanced.cache import CacheLayer, cache_key


async def answer(cache: CacheLayer, worker: EchoWorker, prompt: str) -> tuple[str, bool]:
    """The worker's answer to ``prompt``, from the cache when it is there."""
    key = cache_key(prompt, "echo")  # the worker's identity is part of the key
    cached = await cache.get(key)
    if cached is not None:
        return cached, True
    text = "".join(await worker.infer(prompt))
    await cache.set(key, text, ttl_seconds=3600)
    return text, False


async def main() -> None:
    url = os.environ.get("REDIS_URL")
    cache = (
        await CacheLayer.new_redis(url, prefix="cache-demo:")
        if url
        else CacheLayer.new_memory(1000, default_ttl=3600)
    )
    worker = EchoWorker.with_delay(50)  # a slow "model"
    async with cache:
        for prompt in ["What is Rust?", "What is Rust?", "What is Python?", "What is Rust?"]:
            start = time.perf_counter()
            text, hit = await answer(cache, worker, prompt)
            took = (time.perf_counter() - start) * 1000
            print(f"{'hit ' if hit else 'miss'} {took:6.1f} ms  {prompt!r} -> {text!r}")
        print(cache.stats())
        print("the seed's key format:", cache_key("What is Rust?"))


if __name__ == "__main__":
    asyncio.run(main())
