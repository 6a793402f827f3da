"""``Drain``: what the server does between SIGTERM and exit. Private.

One drain, in this order: admission stops at once (the pipeline's shutdown begins);
requests in flight get ``seconds`` to finish and long-polls keep waiting for them; when
the time is up, whoever still waits is answered (a JSON 503 with the request's id and
status, so the client retries elsewhere) and only then does the pipeline fail what is
left. The server's own graceful-shutdown timeout is set past all of this, so no handler
is cut off with a bare 500.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, final

import anyio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = ["GRACE", "Drain"]

GRACE = 0.25
"""Seconds between answering the waiters and failing the requests left."""


@final
class Drain:
    """The server's drain. ``begin()`` starts it (the server calls it on SIGTERM; the
    lifespan's exit calls it if nobody did); ``over`` is set when the waiting time ends.

    Args:
        seconds: How long requests in flight may take to finish.
        shutdown: Shuts the pipeline down, given a drain timeout; ``None`` when the
            pipeline is borrowed (its owner shuts it down).
    """

    def __init__(self, seconds: float, shutdown: Callable[[float], Awaitable[None]] | None) -> None:
        self.seconds = seconds
        self._shutdown = shutdown
        self._begun = anyio.Event()
        self._over = anyio.Event()
        self._exiting = anyio.Event()

    @property
    def begun(self) -> bool:
        """Whether the server is draining (admission has stopped)."""
        return self._begun.is_set()

    @property
    def owns_pipeline(self) -> bool:
        """Whether the drain shuts the pipeline down (and so knows when it has drained)."""
        return self._shutdown is not None

    @property
    def over(self) -> bool:
        """Whether the time for requests in flight is up."""
        return self._over.is_set()

    def begin(self) -> None:
        """Start draining (idempotent)."""
        self._begun.set()

    async def wait_over(self) -> None:
        """Return when the time for requests in flight is up."""
        await self._over.wait()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Drain]:
        """Own the drain for the server's lifetime; on exit, drain if nobody began to,
        and return once the pipeline (if owned) has shut down."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run)
            try:
                yield self
            finally:
                self._exiting.set()
                self.begin()

    async def _run(self) -> None:
        await self._begun.wait()
        stopped = anyio.Event()
        async with anyio.create_task_group() as tg:
            if self._shutdown is not None:
                tg.start_soon(self._stop, stopped)
            with anyio.move_on_after(self.seconds):
                # A borrowed pipeline drains with its owner; once the server exits, no
                # request of ours is left to wait for.
                await (stopped if self._shutdown is not None else self._exiting).wait()
            self._over.set()

    async def _stop(self, stopped: anyio.Event) -> None:
        assert self._shutdown is not None
        try:
            await self._shutdown(self.seconds + GRACE)
        finally:
            stopped.set()
