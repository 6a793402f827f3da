"""Deduplication, retries and a circuit breaker around a flaky model call, in one run.

python examples/reliability_demo.py
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from orchestrator import metrics
from orchestrator.enhanced.circuit_breaker import CircuitBreaker
from orchestrator.enhanced.dedup import Deduplicator
from orchestrator.enhanced.retry import RetryPolicy
from orchestrator.errors import CircuitOpen, InferenceError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class FlakyModel:
    """A stand-in for a provider: fails with a retryable 503 while ``down`` is positive."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = 0

    async def infer(self, prompt: str) -> str:
        self.calls += 1
        await asyncio.sleep(0.05)
        if self.down > 0:
            self.down -= 1
            raise InferenceError(
                "503 Service Unavailable", worker="flaky", status_code=503, retryable=True
            )
        return f"answer to {prompt!r}"

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        self.calls += 1
        for word in ("streamed", " answer", " to", f" {prompt!r}"):
            await asyncio.sleep(0.02)
            yield word


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="  log: %(message)s")
    model = FlakyModel()
    dedup = Deduplicator(result_ttl=1.0)
    retry = RetryPolicy(max_attempts=3, backoff="exponential", base_delay=0.05, max_delay=0.5)
    breaker = CircuitBreaker(
        failure_threshold=3, half_open_max_calls=1, open_timeout=0.3, name="flaky"
    )

    async def ask(prompt: str) -> str:
        # dedup outside (identical prompts share everything below), retry around the
        # breaker (each attempt asks it; CircuitOpen is never retried).
        return await dedup.run(
            prompt,
            lambda: retry.call(lambda: breaker.call(lambda: model.infer(prompt)), worker="flaky"),
        )

    print("1. Five identical prompts at once share one call:")
    answers = await asyncio.gather(*(ask("What is 2+2?") for _ in range(5)))
    print(f"   {answers[0]}  x{len(answers)}, model calls: {model.calls}")
    again = await ask("What is 2+2?")
    print(f"   within result_ttl a sixth costs no call: {again}, model calls: {model.calls}")

    print("2. Two 503s, retried with backoff:")
    model.down, model.calls = 2, 0
    print(f"   {await ask('Hello?')}, model calls: {model.calls}")

    print("3. The backend stays down: retries run out, the breaker opens, calls fail fast:")
    model.down = 100
    for prompt in ("a", "b"):
        with contextlib.suppress(InferenceError):
            await ask(prompt)
    print(f"   breaker: {breaker.state}, gauge {metrics.CIRCUIT_STATE.value('flaky'):.0f}")
    try:
        await ask("c")
    except CircuitOpen as exc:
        print(f"   refused without a call: {exc} (retry_after={exc.retry_after:.2f}s)")

    print("4. The backend heals; after open_timeout one probe closes the breaker:")
    model.down = 0
    await asyncio.sleep(0.3)
    print(f"   breaker: {breaker.state}; {await ask('d')}; breaker: {breaker.state}")

    print("5. Streams are shared too: a late joiner gets the tokens it missed:")
    model.calls = 0

    async def listen(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        tokens = [t async for t in dedup.stream("Hi", lambda: model.stream("Hi"))]
        print(f"   {name}: {''.join(tokens)!r}")

    await asyncio.gather(listen("first", 0.0), listen("late", 0.05))
    print(f"   model calls: {model.calls}")
    retries = metrics.RETRIES.value("flaky")
    joins = metrics.DEDUP_JOINS.value()
    print(f"metrics: {retries:.0f} retries, {joins:.0f} dedup joins")
    await dedup.aclose()


if __name__ == "__main__":
    asyncio.run(main())
