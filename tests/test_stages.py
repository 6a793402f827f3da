"""The stage loops and what they share: which task works on which job (Running), the tasks
of async hooks (HookTasks), how jobs end (Endings), a hook stage's closing, and the
Inference stage's calls: streaming decided at submit, a cancel reaching the call."""

from __future__ import annotations

import asyncio
import gc
import math
from typing import TYPE_CHECKING

import anyio
import pytest

from orchestrator import (
    PipelineConfig,
    PromptRequest,
    RequestCancelled,
    RequestStatus,
    RequestTimeout,
    StageError,
    metrics,
    spawn_pipeline,
)
from orchestrator._channel import Channel
from orchestrator._job import Job
from orchestrator._stages import Endings, HookStage, HookTasks, Running, store_str
from orchestrator._store import MemoryStore
from orchestrator._work_queue import MemoryWorkQueue
from orchestrator.enhanced.priority import Priority
from orchestrator.errors import InferenceError
from orchestrator.workers.base import split_tokens
from tests.helpers import GateWorker, prompt_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from orchestrator.types import RequestStatus as Status

pytestmark = pytest.mark.anyio


def _store() -> MemoryStore:
    return MemoryStore(retention_seconds=60, retention_max=100, retention_bytes=10**9)


def _job(store: MemoryStore, text: str = "x") -> Job:
    request = PromptRequest("s", text)
    return Job(store.create_nowait(request), request, Priority.NORMAL, math.inf)


async def _forever() -> None:
    await asyncio.Event().wait()


# -- Running -------------------------------------------------------------------------------


async def test_interrupt_cancels_the_task_working_on_the_job() -> None:
    running = Running()
    task = asyncio.create_task(_forever())
    running.begin("r1", task)
    assert running.interrupt("other") is False
    assert running.interrupt("r1", RequestStatus.CANCELLED) is True
    with anyio.fail_after(5), pytest.raises(asyncio.CancelledError):
        await task


async def test_interrupt_spares_the_caller_itself() -> None:
    # A slot that ends its own job (a failure, a deadline at dispatch) must not cancel itself.
    running = Running()

    async def own_job() -> bool:
        me = asyncio.current_task()
        assert me is not None
        running.begin("r1", me)
        return running.interrupt("r1")

    with anyio.fail_after(5):
        assert await asyncio.create_task(own_job()) is False


async def test_unwound_waits_until_the_task_is_done_with_the_job() -> None:
    running = Running()
    with anyio.fail_after(5):
        await running.unwound("r1", 30)  # nothing works on it: at once
    task = asyncio.create_task(_forever())
    running.begin("r1", task)
    waiting = asyncio.create_task(running.unwound("r1", 30))
    await anyio.wait_all_tasks_blocked()
    assert not waiting.done()
    running.end("r1")
    with anyio.fail_after(5):
        await waiting
    task.cancel()


async def test_unwound_gives_up_after_within() -> None:
    running = Running()
    task = asyncio.create_task(_forever())
    running.begin("r1", task)
    with anyio.fail_after(5):
        await running.unwound("r1", 0.01)
    assert not task.done()
    task.cancel()


# -- HookTasks -----------------------------------------------------------------------------


async def test_hook_tasks_are_bounded_and_a_release_lets_the_next_in() -> None:
    hooks = HookTasks(2)
    with anyio.fail_after(5):
        await hooks.acquire()
        await hooks.acquire()
    third = asyncio.create_task(hooks.acquire())
    await anyio.wait_all_tasks_blocked()
    assert not third.done()
    hooks.release()
    with anyio.fail_after(5):
        await third


async def test_closing_hook_tasks_cancels_or_waits_for_them() -> None:
    hooks = HookTasks(2)
    gate = asyncio.Event()
    ended: list[str] = []

    async def hook(name: str) -> None:
        try:
            await gate.wait()
            ended.append(f"{name} done")
        except asyncio.CancelledError:
            ended.append(f"{name} cancelled")
            raise

    hooks.start(hook("a"))
    await anyio.wait_all_tasks_blocked()
    with anyio.fail_after(5):
        await hooks.close(cancel=True)
    hooks.start(hook("b"))
    waiting = asyncio.create_task(hooks.close(cancel=False))
    await anyio.wait_all_tasks_blocked()
    assert not waiting.done()
    gate.set()
    with anyio.fail_after(5):
        await waiting
    assert ended == ["a cancelled", "b done"]


