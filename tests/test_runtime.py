"""The runtime: one task group owns every task of a pipeline. When it stops, nothing of it
is left running, a stuck hook or call does not hold shutdown past its drain timeout, and a
stage that crashes fails the requests left instead of losing them."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import anyio
import pytest

from orchestrator import (
    PipelineClosed,
    PipelineConfig,
    PromptRequest,
    RequestStatus,
    spawn_pipeline,
)
from orchestrator.enhanced import CircuitBreaker, RetryPolicy
from orchestrator.workers.base import split_tokens

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from orchestrator.types import PostOutput

pytestmark = pytest.mark.anyio


class StuckWorker:
    """Answers at once, except the prompts containing ``stuck``: those never answer."""

    name = "stuck"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.waiting = 0
        self.in_flight = asyncio.Event()

    async def _maybe_stuck(self, prompt: str, method: str) -> None:
        self.calls.append(method)
        if "stuck" in prompt:
            self.waiting += 1
            self.in_flight.set()
            await asyncio.Event().wait()

    async def infer(self, prompt: str) -> list[str]:
        await self._maybe_stuck(prompt, "infer")
        return split_tokens(prompt)

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        await self._maybe_stuck(prompt, "stream")
        for token in split_tokens(prompt):
            yield token


class Held:
    """Async hooks (a retriever, a post processor, a sink) that never return for the
    requests named after them; ``started[name]`` is set when one is in flight."""

    def __init__(self) -> None:
        self.started = {name: asyncio.Event() for name in ("rag", "post", "sink")}

    async def _hold(self, name: str, request: PromptRequest) -> None:
        if request.input == f"held in {name}":
            self.started[name].set()
            await asyncio.Event().wait()

    async def retriever(self, request: PromptRequest) -> str:
        await self._hold("rag", request)
        return ""

    async def post(self, request: PromptRequest, text: str) -> str:
        await self._hold("post", request)
        return text

    async def sink(self, output: PostOutput) -> None:
        await self._hold("sink", output.request)


async def test_no_task_of_the_pipeline_remains_after_it_exits() -> None:
    before = asyncio.all_tasks()
    worker = StuckWorker()
    held = Held()
    config = PipelineConfig(
        template="{input}",
        retriever=held.retriever,
        post_processors=[held.post],
        sinks=[held.sink],
        dedup=True,
        retry=RetryPolicy(max_attempts=3, base_delay=0.0),
        circuit_breaker=CircuitBreaker(name="runtime-test"),
        drain_timeout=0.05,
    )
    async with spawn_pipeline(worker, config) as handles:
        tickets = [
            await handles.submit(PromptRequest("s", "held in rag")),
            await handles.submit(PromptRequest("s", "held in post")),
            await handles.submit(PromptRequest("s", "held in sink")),
            await handles.submit(PromptRequest("s", "stuck call")),  # a dedup leader...
            await handles.submit(PromptRequest("s", "stuck call")),  # ...and its joiner
            await handles.submit(PromptRequest("s", "stuck stream"), stream=True),
            await handles.submit(PromptRequest("s", "fine")),
        ]
        with anyio.fail_after(5):
            for started in held.started.values():
                await started.wait()
            assert await tickets[-1].result() == "fine"
            while worker.waiting < 2:  # the shared call and the stream
                worker.in_flight.clear()
                await worker.in_flight.wait()
        await anyio.wait_all_tasks_blocked()
        assert sorted(worker.calls) == ["infer", "infer", "infer", "infer", "stream"]
        during = asyncio.all_tasks() - before
        assert during  # the pipeline's tasks, the dedup leaders and the hooks
    left = asyncio.all_tasks() - before
    assert left == set(), sorted(t.get_name() for t in left)
    assert [t.status for t in tickets[:-1]] == [RequestStatus.FAILED] * 6
    assert all(isinstance(t.error, PipelineClosed) for t in tickets[:-1])


async def test_a_hook_that_never_returns_does_not_hold_shutdown_past_its_drain() -> None:
    held = Held()
    config = PipelineConfig(template="{input}", retriever=held.retriever)
    handles = spawn_pipeline(StuckWorker(), config)
    ticket = await handles.submit(PromptRequest("s", "held in rag"))
    with anyio.fail_after(5):
        await held.started["rag"].wait()
    shutting = asyncio.create_task(handles.shutdown(drain_timeout=0.05))
    done, _ = await asyncio.wait({shutting}, timeout=5)
    assert shutting in done, "shutdown waited for the hook"
    assert ticket.status is RequestStatus.FAILED
    assert isinstance(ticket.error, PipelineClosed)


class Crash(BaseException):
    """Not an ``Exception``: what no stage catches (a bug, a ``SystemExit``)."""


async def test_a_stage_crash_fails_the_requests_left_and_shutdown_raises_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class CrashingWorker(StuckWorker):
        async def infer(self, prompt: str) -> list[str]:
            if "crash" in prompt:
                raise Crash("a bug")
            return await super().infer(prompt)

    worker = CrashingWorker()
    config = PipelineConfig(template="{input}", max_concurrency=2)
    handles = spawn_pipeline(worker, config)
    stuck = await handles.submit(PromptRequest("s", "stuck"))
    with anyio.fail_after(5):
        await worker.in_flight.wait()
    with caplog.at_level(logging.ERROR, logger="orchestrator.pipeline"):
        crashing = await handles.submit(PromptRequest("s", "crash"))
        with anyio.fail_after(5):
            await crashing.wait()
            await stuck.wait()
    assert handles.closed
    with pytest.raises(PipelineClosed):
        await handles.submit(PromptRequest("s", "after"))
    for ticket in (crashing, stuck):
        assert ticket.status is RequestStatus.FAILED
        assert isinstance(ticket.error, PipelineClosed)
        assert isinstance(ticket.error.__cause__, Crash)
    assert "pipeline stage crashed" in caplog.text
    with anyio.fail_after(5), pytest.raises(Crash, match="a bug"):
        await handles.shutdown()  # the crash itself, not an exception group
    with anyio.fail_after(5), pytest.raises(Crash):
        await handles.shutdown()  # every time
