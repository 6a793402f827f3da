"""What a request holds and for how long: deadlines at dispatch, hooks that end with their
request, and what a finished record keeps."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from typing import TYPE_CHECKING

import anyio
import pytest

from orchestrator import (
    EchoWorker,
    PipelineConfig,
    PromptRequest,
    RequestStatus,
    spawn_pipeline,
)
from orchestrator.workers.base import split_tokens

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.anyio


class BusyWorker:
    """Records the loop time each call starts at, then computes for ``busy`` seconds
    without yielding to the event loop (a model running in process)."""

    name = "busy"

    def __init__(self, busy: float) -> None:
        self.busy = busy
        self.starts: dict[str, float] = {}

    async def infer(self, prompt: str) -> list[str]:
        self.starts[prompt] = asyncio.get_running_loop().time()
        time.sleep(self.busy)
        return split_tokens(prompt)

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        for token in await self.infer(prompt):
            yield token


async def test_no_worker_call_starts_after_its_requests_deadline() -> None:
    # One slot, calls of 0.5 ms that never yield, deadlines of 10 ms: most of the burst
    # expires queued, and the deadline timer cannot run while the slot serves the queue
    # back to back. The deadline is checked at dispatch too.
    worker = BusyWorker(0.0005)
    config = PipelineConfig(template="{input}", max_concurrency=1, retriever=None)
    loop = asyncio.get_running_loop()
    deadlines: dict[str, float] = {}
    async with spawn_pipeline(worker, config) as handles:
        tickets = []
        for i in range(200):
            deadlines[f"r{i}"] = loop.time() + 0.01  # no later than the pipeline's own
            tickets.append(await handles.submit(PromptRequest("s", f"r{i}", timeout=0.01)))
        for ticket in tickets:
            await ticket.wait()
    started = {t.request.input: t for t in tickets if t.request.input in worker.starts}
    assert started  # some made it in time
    # The worker reads the clock a few microseconds after the dispatch checked it, and a
    # loaded machine may preempt the process in between: allow 5 ms for that. Without the
    # check, most of the burst started late, up to the whole burst (~100 ms).
    lateness = {p: worker.starts[p] - deadlines[p] for p in started}
    late = {p: f"{s * 1000:.3f} ms" for p, s in lateness.items() if s > 0.005}
    assert late == {}
    statuses = {t.status for t in tickets}
    assert statuses <= {RequestStatus.COMPLETED, RequestStatus.TIMEOUT}
    assert RequestStatus.TIMEOUT in statuses
    expired_unstarted = [t for t in tickets if t.request.input not in worker.starts]
    assert all(t.status is RequestStatus.TIMEOUT for t in expired_unstarted)


class StuckRetriever:
    """An async retriever that never answers the prompts named ``stuck``; counts the calls
    that were cancelled."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.started = asyncio.Event()

    async def __call__(self, request: PromptRequest) -> str:
        if request.input != "stuck":
            return ""
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


@pytest.mark.parametrize("end", ["timeout", "cancel"])
async def test_an_async_hook_ends_with_its_request_and_frees_its_slot(end: str) -> None:
    retriever = StuckRetriever()
    config = PipelineConfig(
        retriever=retriever, template="{input}", stage_concurrency=1, request_timeout=30
    )
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        timeout = 0.05 if end == "timeout" else None
        stuck = await handles.submit(PromptRequest("s", "stuck", timeout=timeout))
        with anyio.fail_after(5):
            await retriever.started.wait()
            if end == "cancel":
                assert await stuck.cancel()
            await stuck.wait()
            # The one RAG slot is free again: a fresh request goes through at once.
            assert await handles.infer("fresh") == "fresh"
    assert stuck.status is (RequestStatus.TIMEOUT if end == "timeout" else RequestStatus.CANCELLED)
    assert retriever.cancelled == 1


async def test_a_finished_record_keeps_its_request_and_result() -> None:
    async with spawn_pipeline(EchoWorker.with_delay(0)) as handles:
        ticket = await handles.submit(PromptRequest("s", "what is kept?"))
        text = await ticket.result()
    assert ticket.text == text
    assert ticket.request.input == "what is kept?"


async def test_tokens_of_a_finished_record_replay_exactly() -> None:
    prompt = "".join(f" w{i}\n" if i % 7 == 0 else f" w{i}" for i in range(500))
    config = PipelineConfig(template="{input}", retriever=None)
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        ticket = await handles.submit(PromptRequest("s", prompt), stream=True)
        live = [token async for token in ticket.tokens()]
        replayed = [token async for token in ticket.tokens()]
    assert live == split_tokens(prompt)
    assert replayed == live
    assert "".join(replayed) == ticket.text == prompt


async def test_retention_is_bounded_by_bytes_oldest_first() -> None:
    prompt = "word " * 40_000  # 200 kB
    config = PipelineConfig(template="{input}", retriever=None, retention_bytes=1_300_000)
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        ids = []
        for i in range(6):
            ticket = await handles.submit(PromptRequest("s", f"{i} {prompt}"))
            await ticket.wait()
            ids.append(ticket.request_id)
        kept = [i for i, request_id in enumerate(ids) if handles.get(request_id) is not None]
    # Each record holds its input, its result and where its 40,000 tokens end (~560 kB):
    # the two newest fit in 1.3 MB.
    assert kept == [4, 5]


async def test_a_big_finished_record_costs_about_its_text_not_forty_times_it() -> None:
    prompt = "word " * 200_000  # 1 MB, 200,000 tokens
    config = PipelineConfig(template="{input}", retriever=None)
    async with spawn_pipeline(EchoWorker.with_delay(0), config) as handles:
        gc.collect()
        tracemalloc.start()
        try:
            ticket = await handles.submit(PromptRequest("s", prompt))
            await ticket.wait()
            del ticket
            gc.collect()
            held, _peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # Result (shared with the joined tokens) 1 MB, token ends 0.8 MB; the prompt itself
    # was allocated before tracing began. A token list would cost over 11 MB.
    assert held < 3_000_000, held