# -- Endings -------------------------------------------------------------------------------


class LeasingQueue:
    """A work queue whose leases need acknowledging, as a shared one's do; only ``ack``
    matters here."""

    acknowledges = True

    def __init__(self) -> None:
        self.acked: list[str] = []

    async def put(self, job: Job) -> Job | None:
        raise AssertionError("not used")

    async def take(self) -> Job | None:
        raise AssertionError("not used")

    async def ack(self, job: Job) -> None:
        self.acked.append(job.request.input)

    async def release(self, job: Job) -> None:
        raise AssertionError("not used")

    def close(self) -> None:
        raise AssertionError("not used")


def _errors(stage: str, err_type: str) -> float:
    labels = {"stage": stage, "err_type": err_type}
    return metrics.REGISTRY.get_sample_value("orchestrator_errors_total", labels) or 0.0


async def test_endings_finish_through_the_store_once_and_count_the_error() -> None:
    store = _store()
    endings = Endings(store, MemoryWorkQueue(1))
    job = _job(store)
    before = _errors("post", "InferenceError")
    error = InferenceError("x")
    await endings.fail(job, "post", error)
    await endings.fail(job, "post", InferenceError("again"))  # finished already: not counted
    assert _errors("post", "InferenceError") - before == 1
    assert (job.record.status, job.record.error) == (RequestStatus.FAILED, error)


async def test_endings_complete_with_the_output_and_expire_with_request_timeout() -> None:
    store = _store()
    endings = Endings(store, MemoryWorkQueue(1))
    done, late = _job(store), _job(store)
    done.output = "the answer"
    await endings.complete(done)
    await endings.expire(late.id)
    assert (done.record.status, done.record.result) == (RequestStatus.COMPLETED, "the answer")
    assert late.record.status is RequestStatus.TIMEOUT
    assert isinstance(late.record.error, RequestTimeout)


async def test_endings_acknowledge_leases_only_past_the_work_queue() -> None:
    store = _store()
    queue = LeasingQueue()
    endings = Endings(store, queue)
    jobs = {name: _job(store, name) for name in ("rag", "inference", "post", "skip-a", "skip-s")}
    await endings.fail(jobs["rag"], "rag", InferenceError("x"))  # never reached the queue
    await endings.fail(jobs["inference"], "inference", InferenceError("x"))
    jobs["post"].output = "out"
    await endings.complete(jobs["post"])
    await endings.skip(jobs["skip-a"], "assemble")
    await endings.skip(jobs["skip-s"], "stream")
    assert queue.acked == ["inference", "post", "skip-s"]
    assert jobs["post"].record.status is RequestStatus.COMPLETED


# -- a hook stage --------------------------------------------------------------------------


