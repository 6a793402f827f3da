"""The ``ModelWorker`` protocol and ``EchoWorker``, the worker that needs no model."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Protocol, final, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["EchoWorker", "ModelWorker", "split_tokens", "worker_name"]


@runtime_checkable
class ModelWorker(Protocol):
    """What the Inference stage calls. Implement both methods; tokens concatenate to the text.

    ``stream`` yields tokens as the model produces them (the pipeline uses it, so tokens
    reach ``Ticket.tokens()`` live); ``infer`` returns them all at once. Raise
    ``InferenceError`` for failures (``retryable=True`` for the ones worth retrying). A
    worker may also define ``name`` (used in metrics and errors) and ``cache_identity``
    (what, beside the prompt, changes its answers: model, temperature, ...).
    """

    async def infer(self, prompt: str) -> list[str]:
        """Return the whole completion of ``prompt`` as a list of tokens."""
        ...

    def stream(self, prompt: str) -> AsyncIterator[str]:
        """Yield the completion of ``prompt`` token by token as it is produced."""
        ...


def worker_name(worker: object) -> str:
    """The worker's ``name`` attribute, or its class name."""
    name = getattr(worker, "name", None)
    return name if isinstance(name, str) else type(worker).__name__


_TOKEN = re.compile(r"\s*\S+|\s+")


def split_tokens(text: str) -> list[str]:
    """Split ``text`` into words, each with its leading whitespace: ``"".join`` restores it."""
    return _TOKEN.findall(text)


@final
class EchoWorker:
    """Echoes the prompt back after a delay, word by word; for demos, tests and benchmarks.

    Args:
        delay: Seconds to wait before answering (default 10 ms, like the seed's worker).

    Example:
        >>> import asyncio
        >>> asyncio.run(EchoWorker.with_delay(0).infer("Hello  world"))
        ['Hello', '  world']
    """

    name = "echo"
    cache_identity = "echo"

    def __init__(self, delay: float = 0.010) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay}")
        self.delay = delay

    @classmethod
    def with_delay(cls, ms: float) -> EchoWorker:
        """An ``EchoWorker`` that waits ``ms`` milliseconds (0: answers without yielding)."""
        return cls(delay=ms / 1000)

    def __repr__(self) -> str:
        return f"EchoWorker(delay={self.delay!r})"

    async def infer(self, prompt: str) -> list[str]:
        """Return the prompt's tokens after the delay."""
        if self.delay:
            await asyncio.sleep(self.delay)
        return split_tokens(prompt)

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        """Yield the prompt's tokens after the delay."""
        if self.delay:
            await asyncio.sleep(self.delay)
        for token in split_tokens(prompt):
            yield token
