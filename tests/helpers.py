"""Workers and tools the tests share."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, TypeVar

import anyio

from orchestrator.workers.base import split_tokens

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

T = TypeVar("T")


class GateWorker:
    """Records every prompt it receives and answers only when its gate opens.

    ``started`` is set whenever a call begins; ``cancelled`` counts calls that were
    cancelled while waiting; ``fail_with`` makes calls raise.
    """

    name = "gate"

    def __init__(self, *, open_: bool = False) -> None:
        self.gate = asyncio.Event()
        if open_:
            self.gate.set()
        self.prompts: list[str] = []
        self.started = asyncio.Event()
        self.cancelled = 0
        self.active = 0
        self.fail_with: Exception | None = None
        self.token_gates: list[asyncio.Event] | None = None

    async def infer(self, prompt: str) -> list[str]:
        return [t async for t in self.stream(prompt)]

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        self.prompts.append(prompt)
        self.active += 1
        self.started.set()
        try:
            await self.gate.wait()
            if self.fail_with is not None:
                raise self.fail_with
            for i, token in enumerate(split_tokens(prompt)):
                if self.token_gates is not None and i < len(self.token_gates):
                    await self.token_gates[i].wait()
                yield token
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def wait_started(self, calls: int) -> None:
        while len(self.prompts) < calls:
            self.started.clear()
            await self.started.wait()


def prompt_for(text: str) -> str:
    """The prompt the default retriever and template make for ``text``."""
    return f"CONTEXT: Retrieved documents for '{text[:50]}'\n\nUser Query: {text}\n\nAssistant:"


async def concurrently(n: int, call: Callable[[], Awaitable[T]]) -> list[tuple[float, T]]:
    """Start ``n`` calls at once: each one's (seconds it took, answer), in finishing order."""
    done: list[tuple[float, T]] = []

    async def one() -> None:
        start = time.monotonic()
        answer = await call()
        done.append((time.monotonic() - start, answer))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
    return done