class HeldHook:
    """An async hook that holds each job until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled: list[str] = []

    async def __call__(self, job: Job) -> str:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(job.id)
            raise
        return "context"


def _rag_stage(store: MemoryStore, hook: HeldHook) -> tuple[HookStage, Channel[Job]]:
    inbox: Channel[Job] = Channel(4)
    outbox: Channel[Job] = Channel(4)
    stage = HookStage(
        "rag",
        inbox,
        outbox,
        hook,
        store_str("context", "retriever"),
        concurrency=2,
        endings=Endings(store, MemoryWorkQueue(1)),
        running=Running(),
    )
    return stage, outbox


async def test_a_drained_stage_forwards_its_hooks_work_before_closing_its_outbox() -> None:
    store = _store()
    hook = HeldHook()
    stage, outbox = _rag_stage(store, hook)
    job = _job(store)
    stage.inbox.put_nowait(job)
    stage.inbox.close()  # its input ends with one job, held in a hook
    task = asyncio.create_task(stage.run())
    with anyio.fail_after(5):
        await hook.started.wait()
    await anyio.wait_all_tasks_blocked()
    assert not task.done()
    assert not outbox.closed
    hook.release.set()
    with anyio.fail_after(5):
        await task
    assert list(outbox.items) == [job]
    assert job.context == "context"
    assert outbox.closed


@pytest.mark.parametrize("stop", ["scope", "task"])
async def test_a_stage_stopped_while_draining_cancels_the_hooks_in_hand(stop: str) -> None:
    # Once the drain timeout passed the runtime cancels its task group (``scope``); the loop
    # closing cancels tasks natively (``task``). A stage whose inbox had ended, waiting for a
    # hook that never returns, must stop either way, its hook cancelled: not hang shutdown,
    # not leave the hook's task behind.
    store = _store()
    hook = HeldHook()
    stage, outbox = _rag_stage(store, hook)
    job = _job(store)
    stage.inbox.put_nowait(job)
    stage.inbox.close()
    stopping = asyncio.Event()

    async def in_a_task_group() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stage.run)
            await stopping.wait()
            tg.cancel_scope.cancel()

    host = asyncio.create_task(in_a_task_group() if stop == "scope" else stage.run())
    try:
        with anyio.fail_after(5):
            await hook.started.wait()
        await anyio.wait_all_tasks_blocked()
        if stop == "scope":
            stopping.set()
        else:
            host.cancel()
        done, _ = await asyncio.wait({host}, timeout=5)
        assert host in done, "the stage went on waiting for its hook"
        assert hook.cancelled == [job.id]
        assert outbox.closed
        assert list(outbox.items) == []
        assert job.record.finished_at is None  # the runtime fails the leftovers
    finally:
        hook.release.set()  # (lets a stage that did not stop end)
        await asyncio.wait({host})


async def test_an_async_hook_that_raises_fails_its_request_and_the_stage_serves_on() -> None:
    async def retriever(request: PromptRequest) -> str:
        if request.input == "bad":
            raise KeyError("no such document")
        return "ctx"

    config = PipelineConfig(retriever=retriever, template="{context}|{input}")
    async with spawn_pipeline(GateWorker(open_=True), config) as handles:
        bad = await handles.submit(PromptRequest("s", "bad"))
        with anyio.fail_after(5):
            with pytest.raises(StageError, match="no such document") as info:
                await bad.result()
            assert await handles.infer("good") == "ctx|good"
    assert info.value.stage == "rag"
    assert isinstance(info.value.__cause__, KeyError)


async def test_a_request_ended_while_waiting_for_a_hook_slot_never_runs_its_hook() -> None:
    # One hook at a time: the second request's hook waits for the slot, and is dropped
    # (its coroutine closed: no "never awaited" warning) when the request ends meanwhile.
    ran: list[str] = []
    gate = asyncio.Event()

    async def retriever(request: PromptRequest) -> str:
        ran.append(request.input)
        await gate.wait()
        return ""

    config = PipelineConfig(retriever=retriever, template="{input}", stage_concurrency=1)
    async with spawn_pipeline(GateWorker(open_=True), config) as handles:
        first = await handles.submit(PromptRequest("s", "first"))
        second = await handles.submit(PromptRequest("s", "second"))
        await anyio.wait_all_tasks_blocked()
        assert ran == ["first"]
        assert await second.cancel() is True
        gate.set()
        with anyio.fail_after(5):
            assert await first.result() == "first"
            assert await handles.infer("third") == "third"
    assert ran == ["first", "third"]
    assert second.status is RequestStatus.CANCELLED
    gc.collect()  # a coroutine left unclosed would warn here


# -- the Inference stage -------------------------------------------------------------------


class MethodWorker:
    """Records which method each call used; ``infer`` answers when ``gate`` opens,
    ``stream`` yields token ``i`` when ``token_gates[i]`` opens."""

    name = "method"

    def __init__(self) -> None:
        self.called: list[str] = []
        self.gate = asyncio.Event()
        self.token_gates = [asyncio.Event() for _ in range(3)]

    async def infer(self, prompt: str) -> list[str]:
        self.called.append("infer")
        await self.gate.wait()
        return split_tokens(prompt)

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        self.called.append("stream")
        for gate, token in zip(self.token_gates, split_tokens(prompt), strict=True):
            await gate.wait()
            yield token


class HeldRetriever:
    """Holds every request in RAG until ``gate`` opens: a reader can start before the
    worker call does."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def __call__(self, request: PromptRequest) -> str:
        await self.gate.wait()
        return ""


async def _read(tokens: AsyncIterator[str], into: list[str]) -> None:
    async for token in tokens:
        into.append(token)


@pytest.mark.parametrize("stream", [False, True])
async def test_streaming_is_decided_at_submit_not_by_when_reading_starts(stream: bool) -> None:
    worker = MethodWorker()
    retriever = HeldRetriever()
    config = PipelineConfig(template="{input}", retriever=retriever)
    async with spawn_pipeline(worker, config) as handles:
        ticket = await handles.submit(PromptRequest("s", "one two three"), stream=stream)
        seen: list[str] = []
        reader = asyncio.create_task(_read(ticket.tokens(), seen))
        await anyio.wait_all_tasks_blocked()
        assert worker.called == []  # reading began before the worker call
        retriever.gate.set()
        await anyio.wait_all_tasks_blocked()
        assert worker.called == ["stream" if stream else "infer"]
        assert ticket.status is RequestStatus.PROCESSING
        with anyio.fail_after(5):
            if stream:
                worker.token_gates[0].set()
                await anyio.wait_all_tasks_blocked()
                assert (seen, ticket.token_count) == (["one"], 1)  # live, one by one
                for gate in worker.token_gates[1:]:
                    gate.set()
            else:
                assert (seen, ticket.token_count) == ([], 0)
                worker.gate.set()
            await reader
        assert seen == ["one", " two", " three"]
        assert await ticket.result() == "one two three"


async def test_a_cancel_mid_stream_stops_the_call_and_the_slot_serves_the_next() -> None:
    worker = GateWorker(open_=True)
    worker.token_gates = [asyncio.Event() for _ in range(3)]
    config = PipelineConfig(template="{input}", max_concurrency=1)
    async with spawn_pipeline(worker, config) as handles:
        ticket = await handles.submit(PromptRequest("s", "a b c"), stream=True)
        tokens = ticket.tokens()
        worker.token_gates[0].set()
        with anyio.fail_after(5):
            assert await anext(tokens) == "a"
            assert await ticket.cancel() is True
        assert (worker.cancelled, worker.active) == (1, 0)
        with anyio.fail_after(5), pytest.raises(RequestCancelled):
            await anext(tokens)  # the tokens it produced, then its end
        assert ticket.token_count == 1
        for gate in worker.token_gates:
            gate.set()
        with anyio.fail_after(5):
            assert await handles.infer("next one") == "next one"


class HeldPost:
    """An async post processor holding the outputs named ``held``."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, request: PromptRequest, text: str) -> str:
        if request.input != "held":
            return text.upper()
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


@pytest.mark.parametrize("end", [RequestStatus.CANCELLED, RequestStatus.TIMEOUT])
async def test_an_async_post_hook_ends_with_its_request(end: Status) -> None:
    post = HeldPost()
    config = PipelineConfig(
        template="{input}", post_processors=[post], stage_concurrency=1, request_timeout=30
    )
    async with spawn_pipeline(GateWorker(open_=True), config) as handles:
        timeout = 0.05 if end is RequestStatus.TIMEOUT else None
        ticket = await handles.submit(PromptRequest("s", "held", timeout=timeout))
        with anyio.fail_after(5):
            await post.started.wait()
            if end is RequestStatus.CANCELLED:
                assert ticket.cancel_nowait() is True
            await ticket.wait()
            await anyio.wait_all_tasks_blocked()
            assert post.cancelled == 1
            # The one Post slot is free again.
            assert await handles.infer("fresh") == "FRESH"
    assert ticket.status is end
    assert ticket.text is None


async def test_the_prompt_reaches_the_worker_after_rag_and_assemble() -> None:
    worker = MethodWorker()
    worker.gate.set()
    async with spawn_pipeline(worker) as handles:
        with anyio.fail_after(5):
            assert await handles.infer("hi") == prompt_for("hi")
    assert worker.called == ["infer"]
